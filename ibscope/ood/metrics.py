"""OOD detection metrics, with every convention named explicitly.

Convention throughout ibscope: a detector's score is **higher = more OOD**. All functions
take the scores of the in-distribution (ID) samples and of the OOD samples separately.

==========================  ==============================================================
``auroc``                   P(score_OOD > score_ID) + 0.5 P(tie) (Mann-Whitney U / n_id n_ood);
                            equals ``sklearn.metrics.roc_auc_score`` with OOD as positive.
``aupr_out``                average precision with **OOD as positive**, ranking by score
                            (``average_precision_score(is_ood, score)``, step-wise, no
                            trapezoid interpolation).
``aupr_in``                 average precision with **ID as positive**, ranking by -score.
``fpr95_id_positive``       Lee et al. 2018 / Sun et al. 2022: threshold t = the smallest
                            score with >= 95 % of ID scores <= t (95 % of ID accepted);
                            value = fraction of OOD with score <= t (OOD wrongly accepted).
``fpr95_openood``           OpenOOD v1.5 (OOD as positive): threshold t = the largest score
                            with >= 95 % of OOD scores >= t (95 % of OOD caught); value =
                            fraction of ID with score >= t (ID wrongly flagged).
``detection_accuracy``      Lee et al.'s DTACC: max over thresholds of
                            0.5 (P(ID <= t) + P(OOD > t)), i.e. best balanced accuracy.
==========================  ==============================================================

``threshold_from_validation`` picks a deployable threshold from ID validation scores only
(never from OOD data); ``flagged_fraction`` reports what share of a set it flags.
"""

from __future__ import annotations

import numpy as np

from ibscope.errors import DataError, UsageError

METRICS = ("auroc", "aupr_in", "aupr_out", "fpr95_id_positive", "fpr95_openood", "detection_accuracy")


def _scores(a, name: str) -> np.ndarray:
    a = np.asarray(a, dtype=np.float64).reshape(-1)
    if a.size == 0:
        raise DataError(f"{name} scores are empty: need at least one sample.")
    if not np.all(np.isfinite(a)):
        raise DataError(f"{name} scores contain {int((~np.isfinite(a)).sum())} non-finite value(s) (NaN or inf).")
    return a


def auroc(id_scores, ood_scores) -> float:
    """Area under the ROC curve, OOD as positive (ties count one half)."""
    s_id, s_ood = _scores(id_scores, "ID"), _scores(ood_scores, "OOD")
    from scipy.stats import rankdata

    ranks = rankdata(np.concatenate([s_id, s_ood]))  # average ranks handle ties
    n_id, n_ood = s_id.size, s_ood.size
    u = ranks[n_id:].sum() - n_ood * (n_ood + 1) / 2.0
    return float(u / (n_id * n_ood))


def average_precision(scores, positive) -> float:
    """Step-wise average precision of ``scores`` (higher = positive) for boolean ``positive``.

    AP = sum_j (R_j - R_{j-1}) P_j over the distinct score thresholds taken from high to low,
    the definition of ``sklearn.metrics.average_precision_score``.
    """
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    positive = np.asarray(positive, dtype=bool).reshape(-1)
    n_pos = int(positive.sum())
    if n_pos == 0:
        raise DataError("Average precision needs at least one positive sample.")
    order = np.argsort(-scores, kind="mergesort")
    s, p = scores[order], positive[order]
    tp = np.cumsum(p)
    fp = np.cumsum(~p)
    # keep the last index of each run of equal scores: one point per distinct threshold
    last = np.r_[np.nonzero(np.diff(s))[0], s.size - 1]
    tp, fp = tp[last], fp[last]
    precision = tp / (tp + fp)
    recall = tp / n_pos
    recall_prev = np.r_[0.0, recall[:-1]]
    return float(np.sum((recall - recall_prev) * precision))


def aupr_out(id_scores, ood_scores) -> float:
    """Average precision with OOD as the positive class (ranking by score)."""
    s_id, s_ood = _scores(id_scores, "ID"), _scores(ood_scores, "OOD")
    return average_precision(np.concatenate([s_id, s_ood]), np.r_[np.zeros(s_id.size, bool), np.ones(s_ood.size, bool)])


def aupr_in(id_scores, ood_scores) -> float:
    """Average precision with ID as the positive class (ranking by -score)."""
    s_id, s_ood = _scores(id_scores, "ID"), _scores(ood_scores, "OOD")
    return average_precision(-np.concatenate([s_id, s_ood]), np.r_[np.ones(s_id.size, bool), np.zeros(s_ood.size, bool)])


def _check_tpr(tpr: float) -> float:
    tpr = float(tpr)
    if not 0.0 < tpr <= 1.0:
        raise UsageError(f"The TPR level must be in (0, 1]. Got {tpr!r}.", hint="Use e.g. --tpr 0.95.")
    return tpr


def fpr_at_tpr_id_positive(id_scores, ood_scores, tpr: float = 0.95) -> float:
    """Lee/Sun FPR@TPR, ID positive: share of OOD accepted when ``tpr`` of ID is accepted.

    Accept means score <= t; t is the smallest ID score with P(ID <= t) >= tpr.
    """
    s_id, s_ood = np.sort(_scores(id_scores, "ID")), _scores(ood_scores, "OOD")
    tpr = _check_tpr(tpr)
    idx = int(np.ceil(tpr * s_id.size - 1e-9)) - 1  # smallest i with (i+1)/n >= tpr
    t = s_id[max(idx, 0)]
    return float(np.mean(s_ood <= t))


def fpr_at_tpr_openood(id_scores, ood_scores, tpr: float = 0.95) -> float:
    """OpenOOD v1.5 FPR@TPR, OOD positive: share of ID flagged when ``tpr`` of OOD is flagged.

    Flag means score >= t; t is the largest OOD score with P(OOD >= t) >= tpr (the first
    ROC point with TPR >= tpr, as ``np.argmax(tpr_list >= 0.95)`` in OpenOOD).
    """
    s_id, s_ood = _scores(id_scores, "ID"), np.sort(_scores(ood_scores, "OOD"))[::-1]
    tpr = _check_tpr(tpr)
    idx = int(np.ceil(tpr * s_ood.size - 1e-9)) - 1
    t = s_ood[max(idx, 0)]
    return float(np.mean(s_id >= t))


def detection_accuracy(id_scores, ood_scores) -> float:
    """max_t 0.5 (P(ID <= t) + P(OOD > t)) over all thresholds (Lee et al. DTACC)."""
    s_id, s_ood = _scores(id_scores, "ID"), _scores(ood_scores, "OOD")
    t = np.unique(np.concatenate([s_id, s_ood]))
    id_sorted, ood_sorted = np.sort(s_id), np.sort(s_ood)
    id_acc = np.searchsorted(id_sorted, t, side="right") / s_id.size        # P(ID <= t)
    ood_acc = 1.0 - np.searchsorted(ood_sorted, t, side="right") / s_ood.size  # P(OOD > t)
    best = float(np.max(0.5 * (id_acc + ood_acc)))
    # t below every score: all flagged as OOD -> 0.5 (0 + 1); covered since max >= 0.5 anyway
    return max(best, 0.5)


def compute_metrics(id_scores, ood_scores, tpr: float = 0.95) -> dict[str, float]:
    """All metrics of the module for one (ID, OOD) pair, keyed by the names in ``METRICS``."""
    return {
        "auroc": auroc(id_scores, ood_scores),
        "aupr_in": aupr_in(id_scores, ood_scores),
        "aupr_out": aupr_out(id_scores, ood_scores),
        "fpr95_id_positive": fpr_at_tpr_id_positive(id_scores, ood_scores, tpr),
        "fpr95_openood": fpr_at_tpr_openood(id_scores, ood_scores, tpr),
        "detection_accuracy": detection_accuracy(id_scores, ood_scores),
    }


def _need(tpr: float, n) -> np.ndarray:
    """Smallest count c with c / n >= tpr (guarded against float round-off)."""
    return np.ceil(tpr * np.asarray(n, dtype=np.float64) - 1e-9)


def metrics_from_counts(c_id: np.ndarray, c_ood: np.ndarray, tpr: float = 0.95) -> dict[str, np.ndarray]:
    """All metrics from per-threshold counts, vectorised over replicates.

    ``c_id``, ``c_ood``: (B, U) counts of ID / OOD samples at each of the U distinct score
    values in ascending order (one row per bootstrap replicate; unit counts give the plain
    metrics). Same definitions as the single-sample functions of this module.
    """
    c_id = np.atleast_2d(np.asarray(c_id, dtype=np.float64))
    c_ood = np.atleast_2d(np.asarray(c_ood, dtype=np.float64))
    n_id = c_id.sum(1, keepdims=True)
    n_ood = c_ood.sum(1, keepdims=True)
    cum_id, cum_ood = np.cumsum(c_id, 1), np.cumsum(c_ood, 1)          # score <= u_j
    below_id = cum_id - c_id                                             # score <  u_j
    rev_id = n_id - below_id                                             # score >= u_j
    rev_ood = n_ood - (cum_ood - c_ood)
    auroc_v = (c_ood * (below_id + 0.5 * c_id)).sum(1) / (n_id[:, 0] * n_ood[:, 0])
    with np.errstate(invalid="ignore", divide="ignore"):
        ap_out = np.where(c_ood > 0, c_ood * rev_ood / (rev_ood + rev_id), 0.0).sum(1) / n_ood[:, 0]
        ap_in = np.where(c_id > 0, c_id * cum_id / (cum_id + cum_ood), 0.0).sum(1) / n_id[:, 0]
    rows = np.arange(c_id.shape[0])
    j_id = np.argmax(cum_id >= _need(tpr, n_id), axis=1)                 # smallest u with P(ID <= u) >= tpr
    fpr_idpos = cum_ood[rows, j_id] / n_ood[:, 0]
    ok = rev_ood >= _need(tpr, n_ood)                                    # largest u with P(OOD >= u) >= tpr
    j_ood = ok.shape[1] - 1 - np.argmax(ok[:, ::-1], axis=1)
    fpr_openood = rev_id[rows, j_ood] / n_id[:, 0]
    dtacc = np.maximum(0.5 * (cum_id / n_id + 1.0 - cum_ood / n_ood).max(1), 0.5)
    return {"auroc": auroc_v, "aupr_in": ap_in, "aupr_out": ap_out, "fpr95_id_positive": fpr_idpos,
            "fpr95_openood": fpr_openood, "detection_accuracy": dtacc}


def bootstrap_ci(id_scores, ood_scores, *, n_boot: int = 200, level: float = 0.95, tpr: float = 0.95,
                 seed: int = 0) -> dict[str, tuple[float, float]]:
    """Percentile bootstrap confidence intervals for every metric.

    ID and OOD samples are resampled independently (stratified), ``n_boot`` times; all
    replicates are evaluated at once by :func:`metrics_from_counts`.
    Returns ``{metric: (low, high)}``; empty when ``n_boot`` is 0.
    """
    if not isinstance(n_boot, (int, np.integer)) or n_boot < 0:
        raise UsageError(f"The number of bootstrap replicates must be an integer >= 0. Got {n_boot!r}.")
    if not 0.0 < level < 1.0:
        raise UsageError(f"The confidence level must be in (0, 1). Got {level!r}.")
    tpr = _check_tpr(tpr)
    if n_boot == 0:
        return {}
    s_id, s_ood = _scores(id_scores, "ID"), _scores(ood_scores, "OOD")
    u, pos = np.unique(np.concatenate([s_id, s_ood]), return_inverse=True)
    p_id, p_ood = pos[: s_id.size], pos[s_id.size:]
    rng = np.random.default_rng(seed)
    lo, hi = (1.0 - level) / 2.0, 1.0 - (1.0 - level) / 2.0
    vals: dict[str, list[np.ndarray]] = {m: [] for m in METRICS}
    step = max(1, int(2_000_000 // max(1, u.size)))                        # bound the (B, U) blocks
    for b0 in range(0, n_boot, step):
        nb = min(step, n_boot - b0)
        off = (np.arange(nb) * u.size)[:, None]
        c_id = np.bincount((off + p_id[rng.integers(0, s_id.size, (nb, s_id.size))]).ravel(),
                           minlength=nb * u.size).reshape(nb, u.size)
        c_ood = np.bincount((off + p_ood[rng.integers(0, s_ood.size, (nb, s_ood.size))]).ravel(),
                            minlength=nb * u.size).reshape(nb, u.size)
        for m, v in metrics_from_counts(c_id, c_ood, tpr).items():
            vals[m].append(v)
    return {m: (float(np.quantile(np.concatenate(v), lo)), float(np.quantile(np.concatenate(v), hi)))
            for m, v in vals.items()}


def threshold_from_validation(val_scores, tpr: float = 0.95) -> float:
    """A threshold t from in-distribution validation scores only: flag a sample when score > t.

    t is the smallest validation score with P(val <= t) >= tpr, so at most 1 - tpr of the
    validation set is flagged. OOD data never enters.
    """
    s = np.sort(_scores(val_scores, "Validation"))
    tpr = _check_tpr(tpr)
    idx = int(np.ceil(tpr * s.size - 1e-9)) - 1
    return float(s[max(idx, 0)])


def flagged_fraction(scores, threshold: float) -> float:
    """Share of ``scores`` strictly above ``threshold`` (flagged as OOD)."""
    s = _scores(scores, "Set")
    return float(np.mean(s > threshold))


def roc_curve_points(id_scores, ood_scores) -> tuple[np.ndarray, np.ndarray]:
    """(FPR, TPR) with OOD positive at every distinct threshold, from (0, 0) to (1, 1)."""
    s_id, s_ood = _scores(id_scores, "ID"), _scores(ood_scores, "OOD")
    t = np.unique(np.concatenate([s_id, s_ood]))[::-1]
    id_sorted, ood_sorted = np.sort(s_id), np.sort(s_ood)
    tpr = 1.0 - np.searchsorted(ood_sorted, t, side="left") / s_ood.size  # P(OOD >= t)
    fpr = 1.0 - np.searchsorted(id_sorted, t, side="left") / s_id.size
    return np.r_[0.0, fpr], np.r_[0.0, tpr]


def pr_curve_points(id_scores, ood_scores) -> tuple[np.ndarray, np.ndarray]:
    """(recall, precision) with OOD positive at every distinct threshold (high to low)."""
    s_id, s_ood = _scores(id_scores, "ID"), _scores(ood_scores, "OOD")
    t = np.unique(np.concatenate([s_id, s_ood]))[::-1]
    id_sorted, ood_sorted = np.sort(s_id), np.sort(s_ood)
    tp = s_ood.size - np.searchsorted(ood_sorted, t, side="left")
    fp = s_id.size - np.searchsorted(id_sorted, t, side="left")
    return tp / s_ood.size, tp / np.maximum(tp + fp, 1)
