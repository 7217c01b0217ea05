"""Out-of-distribution detection on captured activations (``ibscope ood``).

Detectors (fit on in-distribution features, ``score`` = higher means more OOD)::

    from ibscope.ood import MahalanobisDetector, KNNDetector
    det = KNNDetector(k=50).fit(train_feats)         # Sun et al.: L2-normalised, k-th neighbour
    s = det.score(test_feats)                         # numpy (n,), larger = more OOD
    MahalanobisDetector(covariance="ledoit-wolf", class_conditional=True).fit(x, labels)

Metrics (both FPR@95 conventions, named)::

    from ibscope.ood import compute_metrics, bootstrap_ci, threshold_from_validation

The whole pipeline on activation stores, writing ``ood_metrics.json``, ``ood_scores.h5``,
figures and a report::

    from ibscope.ood import run_ood
    run_ood("acts/train", "acts/test", {"noise": "acts/noise"}, "fc2",
            detectors=["mahalanobis", "knn"], reductions=["none", "std+pca:16"], ks=[10, 50],
            out_dir="ood_out")
"""

from __future__ import annotations

from ibscope.ood.detectors import DETECTORS, KNNDetector, MahalanobisDetector, ledoit_wolf, make_detector
from ibscope.ood.features import FeaturePipeline, parse_reduction
from ibscope.ood.metrics import (
    METRICS,
    aupr_in,
    aupr_out,
    auroc,
    bootstrap_ci,
    compute_metrics,
    detection_accuracy,
    flagged_fraction,
    fpr_at_tpr_id_positive,
    fpr_at_tpr_openood,
    threshold_from_validation,
)
from ibscope.ood.runner import JSON_NAME, SCORES_NAME, read_scores, run_ood

__all__ = [
    "DETECTORS", "METRICS", "JSON_NAME", "SCORES_NAME",
    "MahalanobisDetector", "KNNDetector", "make_detector", "ledoit_wolf",
    "FeaturePipeline", "parse_reduction",
    "auroc", "aupr_in", "aupr_out", "fpr_at_tpr_id_positive", "fpr_at_tpr_openood", "detection_accuracy",
    "compute_metrics", "bootstrap_ci", "threshold_from_validation", "flagged_fraction",
    "run_ood", "read_scores",
]
