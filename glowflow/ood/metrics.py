"""Metrics of an outlier score (higher = more outlying, outliers the positives): AUROC,
AUPR-in, AUPR-out and the false-positive rate at 95% true-positive rate; and the threshold that
keeps a chosen share of inliers (the detector's decision rule)."""

from __future__ import annotations

import math
import warnings
from typing import Dict, Sequence, Tuple

import numpy as np

from glowflow.errors import GlowflowError


def _clean_pair(scores_in, scores_out) -> Tuple[np.ndarray, np.ndarray]:
    """float64 copies (n_in,), (n_out,) of both sets of scores; NaN and +inf become more outlying
    than every finite score of either set, -inf less (with a warning)."""
    a = np.asarray(scores_in, dtype=np.float64).reshape(-1)
    b = np.asarray(scores_out, dtype=np.float64).reshape(-1)
    both = np.concatenate([a, b])
    bad = ~np.isfinite(both)
    if bad.any():
        warnings.warn(
            f"{int(bad.sum())} non-finite score(s): NaN and +inf ranked most outlying, -inf least",
            RuntimeWarning,
            stacklevel=3,
        )
        finite = both[~bad]
        hi = finite.max() + 1.0 if finite.size else 1.0
        lo = finite.min() - 1.0 if finite.size else -1.0
        both[np.isnan(both) | (both == np.inf)] = hi
        both[both == -np.inf] = lo
        a, b = both[: a.size], both[a.size :]
    return a, b


def fpr_at_tpr(scores_in: np.ndarray, scores_out: np.ndarray, tpr: float = 0.95) -> float:
    """False-positive rate at ``tpr`` true-positive rate (outliers positive, flagged if score >= t),
    from the in-distribution scores (n_in,) and the outlier scores (n_out,).

    The threshold is the strictest one that still catches at least ``tpr`` of the outliers:
    ``t* = max{t : mean(scores_out >= t) >= tpr}``, which is the k-th largest outlier score with
    ``k = ceil(tpr * n_out)``. Ties: every sample whose score equals ``t*`` is flagged, outliers
    and in-distribution samples alike (so the achieved TPR may exceed ``tpr`` when outliers tie at
    ``t*``, and in-distribution samples tied with ``t*`` count as false positives). Returns
    ``mean(scores_in >= t*)``.
    """
    s_in = np.asarray(scores_in, dtype=np.float64).reshape(-1)
    s_out = np.sort(np.asarray(scores_out, dtype=np.float64).reshape(-1))[::-1]
    if s_out.size == 0 or s_in.size == 0:
        raise GlowflowError("FPR at TPR needs at least one in-distribution and one outlier score")
    percent = round(tpr * 100)
    if abs(percent - tpr * 100) < 1e-9:
        k = (percent * s_out.size + 99) // 100  # exact ceil(tpr * n) for whole percentages
    else:
        k = int(math.ceil(tpr * s_out.size - 1e-12))
    k = min(max(k, 1), s_out.size)
    threshold = s_out[k - 1]
    return float(np.mean(s_in >= threshold))


def outlier_metrics(scores_in: Sequence[float], scores_out: Sequence[float]) -> Dict[str, float]:
    """AUROC, AUPR-in, AUPR-out and FPR95 of a score where higher means more outlying, from the
    in-distribution scores (n_in,) and the outlier scores (n_out,).

    * ``auroc``: area under the ROC curve with outliers as positives
      (:func:`sklearn.metrics.roc_auc_score`; ties count one half). 0.5 = chance, 1 = perfect,
      0 = perfectly inverted.
    * ``aupr_out``: average precision with outliers as positives and the score as is.
    * ``aupr_in``: average precision with in-distribution samples as positives and the score
      negated. Both use :func:`sklearn.metrics.average_precision_score`, the step-wise sum
      ``sum_n (R_n - R_{n-1}) P_n`` over the distinct thresholds (tied scores form one step; no
      interpolation). Chance level is the positives' share of the samples.
    * ``fpr95``: :func:`fpr_at_tpr` at 95% (the tie rule is stated there); lower is better.

    Non-finite scores are ranked: NaN and +inf most outlying, -inf least (a warning is issued).
    """
    from sklearn.metrics import average_precision_score, roc_auc_score

    s_in, s_out = _clean_pair(scores_in, scores_out)
    if s_in.size == 0 or s_out.size == 0:
        raise GlowflowError("outlier metrics need at least one in-distribution and one outlier score")
    scores = np.concatenate([s_in, s_out])
    is_out = np.concatenate([np.zeros(s_in.size, dtype=int), np.ones(s_out.size, dtype=int)])
    return {
        "auroc": float(roc_auc_score(is_out, scores)),
        "aupr_in": float(average_precision_score(1 - is_out, -scores)),
        "aupr_out": float(average_precision_score(is_out, scores)),
        "fpr95": fpr_at_tpr(s_in, s_out, 0.95),
    }


def threshold_at_tpr(scores: np.ndarray, tpr: float) -> float:
    """The threshold ``t`` that keeps (``score <= t``) the ``ceil(tpr * n)`` lowest of ``n``
    inlier ``scores`` (higher = more outlying): ``t`` is the ``ceil(tpr * n)``-th smallest, so at
    least ``tpr`` of these images are kept (more only where scores tie at ``t``). A NaN score
    counts as the most outlying."""
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    if s.size == 0:
        raise GlowflowError("setting a threshold needs at least one held-back inlier image")
    check_tpr(tpr)
    s = np.sort(np.where(np.isnan(s), np.inf, s))
    k = min(s.size, max(1, math.ceil(round(tpr * s.size, 9))))
    return float(s[k - 1])


def check_tpr(tpr: float) -> None:
    if not (isinstance(tpr, (int, float)) and not isinstance(tpr, bool) and 0.0 < tpr <= 1.0):
        raise GlowflowError(f"the true-positive rate must be in (0, 1], got {tpr!r}")
