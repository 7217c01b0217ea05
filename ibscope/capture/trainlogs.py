"""Training metrics logged beside checkpoints: a Hugging Face Trainer's ``trainer_state.json``
(``log_history``) and a Lightning ``CSVLogger``'s ``metrics.csv``; and the number parsing
(:func:`as_int`, :func:`as_float`) shared with :mod:`ibscope.capture.series`.

For a checkpoint at (epoch, step), each metric's last value logged at or before it (by step,
else epoch). Metric names are those matching :data:`LOGGED_METRIC_RE`.
Unreadable files are skipped with a warning: metrics are a convenience for plots, never a
reason to stop a capture.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import re
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

TRAINER_STATE = "trainer_state.json"


#: names logged by a training framework (CSVLogger, trainer_state.json) kept as metrics
LOGGED_METRIC_RE = re.compile(r"(acc|accuracy|loss|error|err|nll|f1|auroc|auc|precision|recall|perplexity|ppl|"
                              r"mse|mae|rmse|top1|top5)", re.IGNORECASE)


def _scalar(v: Any) -> Any:
    """A one-element tensor or numpy value as a Python number."""
    import numpy as np
    import torch

    if isinstance(v, torch.Tensor) and v.numel() == 1 and not v.dtype.is_complex:
        return v.item()
    if isinstance(v, (np.generic, np.ndarray)) and np.size(v) == 1 and np.asarray(v).dtype.kind in "biuf":
        return np.asarray(v).reshape(()).item()
    return v


def as_int(v: Any) -> int | None:
    v = _scalar(v)
    if isinstance(v, bool):
        return None
    if isinstance(v, int):
        return int(v)
    if isinstance(v, float) and math.isfinite(v) and v.is_integer():
        return int(v)
    if isinstance(v, str) and v.strip().lstrip("-").isdigit():
        return int(v)
    return None


def as_float(v: Any) -> float | None:
    v = _scalar(v)
    if isinstance(v, bool):
        return None
    if isinstance(v, (int, float)) and math.isfinite(float(v)):
        return float(v)
    if isinstance(v, str):
        try:
            f = float(v)
        except ValueError:
            return None
        return f if math.isfinite(f) else None
    return None


def read_trainer_state(folder: Path) -> dict | None:
    """``trainer_state.json`` of a Hugging Face Trainer checkpoint folder, or None."""
    p = folder / TRAINER_STATE
    if not p.is_file():
        return None
    try:
        doc = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        log.warning("Ignoring '%s': not readable JSON (%s).", p, exc)
        return None
    return doc if isinstance(doc, dict) else None


def history_metrics(history: Any, step: int | None) -> dict:
    """From a Trainer ``log_history``: each metric's last value logged at or before ``step``."""
    out: dict[str, float] = {}
    if not isinstance(history, list):
        return out
    entries = [e for e in history if isinstance(e, dict)]
    entries.sort(key=lambda e: as_float(e.get("step")) or 0.0)
    for e in entries:
        s = as_float(e.get("step"))
        if step is not None and s is not None and s > step:
            continue
        for k, v in e.items():
            if k in ("step", "epoch") or not isinstance(k, str) or not LOGGED_METRIC_RE.search(k):
                continue
            if k.endswith(("_runtime", "_per_second")) or k in ("total_flos",):
                continue
            f = as_float(v)
            if f is not None:
                out[k] = f
    return out


_CSV_CACHE: dict[str, tuple[float, list[dict]]] = {}


def _csv_rows(p: Path) -> list[dict]:
    st = p.stat()
    hit = _CSV_CACHE.get(str(p))
    if hit is not None and hit[0] == st.st_mtime:
        return hit[1]
    try:
        with open(p, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        log.warning("Ignoring '%s': not a readable CSV file (%s).", p, exc)
        rows = []
    _CSV_CACHE[str(p)] = (st.st_mtime, rows)
    return rows


def lightning_log_file(path: Path) -> Path | None:
    """A Lightning ``CSVLogger`` file (``metrics.csv``) next to the checkpoint or one folder up
    (``version_0/checkpoints/x.ckpt`` -> ``version_0/metrics.csv``)."""
    for d in (path.parent, path.parent.parent):
        p = d / "metrics.csv"
        if p.is_file():
            return p
    return None


def csv_metrics(p: Path, epoch: int | None, step: int | None) -> dict:
    """Each metric column's last value logged at or before the checkpoint (by step, else epoch)."""
    out: dict[str, float] = {}
    if step is None and epoch is None:
        return out
    for row in _csv_rows(p):
        s, e = as_float(row.get("step")), as_float(row.get("epoch"))
        if step is not None and s is not None:
            if s > step:
                continue
        elif epoch is not None and e is not None and e > epoch:
            continue
        for k, v in row.items():
            if k in ("step", "epoch") or not isinstance(k, str) or not LOGGED_METRIC_RE.search(k):
                continue
            f = as_float(v) if v not in (None, "") else None
            if f is not None:
                out[k] = f
    return out
