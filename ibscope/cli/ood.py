"""`ibscope ood`: Mahalanobis and k-NN out-of-distribution reports from captured activations."""

from __future__ import annotations

from pathlib import Path
from typing import List, Literal, Optional

import typer

from ibscope.cli._common import console, guard, parse_kv, reporter, setup_logging
from ibscope.errors import UsageError


def _parse_ood(items: list[str]) -> dict[str, str]:
    return parse_kv(items, "--ood", form="NAME=STORE", example="noise=stores/noise", nonempty=True,
                    unique="OOD set name")


def _split_list(values: list[str] | None) -> list[str]:
    """Repeated options and comma lists both work: --k 10 --k 50 or --k 10,50."""
    out: list[str] = []
    for v in values or []:
        out += [s.strip() for s in str(v).split(",") if s.strip()]
    return out


def _parse_ints(values: list[str], what: str) -> list[int]:
    out = []
    for v in values:
        try:
            out.append(int(v))
        except ValueError:
            raise UsageError(f"{what} expects integers. Got {v!r}.") from None
    return out


def ood(
    fit: Path = typer.Option(..., "--fit", help="Activation store of the in-distribution data the detectors are fitted on (e.g. the training set)."),
    test: Path = typer.Option(..., "--test", help="Activation store of in-distribution test data (the negatives of every metric)."),
    ood_sets: List[str] = typer.Option(..., "--ood", help="An OOD set as NAME=STORE; repeat for several sets."),
    layer: str = typer.Option(..., "--layer", "-l", help="Layer name in the stores (see `ibscope info STORE`)."),
    out: Path = typer.Option(Path("ood"), "--out", "-o", help="Output directory: ood_metrics.json, ood_scores.h5, figures/, report.md/.html."),
    detector: Optional[List[str]] = typer.Option(None, "--detector", "-d", help="mahalanobis and/or knn (repeat or comma list). Default: both."),
    reduce: Optional[List[str]] = typer.Option(None, "--reduce", "-r", help="Feature preparation, fitted on --fit only; steps joined by '+': none, avgpool, maxpool, std, pca:N, umap:N (e.g. std+pca:16). Repeat for a grid. Default: none."),
    k: Optional[List[str]] = typer.Option(None, "--k", help="k for the k-NN detector (the k-th neighbour); repeat or comma list for a grid. Default: 50."),
    val: Optional[Path] = typer.Option(None, "--val", help="Store of in-distribution validation data for the threshold. Default: hold out --val-frac of --fit."),
    val_frac: float = typer.Option(0.2, "--val-frac", help="Share of --fit held out (not fitted) to set the threshold when no --val is given."),
    checkpoint: str = typer.Option("-1", "--checkpoint", "-c", help="Checkpoint index in the fit store (-1 = last), a comma list, or 'all'."),
    covariance: Literal["auto", "empirical", "ledoit-wolf"] = typer.Option("auto", "--covariance", help="Mahalanobis covariance: empirical (MLE), ledoit-wolf (shrinkage), or auto (ledoit-wolf when n_fit < 10 x dims)."),
    class_conditional: bool = typer.Option(False, "--class-conditional", help="Mahalanobis with one mean per class and a shared covariance (Lee et al.; needs labels); by default one Gaussian (Woodland et al.; --single-gaussian)."),
    single_gaussian: bool = typer.Option(False, "--single-gaussian", hidden=True),  # the default, spelt out
    ridge: float = typer.Option(0.0, "--ridge", help="Explicit ridge for the covariance: eps x mean variance added to the diagonal (0 = none)."),
    normalize: bool = typer.Option(True, "--normalize/--no-normalize", help="L2-normalise features for k-NN (Sun et al.)."),
    backend: Literal["auto", "torch", "faiss"] = typer.Option("auto", "--backend", help="k-NN search: torch (exact, chunked, CPU or GPU), faiss (exact, CPU, if installed), auto (= torch)."),
    search: Literal["auto", "brute", "tree"] = typer.Option("auto", "--search", help="k-NN search: brute (exact brute force), tree (scipy KD-tree, CPU), auto (the tree for <= 8 feature dims on CPU, else brute)."),
    tpr: float = typer.Option(0.95, "--tpr", help="Share of in-distribution validation samples the threshold keeps (and the TPR of the FPR@TPR metrics)."),
    bootstrap: int = typer.Option(200, "--bootstrap", help="Bootstrap replicates for the confidence intervals (0 = none)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the validation hold-out, bootstrap and UMAP."),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda:N for the detectors."),
    memory_limit: str = typer.Option("4GB", "--memory-limit", help="Largest Mahalanobis covariance work allowed (e.g. 4GB); larger is refused with a hint."),
    raw_shape: Optional[str] = typer.Option(None, "--raw-shape", help="Per-sample layer shape C,H,W for avgpool/maxpool when the store does not record it."),
    figures: bool = typer.Option(True, "--figures/--no-figures", help="Write the PNG figures."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar or summary table."),
    skip_bad_shards: bool = typer.Option(False, "--skip-bad-shards", help="Leave out store shards that are truncated, corrupt, incomplete or of another capture (each is named in a warning) instead of stopping with exit code 4."),
) -> None:
    """Score OOD sets against in-distribution test data with Mahalanobis and k-NN detectors.

    Fits each detector on the --fit store's features of --layer (after the --reduce steps, also fitted on --fit only), sets a threshold on in-distribution validation data only (--val, or a held-out --val-frac of --fit), and compares every --ood set with the --test set. Scores: higher = more OOD.

    Reports AUROC, AUPR-In, AUPR-Out, FPR@95TPR in both conventions (fpr95_id_positive: OOD accepted when 95% of ID is accepted, as Lee/Sun; fpr95_openood: ID flagged when 95% of OOD is flagged, as OpenOOD v1.5), detection accuracy, bootstrap intervals, and the share of each set flagged at the threshold.

    Example: ibscope ood --fit acts/train --test acts/test --ood noise=acts/noise --layer fc1 -r none -r std+pca:16 --k 10,50 -o ood_out

    Exit codes: 0 ok, 1 error, 2 bad option or name, 4 bad data (NaN features, dims that differ between stores, too few samples, a truncated, corrupt or foreign store shard unless --skip-bad-shards).
    """
    setup_logging(quiet=quiet)
    from ibscope.ood.runner import JSON_NAME, run_ood

    shape = None
    if raw_shape:
        shape = _parse_ints(_split_list([raw_shape]), "--raw-shape")
    ks = _parse_ints(_split_list(k), "--k") if k else [50]
    chk: str | list[int] = checkpoint
    if class_conditional and single_gaussian:
        raise UsageError("--class-conditional and --single-gaussian exclude each other.")
    doc = run_ood(
        str(fit), str(test), _parse_ood(ood_sets), layer,
        detectors=_split_list(detector) or ["mahalanobis", "knn"], reductions=list(reduce or []) or ["none"], ks=ks,
        val=str(val) if val is not None else None, val_frac=val_frac, checkpoint=chk, covariance=covariance,
        class_conditional=class_conditional, ridge=ridge, normalize=normalize, backend=backend, search=search, tpr=tpr,
        n_bootstrap=bootstrap, seed=seed, device=device, memory_limit=memory_limit, raw_shape=shape,
        out_dir=out, figures=figures, progress=not quiet, reporter=reporter(quiet), skip_bad_shards=skip_bad_shards,
    )
    from ibscope.ood.runner import ckpt_name

    c = console()
    if not quiet:
        from rich import box
        from rich.table import Table

        t = Table(title=f"OOD detection, layer {layer} (higher score = more OOD)", box=box.SIMPLE_HEAD)
        for col in ("configuration", "checkpoint", "OOD set", "AUROC", "FPR95 ID+", "FPR95 OOD+", "flagged"):
            t.add_column(col, overflow="fold", no_wrap=col == "checkpoint")
        for r in doc["results"]:
            cfg = r["detector"] + ("" if r["k"] is None else f" k={r['k']}") + f", {r['reduction']}"
            t.add_row(cfg, ckpt_name(r["epoch"], r["step"], r["checkpoint"]), r["ood_set"], f"{r['auroc']:.3f}",
                      f"{r['fpr95_id_positive']:.3f}", f"{r['fpr95_openood']:.3f}", f"{r['flagged_fraction']:.3f}")
        c.print(t)
        # doc["warnings"] were already logged by run_ood as "Warning: ..." lines (once each)
        c.print("FPR95 ID+: OOD accepted at 95% ID accepted (Lee/Sun); FPR95 OOD+: ID flagged at 95% OOD flagged "
                "(OpenOOD v1.5); flagged: OOD share above the validation threshold.")
        c.print(f"Wrote {Path(out) / JSON_NAME}, {Path(out) / 'ood_scores.h5'} and {len(doc['figures'])} figure(s).")


def register(app) -> None:
    """Add this module's commands to the app."""
    app.command("ood")(guard(ood))
