"""OOD metrics: against scikit-learn, against hand counts, and against closed forms."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from ibscope.errors import DataError, UsageError
from ibscope.ood import metrics as M


def _pairs(seed: int, ties: bool):
    rng = np.random.default_rng(seed)
    a = rng.standard_normal(300)
    b = rng.standard_normal(200) + 0.8
    if ties:  # coarse rounding creates many ties within and across the sets
        a, b = np.round(a, 1), np.round(b, 1)
    return a, b


@pytest.mark.parametrize("seed,ties", [(0, False), (1, True), (2, True)])
def test_auroc_and_aupr_match_sklearn(seed, ties):
    from sklearn.metrics import average_precision_score, roc_auc_score

    a, b = _pairs(seed, ties)
    y_ood = np.r_[np.zeros(a.size), np.ones(b.size)]
    s = np.r_[a, b]
    # exact definitions on the same data: agreement to float round-off
    assert M.auroc(a, b) == pytest.approx(roc_auc_score(y_ood, s), abs=1e-12)
    assert M.aupr_out(a, b) == pytest.approx(average_precision_score(y_ood, s), abs=1e-12)
    assert M.aupr_in(a, b) == pytest.approx(average_precision_score(1 - y_ood, -s), abs=1e-12)


def _fpr_id_positive_by_hand(a, b, tpr):
    # walk thresholds upwards over the sorted ID scores; stop at the first accepting >= tpr of ID
    for t in np.sort(a):
        if np.sum(a <= t) / a.size >= tpr:
            return np.sum(b <= t) / b.size


def _fpr_openood_by_hand(a, b, tpr):
    # walk thresholds downwards over the sorted OOD scores; stop at the first flagging >= tpr of OOD
    for t in np.sort(b)[::-1]:
        if np.sum(b >= t) / b.size >= tpr:
            return np.sum(a >= t) / a.size


def test_fpr95_small_hand_example():
    ids = np.arange(1.0, 21.0)                       # 20 ID scores 1..20
    ood = np.array([5.0, 18.5, 19.0, 19.5, 25.0])
    # ID positive: 19 of 20 ID (95%) accepted at t = 19; OOD <= 19: {5, 18.5, 19} -> 3/5
    assert M.fpr_at_tpr_id_positive(ids, ood) == pytest.approx(3 / 5)
    # OpenOOD: 95% of 5 OOD means all 5 (ceil 4.75) -> t = 5; ID >= 5: 16 of 20
    assert M.fpr_at_tpr_openood(ids, ood) == pytest.approx(16 / 20)
    # detection accuracy: t = 18 accepts 18/20 ID and flags 4/5 OOD (18.5, 19, 19.5, 25) -> 0.85,
    # better than t = 4 (0.5 (4/20 + 1) = 0.6) or t = 20 (0.5 (1 + 1/5) = 0.6)
    assert M.detection_accuracy(ids, ood) == pytest.approx(0.5 * (18 / 20 + 4 / 5))


@pytest.mark.parametrize("seed,ties", [(3, False), (4, True)])
@pytest.mark.parametrize("tpr", [0.95, 0.9, 0.5])
def test_fpr_matches_direct_count(seed, ties, tpr):
    a, b = _pairs(seed, ties)
    assert M.fpr_at_tpr_id_positive(a, b, tpr) == pytest.approx(_fpr_id_positive_by_hand(a, b, tpr), abs=1e-15)
    assert M.fpr_at_tpr_openood(a, b, tpr) == pytest.approx(_fpr_openood_by_hand(a, b, tpr), abs=1e-15)


def test_detection_accuracy_matches_direct_count():
    a, b = _pairs(5, True)
    best = max(0.5 * (np.mean(a <= t) + np.mean(b > t)) for t in np.r_[np.unique(np.r_[a, b]), -np.inf])
    assert M.detection_accuracy(a, b) == pytest.approx(best, abs=1e-15)


def test_perfect_separation_and_reversed_sign():
    a, b = np.linspace(0, 1, 50), np.linspace(2, 3, 40)
    m = M.compute_metrics(a, b)
    assert m == {"auroc": 1.0, "aupr_in": 1.0, "aupr_out": 1.0, "fpr95_id_positive": 0.0,
                 "fpr95_openood": 0.0, "detection_accuracy": 1.0}
    r = M.compute_metrics(-a, -b)  # OOD now scores lower than ID: the sign-bug symptom
    assert r["auroc"] == 0.0 and r["fpr95_id_positive"] == 1.0 and r["fpr95_openood"] == 1.0


def test_identical_distributions_give_chance_values():
    rng = np.random.default_rng(6)
    a, b = rng.standard_normal(20000), rng.standard_normal(20000)
    m = M.compute_metrics(a, b)
    # n = 20,000 each: SE(AUROC) = sqrt(1/12 (1/n + 1/n)) = 0.0029; SE(FPR95) ~ sqrt(.95*.05/n)*sqrt(2) = 0.0022
    assert m["auroc"] == pytest.approx(0.5, abs=0.012)
    assert m["fpr95_id_positive"] == pytest.approx(0.95, abs=0.01)
    assert m["fpr95_openood"] == pytest.approx(0.95, abs=0.01)
    assert m["aupr_out"] == pytest.approx(0.5, abs=0.015)


def test_gaussian_shift_matches_closed_form():
    # ID N(0,1) vs OOD N(delta,1) with score = x: AUROC = Phi(delta / sqrt 2);
    # FPR95 (ID positive) = P(OOD <= z_.95) = Phi(z_.95 - delta); OpenOOD = P(ID >= delta - z_.95) = Phi(z_.95 - delta)
    rng = np.random.default_rng(7)
    delta, n = 1.5, 40000
    a, b = rng.standard_normal(n), rng.standard_normal(n) + delta
    z = stats.norm.ppf(0.95)
    m = M.compute_metrics(a, b)
    # SE(AUROC) ~ 0.002 and SE(FPR) ~ 0.004 at n = 40,000: tolerances are about 3-4 SE
    assert m["auroc"] == pytest.approx(stats.norm.cdf(delta / np.sqrt(2)), abs=0.008)
    assert m["fpr95_id_positive"] == pytest.approx(stats.norm.cdf(z - delta), abs=0.012)
    assert m["fpr95_openood"] == pytest.approx(stats.norm.cdf(z - delta), abs=0.012)
    # best balanced accuracy at t = delta / 2: Phi(delta / 2)
    assert m["detection_accuracy"] == pytest.approx(stats.norm.cdf(delta / 2), abs=0.008)


def test_vectorised_counts_equal_plain_metrics_with_ties():
    for seed in range(4):
        a, b = _pairs(10 + seed, ties=True)
        u, pos = np.unique(np.r_[a, b], return_inverse=True)
        ci = np.bincount(pos[: a.size], minlength=u.size)
        co = np.bincount(pos[a.size:], minlength=u.size)
        for tpr in (0.95, 0.8):
            plain = M.compute_metrics(a, b, tpr)
            vec = {k: float(v[0]) for k, v in M.metrics_from_counts(ci, co, tpr).items()}
            for k in plain:
                assert vec[k] == pytest.approx(plain[k], abs=1e-12), k


def test_bootstrap_interval_covers_truth_and_has_the_right_width():
    rng = np.random.default_rng(8)
    n = 600
    a, b = rng.standard_normal(n), rng.standard_normal(n) + 1.0
    ci = M.bootstrap_ci(a, b, n_boot=400, seed=0)
    truth = stats.norm.cdf(1.0 / np.sqrt(2))                      # 0.7602
    lo, hi = ci["auroc"]
    assert lo < truth < hi
    # Hanley & McNeil (1982) standard error of the AUROC; the 95% interval spans ~ 2 x 1.96 SE.
    A = truth
    q1, q2 = A / (2 - A), 2 * A * A / (1 + A)
    se = np.sqrt((A * (1 - A) + (n - 1) * (q1 - A * A) + (n - 1) * (q2 - A * A)) / (n * n))
    assert (hi - lo) == pytest.approx(2 * 1.96 * se, rel=0.25)   # bootstrap noise with 400 replicates ~ 10%
    point = M.compute_metrics(a, b)
    for k, (l, h) in ci.items():
        assert l <= point[k] + 1e-9 and point[k] - 1e-9 <= h, k
    assert M.bootstrap_ci(a, b, n_boot=0) == {}


def test_threshold_from_validation_only():
    val = np.arange(100.0)
    t = M.threshold_from_validation(val, 0.95)
    assert t == 94.0                                               # 95 of 100 values are <= 94
    assert M.flagged_fraction(val, t) == pytest.approx(0.05)      # 95..99 flagged
    assert M.flagged_fraction(np.array([93.0, 94.0, 94.5, 200.0]), t) == pytest.approx(0.5)


def test_curves_start_and_end_at_corners_and_integrate_to_auroc():
    a, b = _pairs(9, ties=True)
    fpr, tpr = M.roc_curve_points(a, b)
    assert (fpr[0], tpr[0], fpr[-1], tpr[-1]) == (0.0, 0.0, 1.0, 1.0)
    assert np.trapezoid(tpr, fpr) == pytest.approx(M.auroc(a, b), abs=1e-12)  # trapezoid = ties count 1/2
    rec, prec = M.pr_curve_points(a, b)
    assert rec[-1] == 1.0 and prec[-1] == pytest.approx(b.size / (a.size + b.size))


def test_bad_scores_and_options_are_refused():
    with pytest.raises(DataError, match="non-finite"):
        M.auroc([0.1, np.nan], [1.0])
    with pytest.raises(DataError, match="empty"):
        M.auroc([], [1.0])
    with pytest.raises(UsageError, match="TPR level must be in"):
        M.fpr_at_tpr_id_positive([0.0, 1.0], [2.0], tpr=1.5)
    with pytest.raises(UsageError, match="bootstrap"):
        M.bootstrap_ci([0.0, 1.0], [2.0], n_boot=-1)
