"""``ibscope capture``, ``ibscope layers`` and ``ibscope info``.

No torch / h5py import at module level: ``ibscope --help`` stays fast.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import List, Literal, Optional

import typer

from ibscope._console import listing
from ibscope._locks import DEFAULT_LOCK_TIMEOUT
from ibscope.cli._common import RichReporter, console, guard, load_mapping, reporter, rich_table, setup_logging
from ibscope.errors import UsageError


def _store_inputs(store: bool, no_store: bool) -> bool:
    """--no-store-inputs, or the (hidden: it is the default) --store-inputs; both is a usage error."""
    if store and no_store:
        raise UsageError("--store-inputs and --no-store-inputs exclude each other.")
    return not no_store


def _parse_reduce(items: list[str] | None):
    """``OP`` sets the default; ``LAYER=OP`` overrides one layer (or a glob of layers)."""
    if not items:
        return None
    out: dict[str, str] = {}
    for it in items:
        if "=" in it:
            k, v = it.rsplit("=", 1)
            if not k.strip() or not v.strip():
                raise UsageError(f"--reduce expects OP or LAYER=OP. Got {it!r}.")
            out[k.strip()] = v.strip()
        else:
            out["*"] = it.strip()
    if list(out) == ["*"]:
        return out["*"]
    return out


def _model_args(text: str | None) -> dict:
    return load_mapping(text, "--model-args")


def register(app: typer.Typer) -> None:
    """Add ``capture``, ``layers`` and ``info`` to the app."""

    @app.command("capture", no_args_is_help=True)
    @guard
    def capture_cmd(
        model: str = typer.Option(..., "--model", "-m", help="Model factory: 'pkg.module:factory' or 'path/to/file.py:factory' "
                                  "(a function or class returning the nn.Module); 'hf' builds each checkpoint's Hugging "
                                  "Face model from its folder's config.json, 'hf:DIR' from DIR's (offline; needs "
                                  "pip install \"ibscope\\[hf]\")."),
        checkpoints: List[str] = typer.Option(..., "--checkpoints", "-c", help="Checkpoints: a glob (quote it), a "
                                              "directory or files; repeatable. A Hugging Face folder (checkpoint-400/ "
                                              "with model.safetensors, pytorch_model.bin or shards) is one checkpoint. "
                                              "Epoch and step come from the file's metadata (checkpoint keys, "
                                              "safetensors metadata, trainer_state.json), else its name (epoch=3-step=120, "
                                              "step-200, ep12, checkpoint-400); ordered by step, else epoch, else name. "
                                              "`ibscope checkpoints PATTERN` shows the series."),
        probe: str = typer.Option(..., "--probe", "-p", help="Probe data: .npz (x, y), .h5 (datasets x, y), .pt "
                                  "({'x','y'}) or 'pkg.module:factory' returning a Dataset or (x, y). 'x' is passed "
                                  "as model(x); other arrays except y and ids by keyword (input_ids=, "
                                  "attention_mask=, ...). An attention_mask (1 = real token) makes last/first/mean "
                                  "reduce over real tokens."),
        layers: List[str] = typer.Option(..., "--layers", "-l", help="Layer selector, repeatable: module path "
                                         "(layer1.0.conv2), glob (encoder.*, **.fc), re:REGEX, type:Linear, 'output'; "
                                         "suffixes @CALL (reused modules), [0] / ['key'] (tuple/dict element), :in "
                                         "(module input), =ALIAS."),
        out: Optional[Path] = typer.Option(None, "--out", "-o", help="Store directory to create (or resume); "
                                           "required except with --dry-run."),
        model_args: Optional[str] = typer.Option(None, "--model-args", help="Keyword arguments for the factory: JSON or "
                                                 "YAML, inline or a .json/.yaml file."),
        reduce: Optional[List[str]] = typer.Option(None, "--reduce", "-r", help="Reduction to (samples, features): auto "
                                                   "(default: conv maps -> gap; sequences must be told), none, "
                                                   "flatten, gap/gmp (conv maps), rp:K[:SEED], last/first/mean "
                                                   "(sequences (N, L, D); over real tokens with an attention_mask). "
                                                   "OP for all layers or LAYER=OP (name or glob); repeatable."),
        max_samples: Optional[int] = typer.Option(None, "--max-samples", help="Use the first N probe samples (in file "
                                                  "order), or a seeded random N with --sample-seed."),
        sample_seed: Optional[int] = typer.Option(None, "--sample-seed", help="Draw the --max-samples subset at random "
                                                  "with this seed (kept in file order)."),
        batch_size: int = typer.Option(256, "--batch-size", "-b", help="Probe samples per forward pass."),
        device: str = typer.Option("auto", "--device", help="auto (CUDA if available), cpu or cuda:N."),
        dtype: Literal["float32", "float16"] = typer.Option("float32", "--dtype", help="Storage dtype: float32 or float16 (layers beyond "
                                  "float16's range fall back to float32, with a warning)."),
        jacobian_samples: int = typer.Option(0, "--jacobian-samples", help="Also store, for the first N probe samples, "
                                             "the singular values of each layer's Jacobian w.r.t. the input (for "
                                             "local-rank estimators). Costs one backward pass per sample and output "
                                             "dim (16-64 samples are typical)."),
        jacobian_method: str = typer.Option("exact", "--jacobian-method", help="exact (all singular values, Jacobian "
                                            "built in chunks of rows) or sketch:K (randomized SVD: the top K "
                                            "singular values, exact when the rank is <= K; never forms the Jacobian)."),
        jacobian_memory: str = typer.Option("auto", "--jacobian-memory", help="Memory budget of the Jacobian "
                                            "computation, e.g. 512M, 2G; auto = 1 GiB or half the available memory. "
                                            "Checked before any work: a request that cannot fit is an error."),
        no_store_inputs: bool = typer.Option(False, "--no-store-inputs", help="Do not copy the probe inputs into the "
                                             "store (by default they are, flattened float32, unless above 256 MiB, "
                                             "with a warning)."),
        store_inputs: bool = typer.Option(False, "--store-inputs", hidden=True),  # the default, spelt out
        split: str = typer.Option("probe", "--split", help="Name of this probe set (train, test, ...), kept in results."),
        run: str = typer.Option("run", "--run", help="Name of the training run (or seed), kept in results."),
        resume: bool = typer.Option(False, "--resume", help="Capture only checkpoints missing from an existing store "
                                    "(refused if it was made from other data, layers or settings)."),
        overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing store."),
        trust_checkpoint: bool = typer.Option(False, "--trust-checkpoint", help="Last resort: load checkpoints with "
                                              "full unpickling (can run arbitrary code: only for files you trust)."),
        safe_globals: Optional[List[str]] = typer.Option(None, "--safe-globals", help="Allow one more class (import "
                                                         "path module.Class) in checkpoints loaded safely; repeatable. "
                                                         "numpy scalars, arrays and dtypes are allowed by default."),
        allow_nonfinite: bool = typer.Option(False, "--allow-nonfinite", help="Store NaN/inf activations instead of "
                                             "stopping with exit code 4."),
        compression: Literal["none", "lzf", "gzip"] = typer.Option("none", "--compression", help="HDF5 compression: none (default: the "
                                        "fastest; capture keeps up with the forward pass), lzf (h5py's filter, with "
                                        "shuffle: float32 activations shrink ~20-35%, at several times the CPU of "
                                        "the forward pass on dense layers) or gzip (readable by every HDF5 tool, "
                                        "smallest, slowest). See docs/capture.md, Performance."),
        lock_timeout: float = typer.Option(DEFAULT_LOCK_TIMEOUT, "--lock-timeout", metavar="SECONDS", help="Seconds to wait while another "
                                           "capture writes the same store, then stop naming it (0: do not wait; "
                                           "-1: wait without limit)."),
        order: Literal["auto", "step", "epoch", "name"] = typer.Option("auto", "--order", help="Checkpoint order: auto (by step when every checkpoint has "
                                  "one, else epoch, else name), step, epoch or name."),
        dry_run: bool = typer.Option(False, "--dry-run", help="Print the checkpoint series (epoch, step and where each "
                                     "came from) and the layers to capture, then stop: nothing is written."),
        quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars or tables; warnings only."),
        scheduler: Optional[str] = typer.Option(None, "--scheduler", metavar="ADDRESS",
                                                help="Capture on a Dask cluster, one task per checkpoint, each worker "
                                                     "writing its checkpoint's shard: tcp://HOST:PORT of `dask "
                                                     "scheduler` (default: $DASK_SCHEDULER_ADDRESS when set; 'local' "
                                                     "ignores it). Model file, checkpoints, probe and --out must be "
                                                     "at the same paths on every worker. Workers started with "
                                                     "--resources GPU=1 get the tasks."),
        scheduler_file: Optional[Path] = typer.Option(None, "--scheduler-file", metavar="FILE",
                                                      help="Like --scheduler, from the file written by `dask scheduler "
                                                           "--scheduler-file FILE`."),
    ) -> None:
        """Run a fixed probe set through every checkpoint and store the chosen layers' activations.

        Writes one HDF5 shard per checkpoint under OUT/checkpoints/ (complete or absent, even after
        a crash) and OUT/manifest.h5 with sample ids, labels and the layer list. One capture
        writes a store at a time (hidden lock file .OUT.lock next to it). --resume also deletes and re-captures
        shards it finds truncated or corrupt. Exit codes: 0 ok, 1 error (disk full, read-only,
        no permission: the path is named and no partial file is left; store locked by another
        capture), 2 usage (bad option, unknown layer, --safe-globals name that cannot be
        imported), 4 bad data (checkpoint/key mismatch, classes not allowed for safe loading,
        NaN activations, foreign or corrupt store).

        Examples:

          ibscope capture -m mynet.py:Net -c 'runs/exp1/*.pt' -p probe.npz -l 'type:Linear' -o acts

          ibscope capture -m hf -c out/ -p tokens.npz -l 'bert.encoder.layer.*' -r cls -o acts   (a Trainer's checkpoint-N folders)
        """
        setup_logging(quiet)
        from ibscope.capture import capture

        path = capture(
            model, checkpoints, probe, list(layers), out, model_args=_model_args(model_args), reduce=_parse_reduce(reduce),
            max_samples=max_samples, sample_seed=sample_seed, batch_size=batch_size, device=device, dtype=dtype,
            jacobian_samples=jacobian_samples, store_inputs=_store_inputs(store_inputs, no_store_inputs), split=split, run=run, resume=resume,
            overwrite=overwrite, trust_checkpoint=trust_checkpoint, safe_globals=list(safe_globals or []),
            allow_nonfinite=allow_nonfinite, compression=compression, progress=not quiet,
            # a dry run's plan is its result: on stdout (like `ibscope checkpoints`), even with -q
            reporter=RichReporter(listing()) if dry_run else reporter(quiet),
            lock_timeout=lock_timeout,
            jacobian_method=jacobian_method, jacobian_memory=jacobian_memory, order=order, dry_run=dry_run,
            scheduler=scheduler, scheduler_file=scheduler_file,
        )
        if path is None:  # --dry-run
            return
        if not quiet:
            from ibscope.store import open_store

            got = open_store(path).summary()
            console().print(f"[green]Store[/] {path}: {len(got['checkpoints'])} checkpoint(s) x {len(got['layers'])} "
                            f"layer(s) x {got['n_samples']} samples. Next: ibscope estimate {path} -o results.csv")

    @app.command("checkpoints", no_args_is_help=True)
    @guard
    def checkpoints_cmd(
        patterns: List[str] = typer.Argument(..., metavar="PATTERN...", help="Checkpoints: globs (quote them), directories or files."),
        order: Literal["auto", "step", "epoch", "name"] = typer.Option("auto", "--order", help="auto (by step when every checkpoint has one, else epoch, "
                                  "else name), step, epoch or name."),
        trust_checkpoint: bool = typer.Option(False, "--trust-checkpoint", help="Allow full unpickling (only for files "
                                              "you trust)."),
        safe_globals: Optional[List[str]] = typer.Option(None, "--safe-globals", help="Allow one more class "
                                                         "(module.Class) when reading checkpoints; repeatable."),
        as_json: bool = typer.Option(False, "--json", help="Print the series as JSON on stdout."),
    ) -> None:
        """Show the checkpoint series `ibscope capture -c PATTERN` would capture, in its order.

        For each checkpoint: epoch and step, and where each came from (a key in the checkpoint, a Lightning checkpoint, safetensors metadata, trainer_state.json, or the file name), plus the training metrics found (checkpoint keys, Lightning's ModelCheckpoint state and metrics.csv, trainer_state.json's log history, metric values in file names). Duplicates, checkpoints without numbers and orders that disagree are warnings; an order that cannot be decided is exit code 2. Nothing is loaded into a model and nothing is written.

        Example: ibscope checkpoints 'lightning_logs/version_0/checkpoints/*.ckpt'
        """
        setup_logging(False)
        from ibscope.capture.loading import discover_checkpoints
        from ibscope.capture.series import series_json, series_table

        ckpts = discover_checkpoints(list(patterns), trust_checkpoint=trust_checkpoint,
                                     safe_globals=list(safe_globals or []), order=order)
        if as_json:
            typer.echo(json.dumps({"order": order, "checkpoints": series_json(ckpts)}, indent=2))
            return
        listing().print(rich_table(series_table(ckpts, title=f"{len(ckpts)} checkpoint(s), in capture order")))

    @app.command("layers", no_args_is_help=True)
    @guard
    def layers_cmd(
        model: str = typer.Option(..., "--model", "-m", help="Model factory: 'pkg.module:factory' or 'file.py:factory'; "
                                  "'hf:DIR' (a Hugging Face folder), or 'hf' with --checkpoint FOLDER."),
        probe: str = typer.Option(..., "--probe", "-p", help="Probe data (one batch is run through the model)."),
        checkpoint: Optional[Path] = typer.Option(None, "--checkpoint", help="Load this checkpoint first (strictly)."),
        model_args: Optional[str] = typer.Option(None, "--model-args", help="Factory keyword arguments (JSON/YAML)."),
        layers: Optional[List[str]] = typer.Option(None, "--layers", "-l", help="Also show what these selectors would "
                                                   "capture (names, reductions, stored dims)."),
        reduce: Optional[List[str]] = typer.Option(None, "--reduce", "-r", help="Reductions, as for capture."),
        batch_size: int = typer.Option(4, "--batch-size", "-b", help="Samples in the dry-run batch."),
        device: str = typer.Option("cpu", "--device", help="auto, cpu or cuda:N."),
        trust_checkpoint: bool = typer.Option(False, "--trust-checkpoint", help="Allow full unpickling of --checkpoint."),
        safe_globals: Optional[List[str]] = typer.Option(None, "--safe-globals", help="Allow one more class "
                                                         "(module.Class) in --checkpoint; repeatable."),
        as_json: bool = typer.Option(False, "--json", help="Print the listing as JSON on stdout."),
    ) -> None:
        """List the probe's inputs and the model's modules in execution order with output shapes and calls per forward.

        Runs one probe batch through the model: 'x' positionally, every other array (except y
        and ids) by keyword. Modules called more than once per forward need '@CALL' in a
        selector; tuple/dict outputs need an element ('[0]', "['last_hidden_state']").
        """
        setup_logging(True)
        from ibscope.capture.inspect import inspect_layers

        got = inspect_layers(model, probe, checkpoint=checkpoint, model_args=_model_args(model_args),
                             layers=list(layers) if layers else None, reduce=_parse_reduce(reduce),
                             batch_size=batch_size, device=device, trust_checkpoint=trust_checkpoint,
                             safe_globals=safe_globals)
        inputs, rows, plan = got["inputs"], got["modules"], got["selected"]
        if as_json:
            typer.echo(json.dumps({"inputs": inputs, "modules": rows, "selected": plan}, indent=2))
            return
        from rich.table import Table

        it = Table(title=f"Probe inputs ({probe}), passed as model(...)", title_justify="left")
        for col in ("array", "shape per sample", "dtype", "passed as", "role"):
            it.add_column(col)
        for e in inputs:
            it.add_row(e["name"], "x".join(map(str, e["shape"])) or "scalar", e["dtype"], e["passed"], e["role"])
        listing().print(it)
        tab = Table(title=f"Modules of {model} (batch of {got['batch']}), in execution order", title_justify="left")
        for col in ("module", "type", "calls", "output (first call)", "params (incl. children)"):
            tab.add_column(col)
        for r in rows:
            calls = str(r["calls"]) if r["calls"] != 1 else "1"
            style = "yellow" if r["calls"] > 1 else ("dim" if r["calls"] == 0 else None)
            tab.add_row(r["name"], r["type"], calls, r["output"], str(r["params"]), style=style)
        listing().print(tab)
        if plan:
            from ibscope.capture.plan import layers_table

            listing().print(rich_table(layers_table(plan, "Selected layers")))

    @app.command("info", no_args_is_help=True)
    @guard
    def info_cmd(
        store: Path = typer.Argument(..., help="Store directory (or its manifest.h5)."),
        as_json: bool = typer.Option(False, "--json", help="Print a JSON summary on stdout instead of tables."),
        skip_bad_shards: bool = typer.Option(False, "--skip-bad-shards", help="List shards that are truncated, corrupt, "
                                             "incomplete or of another capture as skipped instead of stopping with "
                                             "exit code 4."),
    ) -> None:
        """Show what an activation store holds: probe set, layers, checkpoints, settings.

        Every shard is checked (attributes and shapes, not data). A bad shard is exit code 4
        naming it, unless --skip-bad-shards (then it is listed as skipped).
        """
        from ibscope.store import Store

        summary = Store(store, skip_bad_shards=skip_bad_shards, warn=False).summary()  # skipped shards listed below
        ckpts, skipped = summary["checkpoints"], summary["skipped"]
        if as_json:
            typer.echo(json.dumps(summary, indent=2, default=str))
            return
        from rich.markup import escape
        from rich.table import Table

        c = listing()
        cfg = summary["config"]
        c.print(f"[bold]{summary['store']}[/]  format v{summary['format_version']}, ibscope {summary['ibscope_version']}, "
                f"created {summary['created']}")
        c.print(f"run={cfg.get('run')} split={cfg.get('split')} model={cfg.get('model')} dtype={cfg.get('dtype')}")
        lab, inp = summary["labels"], summary["inputs"]
        c.print(f"probe: {summary['n_samples']} samples from {cfg.get('probe')}; labels: "
                f"{'none' if lab is None else str(lab['classes']) + ' distinct (' + lab['dtype'] + ')'}; inputs: "
                f"{'not stored' if inp is None else 'x'.join(map(str, inp))}")
        lt = Table(title="Layers", title_justify="left")
        for col in ("#", "layer", "type", "reduction", "raw shape", "dims"):
            lt.add_column(col)
        for i, (n, m) in enumerate(summary["layers"].items()):
            lt.add_row(str(i), n, str(m.get("type", "")), str(m.get("reduction", "")),
                       "x".join(map(str, m.get("raw_shape") or [])), str(m.get("dims", "")))
        c.print(lt)
        names = [Path(r["path"]).name for r in ckpts]
        if len(set(names)) < len(names):  # e.g. Hugging Face folders: checkpoint-N/model.safetensors
            names = [str(Path(Path(r["path"]).parent.name) / Path(r["path"]).name) for r in ckpts]
        ct = Table(title=f"Checkpoints ({len(ckpts)} complete)", title_justify="left")
        for col in ("#", "epoch", "step", "file", "sha256", "dtype", "jacobian", "metrics"):
            ct.add_column(col, min_width=min(40, max(map(len, names), default=4)) if col == "file" else None)
        for r, file_name in zip(ckpts, names):
            ep = r["epoch_exact"] if r["epoch_exact"] is not None else r["epoch"]
            ct.add_row(str(r["index"]), "" if ep is None else (str(int(ep)) if float(ep).is_integer() else f"{ep:g}"),
                       "" if r["step"] is None else str(r["step"]),
                       file_name, r["sha256"], ",".join(r["dtypes"]), str(r["jacobian_layers"] or ""),
                       ", ".join(f"{k}={v:.4g}" for k, v in r["metrics"].items()))
        c.print(ct)
        if skipped:
            c.print(f"[bold yellow]Skipped {len(skipped)} bad shard(s)[/] (--skip-bad-shards); "
                    "`ibscope capture ... --resume` re-captures truncated or corrupt ones:")
            for b in skipped:
                c.print(f"  {escape(b['file'])}: {escape(b['reason'])}", soft_wrap=True)
