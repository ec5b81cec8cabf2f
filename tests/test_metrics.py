"""Tests for pneumonia.evaluation.metrics and .threshold: hand-counted values, scikit-learn agreement,
threshold rules with known answers, bootstrap behaviour and degenerate inputs."""

import math
import warnings

import numpy as np
import pytest
from sklearn.calibration import calibration_curve
from sklearn.metrics import (
    accuracy_score,
    average_precision_score,
    balanced_accuracy_score,
    brier_score_loss,
    f1_score,
    precision_recall_curve,
    precision_score,
    recall_score,
    roc_auc_score,
    roc_curve,
)

from pneumonia.evaluation import metrics as M
from pneumonia.evaluation.metrics import (
    bootstrap_ci,
    calibration_points,
    classification_metrics,
    confusion,
    pr_points,
    roc_points,
)
from pneumonia.evaluation.threshold import choose_threshold
from pneumonia.threshold_rule import parse_threshold_rule

# Ten cases small enough to count by hand (no probability sits on a 0.1 bin edge).
#            ---------- NORMAL (0) ----------   ---- PNEUMONIA (1) ----
Y_HAND = [0, 0, 0, 0, 0, 0, 1, 1, 1, 1]
P_HAND = [0.05, 0.15, 0.25, 0.35, 0.65, 0.75, 0.45, 0.72, 0.85, 0.95]


def synthetic(n, seed, prevalence=0.4):
    """Cases from one fixed distribution: positives score higher on average."""
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < prevalence).astype(int)
    logit = 1.5 * (2 * y - 1) + rng.normal(0, 1.5, n)
    return y, 1 / (1 + np.exp(-logit))


@pytest.fixture
def no_warnings():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        yield


# ---------------------------------------------------------------- point metrics


def test_hand_counted_metrics_at_half():
    m = classification_metrics(Y_HAND, P_HAND, 0.5)
    # Predicted positive: negatives 0.65, 0.75 (fp=2); positives all but 0.45 (tp=3, fn=1).
    assert (m["tp"], m["fp"], m["tn"], m["fn"]) == (3, 2, 4, 1)
    assert all(isinstance(m[k], int) for k in ("tp", "fp", "tn", "fn", "n"))
    assert m["n"] == 10 and m["threshold"] == 0.5
    assert m["accuracy"] == pytest.approx(7 / 10)
    assert m["precision"] == pytest.approx(3 / 5)
    assert m["recall"] == m["sensitivity"] == pytest.approx(3 / 4)
    assert m["specificity"] == pytest.approx(4 / 6)
    assert m["balanced_accuracy"] == pytest.approx((3 / 4 + 4 / 6) / 2)
    assert m["f1"] == pytest.approx(2 * 3 / (2 * 3 + 2 + 1))
    # Positive/negative pairs ranked correctly: 0.45 beats 4 negatives, 0.72 beats 5, others 6.
    assert m["roc_auc"] == pytest.approx((4 + 5 + 6 + 6) / 24)
    # Ranked by score: P P N P N P ... -> precision at each positive 1, 1, 3/4, 4/6.
    assert m["pr_auc"] == pytest.approx((1 + 1 + 3 / 4 + 4 / 6) / 4)
    assert m["brier"] == pytest.approx(np.mean((np.array(P_HAND) - Y_HAND) ** 2))
    assert m["brier"] == pytest.approx(1.6009 / 10)
    # Bins: one case each, except 0.72 (pos) and 0.75 (neg) sharing [0.7, 0.8):
    # sum over bins of |sum(p - y)| = .05+.15+.25+.35+.55+.65+|(.72-1)+.75|+.15+.05 = 2.67.
    assert m["ece"] == pytest.approx(2.67 / 10)


@pytest.mark.parametrize("threshold", [0.0, 0.2, 0.5, 0.8, 1.0])
def test_metrics_match_sklearn(threshold):
    y, p = synthetic(300, seed=1)
    pred = (p >= threshold).astype(int)
    m = classification_metrics(y, p, threshold)
    assert m["accuracy"] == pytest.approx(accuracy_score(y, pred))
    assert m["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y, pred))
    assert m["precision"] == pytest.approx(precision_score(y, pred, zero_division=0))
    assert m["recall"] == pytest.approx(recall_score(y, pred))
    assert m["specificity"] == pytest.approx(recall_score(y, pred, pos_label=0))
    assert m["f1"] == pytest.approx(f1_score(y, pred, zero_division=0))
    assert m["roc_auc"] == pytest.approx(roc_auc_score(y, p))
    assert m["pr_auc"] == pytest.approx(average_precision_score(y, p))
    assert m["brier"] == pytest.approx(brier_score_loss(y, p))
    assert m["tp"] + m["fn"] == y.sum() and m["tn"] + m["fp"] == (1 - y).sum()
    assert m["tp"] + m["fp"] == pred.sum()


def test_ece_matches_calibration_curve():
    y, p = synthetic(500, seed=2)
    # Probabilities exactly on bin edges must land in the same bins as sklearn's.
    p[:11] = np.linspace(0, 1, 11)
    frac_pos, mean_pred = calibration_curve(y, p, n_bins=10, strategy="uniform")
    pts = calibration_points(y, p, n_bins=10)
    np.testing.assert_allclose(pts["mean_predicted"], mean_pred)
    np.testing.assert_allclose(pts["fraction_positive"], frac_pos)
    assert sum(pts["count"]) == 500
    expected = np.sum(np.array(pts["count"]) * np.abs(mean_pred - frac_pos)) / 500
    assert classification_metrics(y, p, 0.5)["ece"] == pytest.approx(expected)


def test_ece_zero_when_calibrated_and_large_when_overconfident():
    # Bin-constant predictions whose value equals the bin's fraction of positives.
    y = [1] + [0] * 3 + [1] * 3 + [0] + [1] * 11 + [0] * 9
    p = [0.25] * 4 + [0.75] * 4 + [0.55] * 20
    assert classification_metrics(y, p, 0.5)["ece"] == pytest.approx(0.0, abs=1e-12)
    # Always 99% sure, right only half the time.
    y = [1, 0] * 50
    p = [0.99] * 50 + [0.01] * 50
    assert classification_metrics(y, p, 0.5)["ece"] == pytest.approx(0.49)


def test_confusion_counts():
    assert confusion([0, 0, 1, 1, 1], [0, 1, 1, 1, 0]) == {"tn": 1, "fp": 1, "fn": 1, "tp": 2}
    assert confusion([0, 0], [0, 0]) == {"tn": 2, "fp": 0, "fn": 0, "tp": 0}


# ----------------------------------------------------------------- degenerate


def test_no_predicted_positives_gives_zero_precision_without_warnings(no_warnings):
    m = classification_metrics(Y_HAND, P_HAND, 0.99)
    assert m["tp"] == m["fp"] == 0
    assert m["precision"] == 0.0 and m["f1"] == 0.0 and m["sensitivity"] == 0.0
    assert m["specificity"] == 1.0


def test_single_class_gives_nan_ranking_metrics_without_warnings(no_warnings):
    m = classification_metrics([0, 0, 0, 0], [0.1, 0.2, 0.7, 0.4], 0.5)
    assert math.isnan(m["roc_auc"]) and math.isnan(m["pr_auc"])
    assert math.isnan(m["sensitivity"]) and math.isnan(m["balanced_accuracy"])
    assert m["specificity"] == pytest.approx(3 / 4)
    assert m["accuracy"] == pytest.approx(3 / 4)
    assert m["precision"] == 0.0
    assert m["brier"] == pytest.approx((0.01 + 0.04 + 0.49 + 0.16) / 4)

    m = classification_metrics([1, 1], [0.9, 0.3], 0.5)
    assert math.isnan(m["roc_auc"]) and math.isnan(m["specificity"])
    assert m["sensitivity"] == 0.5 and m["precision"] == 1.0


@pytest.mark.parametrize(
    "y, p",
    [
        ([0, 1, 2], [0.1, 0.2, 0.3]),  # label not 0/1
        ([0, 1], [0.1, 1.5]),  # not a probability
        ([0, 1], [0.1, float("nan")]),
        ([0, 1, 1], [0.1, 0.2]),  # length mismatch
        ([], []),
    ],
)
def test_bad_inputs_raise(y, p):
    with pytest.raises(ValueError):
        classification_metrics(y, p, 0.5)


def test_bad_threshold_raises():
    with pytest.raises(ValueError, match="threshold"):
        classification_metrics(Y_HAND, P_HAND, 1.5)


def test_curves_need_both_classes():
    for fn in (roc_points, pr_points):
        with pytest.raises(ValueError, match="both"):
            fn([1, 1, 1], [0.2, 0.5, 0.9])


# ----------------------------------------------------------------- thresholds


@pytest.mark.parametrize(
    "rule", [0.5, 0.01, 0.99, np.float64(0.3), "youden", "sensitivity@0.9", "sensitivity@1"]
)
def test_parse_threshold_rule_accepts_valid_forms(rule):
    assert parse_threshold_rule(rule) == rule


@pytest.mark.parametrize(
    "rule",
    [0, 1, 1.5, -0.1, True, None, "Youden", "youdn", "0.5", "sensitivity@0", "sensitivity@1.5",
     "sensitivity@", "sensitivity@abc", "sensitivity@nan", "specificity@0.9"],
)
def test_parse_threshold_rule_rejects_invalid_forms(rule):
    with pytest.raises(ValueError, match=r"youden.*sensitivity@"):
        parse_threshold_rule(rule)
    with pytest.raises(ValueError, match=r"youden.*sensitivity@"):
        choose_threshold(Y_HAND, P_HAND, rule)


def test_fixed_threshold_returned_as_is():
    assert choose_threshold(Y_HAND, P_HAND, 0.37) == 0.37


def test_youden_separates_perfectly_separable_classes():
    neg, pos = [0.1, 0.2, 0.3, 0.35], [0.6, 0.7, 0.8]
    t = choose_threshold([0] * 4 + [1] * 3, neg + pos, "youden")
    assert max(neg) < t <= min(pos)
    m = classification_metrics([0] * 4 + [1] * 3, neg + pos, t)
    assert m["sensitivity"] == 1.0 and m["specificity"] == 1.0


def midway(low, high):
    """Halfway between two scores in log-odds, as choose_threshold places data-driven thresholds."""
    def logit(p):
        return math.log(p / (1 - p))
    return 1 / (1 + math.exp(-(logit(low) + logit(high)) / 2))


def test_youden_hand_example_and_tie_break():
    # J at each candidate of the hand example: 0.95:.25 0.85:.5 0.75:.5-1/6 0.72:.75-1/6
    # 0.65:.75-2/6 0.45:1-2/6 (best, J=2/3) 0.35:1-.5 ...; 0.35 is the next lower score.
    assert choose_threshold(Y_HAND, P_HAND, "youden") == pytest.approx(midway(0.35, 0.45))
    # J = 0.5 at both 0.4 (tpr .5, fpr 0) and 0.2 (tpr 1, fpr .5): the fewer false alarms win.
    assert choose_threshold([0, 1, 0, 1], [0.1, 0.2, 0.3, 0.4], "youden") == pytest.approx(midway(0.3, 0.4))


def test_threshold_sits_midway_in_the_gap_not_on_the_edge_of_the_positives():
    # Perfectly separable: any threshold in (0.3, 0.9] separates; the middle in log-odds is 0.6.
    t = choose_threshold([0, 0, 1, 1], [0.1, 0.3, 0.9, 0.95], "youden")
    assert t == pytest.approx(midway(0.3, 0.9)) and 0.3 < t < 0.9
    # Scores saturated at exactly 0 and 1 still give a threshold strictly between them.
    t = choose_threshold([0, 0, 1, 1], [0.0, 0.0, 1.0, 1.0], "youden")
    assert 0.0 < t <= 1.0 and classification_metrics([0, 0, 1, 1], [0.0, 0.0, 1.0, 1.0], t)["accuracy"] == 1.0


def test_youden_matches_brute_force_on_random_data():
    y, p = synthetic(400, seed=3)
    t = choose_threshold(y, p, "youden")

    def youden_j(s):
        return np.mean(p[y == 1] >= s) + np.mean(p[y == 0] < s) - 1

    assert youden_j(t) == pytest.approx(max(youden_j(s) for s in np.unique(p)))
    below, at_or_above = p[p < t], p[p >= t]
    assert t == pytest.approx(midway(below.max(), at_or_above.min()))


def test_youden_never_returns_infinity():
    # A model that is always wrong has J <= 0 everywhere; sklearn's leading +inf
    # threshold also has J = 0 but is not a usable threshold. The lowest score has no gap below.
    t = choose_threshold([1, 0, 1, 0], [0.2, 0.8, 0.3, 0.9], "youden")
    assert math.isfinite(t) and t == 0.2


def test_sensitivity_rule_picks_best_specificity_meeting_target():
    pos = [0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.65, 0.6, 0.55, 0.2]
    neg = [0.1, 0.3, 0.5, 0.58, 0.62]
    y, p = [1] * 10 + [0] * 5, pos + neg
    # 9 of 10 positives must be caught: the 9th highest positive score is 0.55, the next lower 0.5.
    assert choose_threshold(y, p, "sensitivity@0.9") == pytest.approx(midway(0.5, 0.55))
    assert (classification_metrics(y, p, choose_threshold(y, p, "sensitivity@0.9"))["specificity"]
            == pytest.approx(3 / 5))
    assert choose_threshold(y, p, "sensitivity@0.7") == pytest.approx(midway(0.62, 0.65))  # 7/10 exactly
    assert choose_threshold(y, p, "sensitivity@0.85") == pytest.approx(midway(0.5, 0.55))
    assert choose_threshold(y, p, "sensitivity@1") == pytest.approx(midway(0.1, 0.2))
    assert choose_threshold(y, p, "sensitivity@0.05") == pytest.approx(midway(0.9, 0.95))


def test_data_driven_rules_need_both_classes():
    with pytest.raises(ValueError, match="both"):
        choose_threshold([1, 1], [0.3, 0.6], "youden")


# ------------------------------------------------------------------ bootstrap


def test_bootstrap_contains_point_estimate_and_narrows_with_more_data():
    widths = {}
    for n in (200, 5000):
        y, p = synthetic(n, seed=4)
        ci = bootstrap_ci(y, p, 0.5, n_boot=500, seed=0)
        point = classification_metrics(y, p, 0.5)
        for name, (low, high) in ci.items():
            assert low <= point[name] <= high, (n, name)
        widths[n] = {name: high - low for name, (low, high) in ci.items()}
    for name in widths[200]:
        assert widths[5000][name] < widths[200][name] / 2, name  # ~1/sqrt(25) in theory


def test_bootstrap_matches_a_plain_loop_over_resamples():
    # Reference: the textbook stratified percentile bootstrap, one sklearn call per
    # resample. It draws from the generator as bootstrap_ci does for a single chunk
    # (all positive indices, then all negative ones), so the intervals must agree.
    y, p = synthetic(150, seed=15)
    pos, neg = p[y == 1], p[y == 0]
    rng = np.random.default_rng(3)
    pos_idx = rng.integers(0, len(pos), (60, len(pos)))
    neg_idx = rng.integers(0, len(neg), (60, len(neg)))
    labels = np.r_[np.ones(len(pos)), np.zeros(len(neg))]
    aucs, sens = [], []
    for i, j in zip(pos_idx, neg_idx):
        probs = np.r_[pos[i], neg[j]]
        aucs.append(roc_auc_score(labels, probs))
        sens.append(recall_score(labels, probs >= 0.5))
    got = bootstrap_ci(y, p, 0.5, metrics=("roc_auc", "sensitivity"), n_boot=60, confidence=0.9, seed=3)
    assert got["roc_auc"] == pytest.approx(tuple(np.percentile(aucs, [5, 95])))
    assert got["sensitivity"] == pytest.approx(tuple(np.percentile(sens, [5, 95])))


def test_bootstrap_is_reproducible_with_seed_and_varies_without():
    y, p = synthetic(300, seed=5)
    metrics = ("roc_auc", "sensitivity", "specificity", "accuracy", "ece")
    a = bootstrap_ci(y, p, 0.5, metrics=metrics, n_boot=200, seed=7)
    b = bootstrap_ci(y, p, 0.5, metrics=metrics, n_boot=200, seed=7)
    c = bootstrap_ci(y, p, 0.5, metrics=metrics, n_boot=200, seed=8)
    assert a == b
    assert a != c
    assert set(a) == set(metrics)


def test_bootstrap_wider_at_higher_confidence():
    y, p = synthetic(300, seed=6)
    narrow = bootstrap_ci(y, p, 0.5, n_boot=400, confidence=0.5)
    wide = bootstrap_ci(y, p, 0.5, n_boot=400, confidence=0.99)
    for name in narrow:
        assert wide[name][0] < narrow[name][0] and narrow[name][1] < wide[name][1]


@pytest.mark.parametrize("name", sorted(M._BOOTSTRAP_METRICS))
def test_vectorised_bootstrap_metrics_match_classification_metrics(name):
    # Each row of the resample matrix must score exactly as classification_metrics would.
    y, p = synthetic(120, seed=9)
    pos, neg = p[y == 1], p[y == 0]
    rng = np.random.default_rng(0)
    rows = np.hstack([pos[rng.integers(0, len(pos), (5, len(pos)))],
                      neg[rng.integers(0, len(neg), (5, len(neg)))]])
    labels = np.r_[np.ones(len(pos), int), np.zeros(len(neg), int)]
    got = M._BOOTSTRAP_METRICS[name](len(pos), rows, 0.5)
    expected = [classification_metrics(labels, row, 0.5)[name] for row in rows]
    np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-12)


def test_bootstrap_chunking_does_not_change_statistics(monkeypatch):
    y, p = synthetic(300, seed=10)
    whole = bootstrap_ci(y, p, 0.5, n_boot=300, seed=1)
    monkeypatch.setattr(M, "_BOOT_CELLS_PER_CHUNK", 300 * 7)  # 7 resamples per chunk
    chunked = bootstrap_ci(y, p, 0.5, n_boot=300, seed=1)
    for name in whole:  # different random streams, same distribution
        assert chunked[name] == pytest.approx(whole[name], abs=0.03)


def test_bootstrap_rejects_bad_arguments():
    y, p = synthetic(50, seed=12)
    with pytest.raises(ValueError, match="both"):
        bootstrap_ci([1, 1, 1], [0.2, 0.5, 0.9], 0.5)
    with pytest.raises(ValueError, match="unknown bootstrap metric"):
        bootstrap_ci(y, p, 0.5, metrics=("auc",))
    with pytest.raises(ValueError, match="n_boot"):
        bootstrap_ci(y, p, 0.5, n_boot=0)
    with pytest.raises(ValueError, match="confidence"):
        bootstrap_ci(y, p, 0.5, confidence=95)


# --------------------------------------------------------------------- curves


def test_roc_points_match_sklearn():
    y, p = synthetic(200, seed=13)
    pts = roc_points(y, p)
    fpr, tpr, thr = roc_curve(y, p)
    assert list(pts) == ["fpr", "tpr", "threshold"]
    np.testing.assert_array_equal(pts["fpr"], fpr)
    np.testing.assert_array_equal(pts["tpr"], tpr)
    np.testing.assert_array_equal(pts["threshold"], thr)
    assert pts["fpr"][0] == pts["tpr"][0] == 0 and pts["threshold"][0] == math.inf


def test_pr_points_match_sklearn():
    y, p = synthetic(200, seed=14)
    pts = pr_points(y, p)
    precision, recall, thr = precision_recall_curve(y, p)
    assert list(pts) == ["recall", "precision", "threshold"]
    assert len(pts["recall"]) == len(pts["precision"]) == len(pts["threshold"])
    np.testing.assert_array_equal(pts["recall"], recall)
    np.testing.assert_array_equal(pts["precision"], precision)
    np.testing.assert_array_equal(pts["threshold"][:-1], thr)
    assert pts["threshold"][-1] == math.inf


def test_calibration_points_hand_example():
    pts = calibration_points(Y_HAND, P_HAND, n_bins=10)
    assert list(pts) == ["mean_predicted", "fraction_positive", "count"]
    assert pts["count"] == [1, 1, 1, 1, 1, 1, 2, 1, 1]  # bin [0.5, 0.6) is empty and dropped
    assert pts["mean_predicted"][6] == pytest.approx((0.72 + 0.75) / 2)
    assert pts["fraction_positive"][6] == 0.5
    assert all(isinstance(v, float) for v in pts["mean_predicted"])
