"""``ibscope estimate``: activation store(s) -> results table.

For every store x checkpoint x layer T and every chosen estimator:

* kind "pair": I(X;T) with X = the sample identity (integer ids, ``x_source="identity"``:
  binning, KDE) or the stored probe inputs (``"inputs"``: KSG, gaussian, compressed, infonce,
  renyi), and I(T;Y) with Y = the stored labels (integer labels are discrete);
* kind "single": one row with the estimator's own quantity (effective rank, ...);
* kind "jacobian": one row from the layer's stored Jacobian spectra, for the layers that have
  them at some checkpoint.

Training metrics stored with each checkpoint become rows with estimator "metrics" and layer
"-". Rows are written atomically to a CSV (see :mod:`ibscope.results`) with a provenance
sidecar, under the results file's writer lock (:func:`ibscope._locks.writer_lock`): a second
writer waits, then merges its cells into what the first wrote.

**Content keys.** Every row carries a ``key``: :func:`cell_key` of the store's config hash and
probe hash, the checkpoint's sha256, the layer, the estimator, quantity and parameters
(``x_source`` included) and the estimator's code version. An incremental run keeps a row of a
store it is given only while that key still matches the store as it is now; a selected cell
whose row does not match is recomputed. Rows of a given store that no longer match and that
this run does not recompute (other estimators or layers) are dropped, as are rows of its
checkpoints that are no longer in it; rows of stores not given in this run are kept as they
are, with their provenance entries.

**One cell, one failure.** A cell that cannot be estimated for a data reason (the estimator
raises :class:`~ibscope.errors.DataError`: a constant layer, too few samples per class, a
checkpoint without Jacobian spectra ...) gets rows with an empty value and a ``note`` naming
the estimator, quantity, layer and checkpoint and the reason; every other cell is still
computed. ``strict=True`` raises a DataError (exit code 4) after the table is written.
Problems of a whole store (no inputs where X = inputs is needed, no Jacobian spectra at all
for a Jacobian measure, an unknown layer) are errors before anything is computed or written.

Layout: :mod:`ibscope.estimate.cells` (content keys, code versions, null settings, one cell's
computation), :mod:`ibscope.estimate.runner` (:func:`run_estimate`, the plan and the pieces of work)
and :mod:`ibscope.estimate.summary` (saturation and summary lines). Everything is importable from
``ibscope.estimate``; ``__version__`` is read in ``cells`` (code versions) and ``runner`` (provenance).
"""

from __future__ import annotations

from ibscope.estimate.cells import (
    _ARG,
    _OPEN,
    _OPEN_MAX,
    DEFAULT_NULL_PERMUTATIONS,
    FLOAT_LABELS_AS_INT,
    METRICS,
    SUMMARY_NOTES,
    X_SOURCES,
    _cell_elements,
    _cell_key,
    _cell_task,
    _ckpt_id,
    _compute_cell,
    _jsonable,
    _open,
    _open_lock,
    _quantities,
    _reason,
    _specs,
    _worker_store,
    cell_key,
    code_version,
    log,
    metric_unit,
    null_setting,
)
from ibscope.estimate.runner import (
    _by_checkpoint,
    _check_out,
    _jacobian_layers,
    _pieces,
    _Plan,
    _run_cells,
    _store_entry,
    run_estimate,
)
from ibscope.estimate.summary import (
    TRUST_DOC,
    _cap_name,
    saturation_counts,
    saturation_lines,
    summary_lines,
)

__all__ = [
    "log",
    "X_SOURCES",
    "METRICS",
    "SUMMARY_NOTES",
    "metric_unit",
    "code_version",
    "cell_key",
    "DEFAULT_NULL_PERMUTATIONS",
    "FLOAT_LABELS_AS_INT",
    "null_setting",
    "_specs",
    "_ckpt_id",
    "_cell_key",
    "_jsonable",
    "_quantities",
    "_ARG",
    "_reason",
    "_compute_cell",
    "_cell_elements",
    "_open",
    "_OPEN",
    "_OPEN_MAX",
    "_open_lock",
    "_worker_store",
    "_cell_task",
    "_Plan",
    "_jacobian_layers",
    "_store_entry",
    "_check_out",
    "run_estimate",
    "_pieces",
    "_by_checkpoint",
    "_run_cells",
    "TRUST_DOC",
    "_cap_name",
    "saturation_counts",
    "saturation_lines",
    "summary_lines",
]
