"""The stages of ``ibscope run``, one function each, in :data:`~ibscope.pipeline.config.STAGES` order.

Each function describes its :class:`~ibscope.pipeline.runner.Stage` (config section, inputs,
upstream stages) and hands it to the run's :class:`~ibscope.pipeline.runner.StageRunner`, which
skips it when up to date; the stage's ``run`` calls the library (``capture``, ``run_estimate``,
``plot_results``, ``run_ood``, ``write_report``, ``run_check``) and reports through the run's
reporter. Stage configs are plain dicts of the typed sections (``model_dump``): they are hashed
into the stage's fingerprint.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np

from ibscope._atomic import atomic_path
from ibscope._version import __version__
from ibscope.errors import DataError, UsageError, unknown_name
from ibscope.pipeline.context import RunContext
from ibscope.pipeline.runner import Stage, StageStatus

#: keys of EstimateSection that older run configs did not have: left out of the fingerprint when unset
_NEW_ESTIMATE_KEYS = ("x_source", "layers", "device", "out", "description", "reference", "scheduler", "scheduler_file")


def _npz_xy(path: Path, what: str) -> tuple[np.ndarray, np.ndarray]:
    if not path.exists():
        raise DataError(f"{what} file not found: '{path}'.")
    try:
        with np.load(path, allow_pickle=False) as z:
            if "x" not in z or "y" not in z:
                raise DataError(f"{what} '{path}' must be an .npz with arrays 'x' and 'y'. Found: {sorted(z.files)}.")
            x, y = z["x"], z["y"]
    except (OSError, ValueError) as exc:
        raise DataError(f"Cannot read {what} '{path}' as .npz: {exc}") from None
    if x.shape[0] != y.shape[0] or x.shape[0] == 0:
        raise DataError(f"{what} '{path}': x has {x.shape[0]} rows and y has {y.shape[0]}; they must match and be > 0.")
    if y.dtype.kind not in "iub":
        raise DataError(f"{what} '{path}': y must hold integer class labels for training. Got dtype {y.dtype}.")
    return x, y.astype(np.int64)


def write_subset(src: Path, dst: Path, n: int, seed: int) -> Path:
    """Write a seeded random subset of ``n`` rows of probe file ``src`` (.npz) to ``dst``, in source order."""
    if src.suffix != ".npz":
        raise UsageError(f"data.subsets needs an .npz probe set to draw from. Got '{src}'.")
    if not src.exists():
        raise DataError(f"Probe file not found: '{src}'.")
    with np.load(src, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    if "x" not in arrays:
        raise DataError(f"Probe file '{src}' has no array 'x'. Found: {sorted(arrays)}.")
    total = arrays["x"].shape[0]
    if n > total:
        raise UsageError(f"data.subsets: cannot draw {n} samples from '{src.name}', which holds {total}.")
    if "ids" not in arrays:
        arrays["ids"] = np.arange(total, dtype=np.int64)
    rows = np.sort(np.random.default_rng(seed).choice(total, size=n, replace=False))
    dst.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(dst, dst.with_name(dst.stem + ".tmp.npz")) as tmp:
        np.savez(tmp, **{k: v[rows] if v.ndim and v.shape[0] == total else v for k, v in arrays.items()})
    return dst


def estimate_fingerprint(ctx: RunContext) -> dict[str, Any]:
    """The ``estimate:`` section as hashed and recorded (keys older configs lacked left out when unset)."""
    est = ctx.cfg.estimate
    return est.model_dump(exclude={k for k in _NEW_ESTIMATE_KEYS if getattr(est, k) is None})


# ------------------------------------------------------------------------------------ data, train
def data(ctx: RunContext) -> None:
    d = ctx.cfg.data
    if d.task is None and not d.subsets:
        return
    probes = ctx.probes()

    def run() -> list[Path]:
        (ctx.out / "data").mkdir(parents=True, exist_ok=True)
        written: list[Path] = []
        if d.task == "twelve-bit":
            from ibscope.demo.tasks import write_probe_files

            written += write_probe_files(ctx.out / "data", **(d.options or {}))
        elif d.task == "digits":
            from ibscope.demo.digits import write_probe_files as write_digits

            written += write_digits(ctx.out / "data", **(d.options or {}))
        for name, sub in (d.subsets or {}).items():
            written.append(write_subset(probes[sub.probe], probes[name], sub.n, sub.seed))
        return written

    user_files = [p for k, p in probes.items() if not str(p).startswith(str(ctx.out / "data"))]
    ctx.runner(Stage("data", {"task": d.task, "options": d.options, "subsets": d.model_dump()["subsets"]},
                     user_files, [], run, label=f"data ({d.task or 'subsets'})"))


def train(ctx: RunContext) -> list[Path]:
    cfg = ctx.cfg
    t = cfg.train
    if t is None:
        return []
    probes = ctx.probes()
    d = cfg.data
    train_p = probes.get("train") if d.task else (ctx.path(d.train) if d.train else None)
    test_p = probes.get("test") if d.task else (ctx.path(d.test) if d.test else None)
    factory = ctx.factory_spec()
    tconf = cfg.train_config()
    inputs = [p for p in (train_p, test_p) if p is not None] + ctx.factory_inputs()
    stage_cfg = {"model": {"factory": cfg.model.factory, "args": cfg.model.args}, "train": t.model_dump(),
                 "seed": cfg.seed, "data": d.model_dump()}

    def run() -> list[Path]:
        from ibscope._device import resolve_device
        from ibscope.capture.factory import resolve_factory
        from ibscope.demo.train import train_classifier

        assert train_p is not None  # the config's validator requires data.train or a task
        x, y = _npz_xy(train_p, "Training data")
        xt, yt = _npz_xy(test_p, "Test data") if test_p is not None else (None, None)
        build = resolve_factory(factory, cfg.model.args, what="model.factory (run config)")
        ck_dir = ctx.out / "checkpoints"
        if ck_dir.exists():
            for old in ck_dir.glob("epoch_*.pt"):
                old.unlink()
        dev = str(resolve_device(t.device))
        with ctx.task(f"train {ctx.name} (epochs)", tconf.epochs) as bar:
            every = max(1, tconf.epochs // 200)

            def tick(e: int, n: int) -> None:
                if e % every == 0 or e == n:
                    bar.update(completed=e)

            train_classifier(build, x, y, xt, yt, ck_dir, tconf, device=dev,
                             progress=tick if ctx.progress else None)
        return [ck_dir]

    outs = ctx.runner(Stage("train", stage_cfg, inputs, ["data"], run, label=f"train ({ctx.name})"))
    ctx.result.checkpoints = sorted((ctx.out / "checkpoints").glob("epoch_*.pt"))
    return outs


# ------------------------------------------------------------------------------------ capture, estimate
def capture(ctx: RunContext) -> dict[str, Path]:
    cfg = ctx.cfg
    probes = ctx.probes()
    names = ctx.capture_probes()
    src = ctx.checkpoint_source()
    factory = ctx.factory_spec()
    cap = cfg.capture
    stores = {n: ctx.out / "stores" / n for n in names}
    if isinstance(src, Path):
        ck_inputs: list[Any] = [src]
    else:
        from ibscope.capture.loading import list_checkpoint_paths

        ck_inputs = list_checkpoint_paths(src)
    stage_cfg = {"model": cfg.model.model_dump(), "capture": cap.model_dump(),
                 "probes": {n: str(probes[n]) for n in names}, "checkpoints": str(src), "name": ctx.name}

    def run() -> list[Path]:
        from ibscope.capture import capture as capture_store

        out: list[Path] = []
        for n in names:
            ctx.reporter.info(f"  capture probe set '{n}' ({probes[n].name})")
            store = capture_store(factory, src, str(probes[n]), cap.layers, stores[n], model_args=cfg.model.args,
                                     reduce=cap.reduce, max_samples=cap.max_samples, sample_seed=cap.sample_seed,
                                     batch_size=cap.batch_size, device=ctx.device, dtype=cap.dtype,
                                     jacobian_samples=cap.jacobian_samples, split=n, run=ctx.name, overwrite=True,
                                     progress=ctx.progress, reporter=ctx.reporter,
                                     safe_globals=list(cap.safe_globals))
            assert store is not None  # None only for a dry run
            out.append(Path(store))
        return out

    inputs = [*ck_inputs, *(probes[n] for n in names), *ctx.factory_inputs()]
    ctx.runner(Stage("capture", stage_cfg, inputs, ["data", "train"], run, label=f"capture ({ctx.name})"))
    ctx.result.stores = stores
    return stores


def estimate(ctx: RunContext, stores: dict[str, Path]) -> Path:
    cfg = ctx.cfg
    est = cfg.estimate
    names = list(est.probes or [ctx.main_probe()])
    groups: dict[tuple, list[str]] = {}  # probe sets -> estimators run on them
    for e in est.estimators:
        v = (est.probes_for or {}).get(e, names)  # entries for estimators not selected are unused
        groups.setdefault(tuple([v] if isinstance(v, str) else v), []).append(e)
    used = list(dict.fromkeys(n for g in groups for n in g))
    for n in used:
        if n not in stores:
            raise unknown_name("captured probe set (estimate.probes / probes_for)", n, stores)
    results = ctx.out / "results.csv"
    fingerprint = estimate_fingerprint(ctx)

    def run() -> list[Path]:
        from ibscope.estimate import run_estimate, summary_lines
        from ibscope.results import provenance_path, read_results, write_results

        # start from an empty table: run_estimate keeps rows already in its output file, which
        # here would leave rows of estimators or parameters no longer in the config
        for old in (results, provenance_path(results)):
            old.unlink(missing_ok=True)
        # estimate.strict is checked once every stage has written its outputs (see strict_check)
        extra: dict[str, Any] = {"skip_bad_shards": cfg.skip_bad_shards}
        for k in ("null_permutations", "null_seed", "x_source", "layers", "scheduler", "scheduler_file"):
            if getattr(est, k) is not None:
                extra[k] = getattr(est, k)
        kw = dict(device=est.device or ctx.device, force=True, jobs=est.jobs, progress=ctx.progress,
                  reporter=ctx.reporter, **extra)

        def tell(res) -> None:  # noted cells, saturated cells, dropped rows: the same summary as `ibscope estimate`
            for line in summary_lines(res, strict=est.strict):
                ctx.reporter.warning(f"  {line}")

        if len(groups) == 1:
            (g, ests), = groups.items()
            tell(run_estimate([stores[n] for n in g], results, ests, est.params_of(ests), **kw))
            return [results, provenance_path(results)]
        tmp_dir = ctx.out / ".ibscope" / "estimate-parts"
        shutil.rmtree(tmp_dir, ignore_errors=True)
        rows, provs, seen = [], [], set()
        for i, (g, ests) in enumerate(groups.items()):
            part = tmp_dir / f"part{i}.csv"
            res = run_estimate([stores[n] for n in g], part, ests, est.params_of(ests), **kw)
            tell(res)
            provs.append({"probes": list(g), "estimators": ests, **res.provenance})
            for r in read_results(part).rows:
                if r["estimator"] == "metrics":  # the same training metrics come with every group of a split
                    key = (r["run"], r["split"], r["checkpoint"], r["quantity"])
                    if key in seen:
                        continue
                    seen.add(key)
                rows.append(r)
        write_results(results, rows, {"ibscope_version": __version__, "parts": provs,
                                      "resolved_config": {"estimate": fingerprint}})
        shutil.rmtree(tmp_dir, ignore_errors=True)
        return [results, provenance_path(results)]

    # `strict` changes no output (it is checked at the end of the run): toggling it re-runs nothing
    # nor does where the cells run (the results are the same locally and on a Dask cluster)
    stage_est = {k: v for k, v in fingerprint.items() if k not in ("strict", "scheduler", "scheduler_file")}
    ctx.runner(Stage("estimate", {"estimate": stage_est, "probes": names,
                                  "groups": [[list(g), e] for g, e in groups.items()],
                                  "skip_bad_shards": cfg.skip_bad_shards},
                     [stores[n] for n in used], ["capture"], run, label=f"estimate ({ctx.name})"))
    ctx.result.results = results
    return results


# ------------------------------------------------------------------------------------ plot, ood, report, check
def plot(ctx: RunContext, results: Path) -> list[Path]:
    pc = ctx.cfg.plot
    if not pc.enabled:
        ctx.runner.status.append(StageStatus("plot", "disabled"))
        return []
    figures_dir = ctx.out / "figures"

    def run() -> list[Path]:
        from ibscope.plot import plot_results

        if figures_dir.exists():
            shutil.rmtree(figures_dir)
        figures_dir.mkdir(parents=True)
        with ctx.task("figures") as bar:
            def tick(done: int, total: int, path) -> None:
                bar.update(completed=done, total=total, note=Path(path).name)

            figs = plot_results(results, figures_dir, kinds=pc.kinds, unit=pc.unit, fmt=pc.fmt,
                                callback=tick if ctx.progress else None, **(pc.options or {}))
        return [Path(f) for f in figs] or [figures_dir]

    figs = ctx.runner(Stage("plot", {"plot": pc.model_dump()}, [results], ["estimate"], run, label="plot"))
    ctx.result.figures = [f for f in figs if f.is_file()]
    return ctx.result.figures


def ood(ctx: RunContext, stores: dict[str, Path]) -> Path | None:
    oc = ctx.cfg.ood
    if oc is None:
        return None
    out_dir = ctx.out / "ood"

    def run() -> list[Path]:
        from ibscope.ood import run_ood

        if out_dir.exists():
            shutil.rmtree(out_dir)
        doc = run_ood(stores[oc.fit], stores[oc.test], {n: stores[n] for n in oc.ood}, oc.layer,
                      detectors=oc.detectors, reductions=oc.reductions, checkpoint=oc.checkpoint,
                      out_dir=out_dir, device=ctx.device, progress=ctx.progress, reporter=ctx.reporter,
                      seed=ctx.cfg.seed, skip_bad_shards=ctx.cfg.skip_bad_shards, **(oc.options or {}))
        # every file of the output set: one missing or changed makes the stage run again
        return [out_dir / "ood_metrics.json", *(out_dir / f for f in doc["output_set"]["files"]), out_dir]

    used = [stores[oc.fit], stores[oc.test], *(stores[n] for n in oc.ood)]
    ctx.runner(Stage("ood", {"ood": oc.model_dump(), "skip_bad_shards": ctx.cfg.skip_bad_shards}, used, ["capture"],
                     run, label=f"ood ({ctx.name})"))
    ctx.result.ood = out_dir / "ood_metrics.json"
    return ctx.result.ood


def report(ctx: RunContext, results: Path, ood_json: Path | None = None) -> Path | None:
    cfg = ctx.cfg
    if not cfg.report.enabled:
        ctx.runner.status.append(StageStatus("report", "disabled"))
        return None
    html = ctx.out / "report.html"
    figures_dir = ctx.out / "figures"
    title = f"ibscope: {ctx.name}" + (f" - {cfg.description.strip()}" if cfg.description else "")

    def run() -> list[Path]:
        from ibscope.report import write_report

        write_report(results, html, ood=ood_json, figures_dir=figures_dir if figures_dir.exists() else None,
                     unit=cfg.plot.unit, title=title)
        return [html]

    inputs = [results, *([ood_json] if ood_json else [])]
    ctx.runner(Stage("report", {"report": cfg.report.model_dump(), "title": title, "unit": cfg.plot.unit,
                                "ood": str(ood_json) if ood_json else None}, inputs, ["estimate", "plot", "ood"], run,
                     label="report"))
    ctx.result.report = html
    return html


def check(ctx: RunContext, results: Path) -> Any:
    cc = ctx.cfg.check
    if cc is None:
        return None
    if not cc.baseline and not cc.rules:
        raise UsageError("The 'check:' section needs 'baseline' and/or 'rules'.")
    from ibscope.check import run_check

    ctx.reporter.info("> check")
    t0 = time.perf_counter()
    rep = run_check(results, baseline=ctx.path(cc.baseline) if cc.baseline else None,
                    rules=ctx.path(cc.rules) if cc.rules else None, rtol=cc.rtol, atol=cc.atol, sigma=cc.sigma)
    rep.write_json(ctx.out / "check.json")
    if cc.junit:
        rep.write_junit(ctx.out / "check.xml")
    ctx.runner.status.append(StageStatus("check", "ran", time.perf_counter() - t0, [ctx.out / "check.json"],
                                         "always runs"))
    ctx.result.check = rep
    ctx.reporter.info(f"  {rep.summary()}")
    return rep


def strict_check(ctx: RunContext, results: Path, rep: Any) -> None:
    """``estimate.strict`` / ``--strict``: exit 4 when the results table has cells without a
    value, after every stage has written its outputs (also when estimate was up to date)."""
    if not ctx.cfg.estimate.strict or not results.exists():
        return
    from ibscope.results import read_results

    noted = [r for r in read_results(results, allow_empty=True).rows if r["value"] is None and r.get("note")]
    if not noted:
        return
    first = list(dict.fromkeys(r["note"] for r in noted))[:3]
    also = "" if rep is None or rep.ok else f" The check stage also found {len(rep.failures)} regression(s)."
    raise DataError(
        f"{len(noted)} row(s) of '{results}' have no value (estimate.strict / --strict). First reasons:\n"
        + "\n".join(f"  - {n}" for n in first) + ("\n  ..." if len(noted) > 3 else "")
        + f"\nEvery stage has written its outputs.{also}",
        hint="See the 'note' column of the results table; fix the data, or run without --strict to accept "
             "rows without a value.")
