"""Where each metric is computed: sensitivity, specificity, ROC AUC, ECE and the rest at one threshold,
their bootstrap confidence intervals, and the points of the ROC, precision-recall and calibration
curves, from labels and probabilities only (no files, no params; the threshold is chosen in
threshold.py, a split's scores assembled in scores.py).

Conventions used throughout:

* ``y_true``: 1 = PNEUMONIA (the positive class), 0 = NORMAL.
* ``y_prob``: predicted probability of PNEUMONIA, in [0, 1].
* A case is predicted positive when ``y_prob >= threshold``.

Undefined values are NaN rather than errors or warnings, so one odd split does not
crash an evaluation stage: with a single class present, ``roc_auc``, ``pr_auc`` and
``balanced_accuracy`` are NaN, as is ``sensitivity``/``recall`` without positives and
``specificity`` without negatives. ``precision`` with no predicted positives is 0.0
(scikit-learn's ``zero_division=0`` convention), and so is ``f1`` when it is 0/0.
"""

from __future__ import annotations

import math
import numbers

import numpy as np
from scipy.stats import rankdata
from sklearn.metrics import (
    accuracy_score,
    average_precision_score,
    balanced_accuracy_score,
    brier_score_loss,
    confusion_matrix,
    f1_score,
    precision_recall_curve,
    precision_score,
    recall_score,
    roc_auc_score,
    roc_curve,
)

# --------------------------------------------------------------------------- inputs


def check_inputs(y_true, y_prob) -> tuple[np.ndarray, np.ndarray]:
    """Return (labels as int 0/1, probabilities as float), or raise ValueError."""
    y_true = np.asarray(y_true)
    y_prob = np.asarray(y_prob, dtype=float)
    if y_true.ndim != 1 or y_prob.ndim != 1 or len(y_true) != len(y_prob):
        raise ValueError(
            f"y_true and y_prob must be 1-D and of equal length, "
            f"got shapes {y_true.shape} and {y_prob.shape}"
        )
    if len(y_true) == 0:
        raise ValueError("y_true and y_prob are empty: there is nothing to evaluate")
    if not np.isin(y_true, (0, 1)).all():
        raise ValueError(f"y_true must contain only 0 (NORMAL) and 1 (PNEUMONIA), got {np.unique(y_true)}")
    if not (np.isfinite(y_prob).all() and (y_prob >= 0).all() and (y_prob <= 1).all()):
        raise ValueError("y_prob must be probabilities in [0, 1] (no NaN or inf)")
    return y_true.astype(int), y_prob


def _both_classes(y_true: np.ndarray) -> bool:
    return 0 < y_true.sum() < len(y_true)


def require_both_classes(y_true: np.ndarray, what: str) -> None:
    if not _both_classes(y_true):
        raise ValueError(f"{what} needs both NORMAL (0) and PNEUMONIA (1) cases in y_true")


# -------------------------------------------------------------------------- metrics


def confusion(y_true, y_pred) -> dict[str, int]:
    """Counts of tn, fp, fn, tp for 0/1 labels and 0/1 predictions."""
    # labels=[0, 1] keeps the 2x2 shape even when a class is absent.
    tn, fp, fn, tp = confusion_matrix(y_true, y_pred, labels=[0, 1]).ravel()
    return {"tn": int(tn), "fp": int(fp), "fn": int(fn), "tp": int(tp)}


def _calibration_bins(y_true: np.ndarray, y_prob: np.ndarray, n_bins: int):
    """Per-bin (sum of probabilities, number of positives, count) over equal-width bins.

    Bins are the same as sklearn.calibration.calibration_curve(strategy="uniform"):
    edges 0, 1/n_bins, ..., 1, a probability on an inner edge going to the lower bin.
    """
    if not (isinstance(n_bins, numbers.Integral) and n_bins >= 1):
        raise ValueError(f"n_bins must be a positive integer, got {n_bins!r}")
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    bin_ids = np.searchsorted(edges[1:-1], y_prob)
    sum_prob = np.bincount(bin_ids, weights=y_prob, minlength=n_bins)
    n_positive = np.bincount(bin_ids, weights=y_true, minlength=n_bins)
    count = np.bincount(bin_ids, minlength=n_bins)
    return sum_prob, n_positive, count


def expected_calibration_error(y_true, y_prob, n_bins: int = 10) -> float:
    """ECE: mean |mean predicted - fraction positive| over bins, weighted by bin count."""
    y_true, y_prob = check_inputs(y_true, y_prob)
    sum_prob, n_positive, _ = _calibration_bins(y_true, y_prob, n_bins)
    # count * |sum_prob/count - n_positive/count| == |sum_prob - n_positive|; empty bins add 0.
    return float(np.abs(sum_prob - n_positive).sum() / len(y_true))


def classification_metrics(y_true, y_prob, threshold: float) -> dict[str, float]:
    """All headline metrics at one threshold (see the module docstring for NaN cases)."""
    y_true, y_prob = check_inputs(y_true, y_prob)
    if not (isinstance(threshold, numbers.Real) and 0 <= threshold <= 1):
        raise ValueError(f"threshold must be a number in [0, 1], got {threshold!r}")
    y_pred = (y_prob >= threshold).astype(int)
    both = _both_classes(y_true)
    nan = math.nan

    counts = confusion(y_true, y_pred)
    sensitivity = float(recall_score(y_true, y_pred, pos_label=1, zero_division=nan))
    return {
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "balanced_accuracy": float(balanced_accuracy_score(y_true, y_pred)) if both else nan,
        "precision": float(precision_score(y_true, y_pred, zero_division=0)),
        "recall": sensitivity,
        "sensitivity": sensitivity,
        "specificity": float(recall_score(y_true, y_pred, pos_label=0, zero_division=nan)),
        "f1": float(f1_score(y_true, y_pred, zero_division=0)),
        # Ranking metrics are undefined with one class; sklearn would raise or warn.
        "roc_auc": float(roc_auc_score(y_true, y_prob)) if both else nan,
        "pr_auc": float(average_precision_score(y_true, y_prob)) if both else nan,
        "brier": float(brier_score_loss(y_true, y_prob, labels=[0, 1])),
        "ece": expected_calibration_error(y_true, y_prob, n_bins=10),
        **counts,
        "threshold": float(threshold),
        "n": int(len(y_true)),
    }


# ------------------------------------------------------------------------ bootstrap
#
# Each resample is one row of a matrix of probabilities, positives in the first
# n_pos columns and negatives after them (stratified resampling keeps the class
# counts fixed), so every metric is computed for all rows at once.


def _boot_confusion(n_pos: int, probs: np.ndarray, threshold: float):
    pred = probs >= threshold
    tp = pred[:, :n_pos].sum(axis=1)
    fp = pred[:, n_pos:].sum(axis=1)
    return tp, fp, (probs.shape[1] - n_pos) - fp, n_pos - tp  # tp, fp, tn, fn


def _boot_sensitivity(n_pos, probs, threshold):
    tp, fp, tn, fn = _boot_confusion(n_pos, probs, threshold)
    return tp / (tp + fn)


def _boot_specificity(n_pos, probs, threshold):
    tp, fp, tn, fn = _boot_confusion(n_pos, probs, threshold)
    return tn / (tn + fp)


def _boot_accuracy(n_pos, probs, threshold):
    tp, fp, tn, fn = _boot_confusion(n_pos, probs, threshold)
    return (tp + tn) / probs.shape[1]


def _boot_balanced_accuracy(n_pos, probs, threshold):
    return (_boot_sensitivity(n_pos, probs, threshold) + _boot_specificity(n_pos, probs, threshold)) / 2


def _boot_precision(n_pos, probs, threshold):
    tp, fp, tn, fn = _boot_confusion(n_pos, probs, threshold)
    return np.divide(tp, tp + fp, out=np.zeros(len(tp)), where=(tp + fp) > 0)  # 0/0 -> 0


def _boot_f1(n_pos, probs, threshold):
    tp, fp, tn, fn = _boot_confusion(n_pos, probs, threshold)
    return np.divide(2 * tp, 2 * tp + fp + fn, out=np.zeros(len(tp)), where=(2 * tp + fp + fn) > 0)


def _boot_roc_auc(n_pos, probs, threshold):
    # Mann-Whitney: AUC = (sum of positive ranks - n_pos(n_pos+1)/2) / (n_pos * n_neg),
    # with mid-ranks so ties count 1/2, exactly as roc_auc_score.
    n_neg = probs.shape[1] - n_pos
    ranks = rankdata(probs, axis=1)
    return (ranks[:, :n_pos].sum(axis=1) - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


def _boot_pr_auc(n_pos, probs, threshold):
    # Average precision has no simple closed form over rows; loop over sklearn.
    labels = np.r_[np.ones(n_pos, int), np.zeros(probs.shape[1] - n_pos, int)]
    return np.array([average_precision_score(labels, row) for row in probs])


def _boot_brier(n_pos, probs, threshold):
    labels = np.r_[np.ones(n_pos), np.zeros(probs.shape[1] - n_pos)]
    return ((probs - labels) ** 2).mean(axis=1)


def _boot_ece(n_pos, probs, threshold, n_bins=10):
    # Same bins as _calibration_bins; offset bin ids by row so one bincount does all rows.
    n_rows, n = probs.shape
    labels = np.r_[np.ones(n_pos), np.zeros(n - n_pos)]
    bin_ids = np.searchsorted(np.linspace(0.0, 1.0, n_bins + 1)[1:-1], probs)
    flat = (bin_ids + n_bins * np.arange(n_rows)[:, None]).ravel()
    gap = np.bincount(flat, weights=(probs - labels).ravel(), minlength=n_rows * n_bins)
    return np.abs(gap.reshape(n_rows, n_bins)).sum(axis=1) / n


_BOOTSTRAP_METRICS = {
    "roc_auc": _boot_roc_auc,
    "pr_auc": _boot_pr_auc,
    "sensitivity": _boot_sensitivity,
    "recall": _boot_sensitivity,
    "specificity": _boot_specificity,
    "accuracy": _boot_accuracy,
    "balanced_accuracy": _boot_balanced_accuracy,
    "precision": _boot_precision,
    "f1": _boot_f1,
    "brier": _boot_brier,
    "ece": _boot_ece,
}

# Cells (resamples x cases) per chunk of the resample matrix: ~16 MB of float64, so
# memory stays bounded however big the test set or n_boot.
_BOOT_CELLS_PER_CHUNK = 2_000_000


def bootstrap_ci(
    y_true,
    y_prob,
    threshold: float,
    metrics=("roc_auc", "sensitivity", "specificity", "accuracy"),
    n_boot: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> dict[str, tuple[float, float]]:
    """Percentile bootstrap confidence intervals, {metric: (low, high)}.

    Cases are resampled with replacement within each class, so every resample keeps
    the original numbers of positives and negatives and all metrics stay defined.
    The same inputs and seed give the same intervals.
    """
    y_true, y_prob = check_inputs(y_true, y_prob)
    require_both_classes(y_true, "bootstrap_ci")
    unknown = [m for m in metrics if m not in _BOOTSTRAP_METRICS]
    if unknown:
        raise ValueError(f"unknown bootstrap metric(s) {unknown}; choose from {sorted(_BOOTSTRAP_METRICS)}")
    if not (isinstance(n_boot, numbers.Integral) and n_boot >= 1):
        raise ValueError(f"n_boot must be a positive integer, got {n_boot!r}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence!r}")

    pos, neg = y_prob[y_true == 1], y_prob[y_true == 0]
    rng = np.random.default_rng(seed)
    chunk = max(1, _BOOT_CELLS_PER_CHUNK // len(y_prob))
    values = {m: [] for m in metrics}
    for start in range(0, n_boot, chunk):
        rows = min(chunk, n_boot - start)
        probs = np.hstack([
            pos[rng.integers(0, len(pos), size=(rows, len(pos)))],
            neg[rng.integers(0, len(neg), size=(rows, len(neg)))],
        ])
        for m in metrics:
            values[m].append(_BOOTSTRAP_METRICS[m](len(pos), probs, threshold))

    tail = 100 * (1 - confidence) / 2
    intervals = {}
    for m in metrics:
        low, high = np.percentile(np.concatenate(values[m]), [tail, 100 - tail])
        intervals[m] = (float(low), float(high))
    return intervals


# ---------------------------------------------------------------- curves for plots
#
# Each returns {column: list of floats} in CSV column order, e.g.
#   writer.writerow(cols); writer.writerows(zip(*cols.values()))


def roc_points(y_true, y_prob) -> dict[str, list[float]]:
    """ROC curve: fpr, tpr, threshold. The first row (0, 0) has threshold inf (nobody positive)."""
    y_true, y_prob = check_inputs(y_true, y_prob)
    require_both_classes(y_true, "roc_points")
    fpr, tpr, thresholds = roc_curve(y_true, y_prob)
    return {"fpr": fpr.tolist(), "tpr": tpr.tolist(), "threshold": thresholds.tolist()}


def pr_points(y_true, y_prob) -> dict[str, list[float]]:
    """Precision-recall curve: recall, precision, threshold.

    sklearn's last point (recall 0, precision 1) has no threshold; it gets inf, which
    (as on the ROC curve) means nobody is predicted positive.
    """
    y_true, y_prob = check_inputs(y_true, y_prob)
    require_both_classes(y_true, "pr_points")
    precision, recall, thresholds = precision_recall_curve(y_true, y_prob)
    return {
        "recall": recall.tolist(),
        "precision": precision.tolist(),
        "threshold": np.append(thresholds, np.inf).tolist(),
    }


def calibration_points(y_true, y_prob, n_bins: int = 10) -> dict[str, list[float]]:
    """Reliability diagram: mean_predicted, fraction_positive, count for each non-empty bin."""
    y_true, y_prob = check_inputs(y_true, y_prob)
    sum_prob, n_positive, count = _calibration_bins(y_true, y_prob, n_bins)
    full = count > 0  # empty bins have no mean; sklearn's calibration_curve drops them too
    return {
        "mean_predicted": (sum_prob[full] / count[full]).tolist(),
        "fraction_positive": (n_positive[full] / count[full]).tolist(),
        "count": count[full].tolist(),
    }
