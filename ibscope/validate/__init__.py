"""``ibscope validate``: run the estimators of a results table on tasks with a known answer.

For every (estimator, parameters, quantity, n, dims) of a results table (the information rows,
I(X;T) and I(T;Y)), synthetic tasks of the same n and dims are drawn, the same estimator is
run on them through the registry with the same parameters, and the estimates are compared
with the task's true value over several seeds: ``bias`` = mean estimate − truth, ``rmse`` over
the repeats. Output (written atomically, temporary file then rename)::

    DIR/validation.csv    one row per (key, task): see ibscope.trust.VALIDATION_COLUMNS (nats)
    DIR/validation.png    mean estimate against truth, one panel per estimator setting
    DIR/validation.json   settings, notes (what was subsampled or skipped), results hash, timing

What "truth" means depends on what the estimator estimates (column ``truth``):

* **I(T;Y), discrete Y** (class labels): Shannon I(T;Y) of class-conditional Gaussian mixtures
  (``mixture``, three levels), of a low-dimensional class mixture embedded by tanh(W z + b)
  into the layer's width (``embedding``; injective, so I(T;Y) = I(Z;Y)), and of a Gaussian
  with the layer's class means and within-class covariance (``layer``, when the store is
  reachable). Monte Carlo, error reported. For the KDE estimators the noise they model is part
  of the target: I(T + N(0, σ²I); Y) (exact for the Gaussian tasks; for ``embedding`` the
  noise-free value, an upper bound). For binning, I(T;Y) bounds its binned target from above
  (data processing), so a positive bias against it is at least as large against the binned one.
* **I(X;T), X = sample identity** (binning, KDE): for a deterministic layer I(X;T) = H(T),
  which is log n for any layer with distinct rows: not a useful truth. The tasks instead draw
  the n probe rows from a known *finite population* of activation patterns (``discrete-layer``:
  M random patterns c·tanh(G), three levels of M; ``embedding``: a 2-D latent grid embedded by
  tanh into the layer's width, Gaussian weights; ``layer``: the layer's own rows at the last
  checkpoint, drawn without replacement) and the truth is what the estimator's value stands
  for on that population: binning → the entropy of the binned population H(bin(T)) (the
  estimator's own bin rule applied to the population; exact); KDE → I(X; T + N(0, σ²I)) with X
  uniform over the population (Monte Carlo, error reported); any other estimator → H(T) of the
  population.
* **I(X;T), X = probe inputs**, and I(T;Y) with continuous Y: correlated Gaussians of full rank
  at three levels (``gaussian``, closed form), latent Gaussians embedded by tanh on both sides
  (``embedding``, closed form), and the layer linearised on its inputs (``layer``: X Gaussian
  with the inputs' covariance, T = B X + E with B and the residual covariance fitted on the
  store; closed form).

The three levels span the range of the table's own estimates of that key (see
:func:`target_levels`). Everything is seeded; ``--max-n`` caps the sample count (larger n is
validated at the cap and said so).

Layout: :mod:`ibscope.validate.plan` (the keys of a results table, widths, target levels),
:mod:`ibscope.validate.tasks` (the tasks and their ground truth) and :mod:`ibscope.validate.runner`
(:func:`validate_results`, :func:`summary_lines`). Everything is importable from ``ibscope.validate``.
"""

from __future__ import annotations

from ibscope.validate.plan import (
    DEFAULT_MAX_N,
    DEFAULT_MAX_WIDTHS,
    DEFAULT_REPEATS,
    FAMILIES,
    HY_CAP_ESTIMATORS,
    MC_MIXTURE,
    MC_MIXTURE_TUNE,
    MC_NOISY,
    MC_NOISY_TUNE,
    PAIR,
    POP_MAX_BINNED,
    POP_MAX_NOISY,
    Key,
    LayerRef,
    _dims,
    _priors_from_entropy,
    _store_paths,
    plan_keys,
    target_levels,
    thin_widths,
)
from ibscope.validate.runner import (
    ValidationRun,
    _estimate,
    layer_stats,
    log,
    summary_lines,
    validate_results,
)
from ibscope.validate.tasks import (
    _TUNE_CACHE,
    Task,
    _class_means,
    _codes,
    _Ctx,
    _known,
    _labels,
    _rotation,
    _torch,
    _tune,
    _tune_count,
    _tune_separation,
    binned_entropy,
    gaussian_mi,
    mixture_mi,
    noisy_mi,
    tasks_continuous,
    tasks_identity,
    tasks_labels,
    weighted_entropy,
)

__all__ = [
    "FAMILIES",
    "PAIR",
    "DEFAULT_REPEATS",
    "DEFAULT_MAX_N",
    "DEFAULT_MAX_WIDTHS",
    "MC_MIXTURE",
    "MC_MIXTURE_TUNE",
    "MC_NOISY",
    "MC_NOISY_TUNE",
    "POP_MAX_BINNED",
    "POP_MAX_NOISY",
    "HY_CAP_ESTIMATORS",
    "LayerRef",
    "Key",
    "_dims",
    "_priors_from_entropy",
    "_store_paths",
    "plan_keys",
    "thin_widths",
    "target_levels",
    "_torch",
    "mixture_mi",
    "_TUNE_CACHE",
    "_tune_separation",
    "noisy_mi",
    "_codes",
    "weighted_entropy",
    "binned_entropy",
    "gaussian_mi",
    "_known",
    "Task",
    "_rotation",
    "_class_means",
    "_labels",
    "_tune",
    "_tune_count",
    "_Ctx",
    "tasks_labels",
    "tasks_identity",
    "tasks_continuous",
    "log",
    "layer_stats",
    "ValidationRun",
    "_estimate",
    "validate_results",
    "summary_lines",
]
