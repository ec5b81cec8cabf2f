"""A scored split (test, or the external set): its metrics at the threshold chosen on validation (top level)
with 95% bootstrap intervals, the same at 0.5, the border audit and out-of-distribution share; the tables of
plots/ (predictions, curves), and the cases shown with their Grad-CAM maps. The numbers themselves are
computed in metrics.py, the threshold chosen in threshold.py.

A split's scores (reports/evaluation/test.json, external.json) keep the metrics at the chosen
threshold at the top level and nest the rest; metrics/evaluation.json, the columns of `dvc exp show`,
holds only the headline of each. Undefined values (NaN, e.g. ROC AUC of a one-class split) become
null: JSON has no NaN or infinity.
"""

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import keras
import numpy as np

from pneumonia import CLASS_NAMES
from pneumonia.errors import PipelineError
from pneumonia.evaluation import gradcam, metrics
from pneumonia.evaluation.predictions import Predictions, images_at
from pneumonia.threshold_rule import DEFAULT_THRESHOLD

AT_DEFAULT = "at_0.5"  # a split's scores' key of the metrics at the conventional 0.5
CI_METRICS = ("roc_auc", "sensitivity", "specificity", "accuracy")
CONFIDENCE = 0.95
VALIDATION_KEYS = ("sensitivity", "specificity", "accuracy", "roc_auc", "n")


def finite_or_none(value: Any) -> Any:
    """`value` with every NaN or infinite float (also nested) replaced by None."""
    if isinstance(value, dict):
        return {key: finite_or_none(inner) for key, inner in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_none(inner) for inner in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def split_scores(predictions: Predictions, threshold: float, rule: float | str, what: str, bootstrap_samples: int,
                 seed: int) -> dict[str, Any]:
    """Metrics of a scored split (test, or an external set) at `threshold`, chosen by `rule`, (top level) with
    95% bootstrap intervals over `bootstrap_samples` resamples, and the same at 0.5."""
    if not 0 < predictions.labels.sum() < len(predictions.labels):
        raise PipelineError(
            f"the {what} has {len(predictions.labels)} images of one class only: ROC, precision-recall and "
            "confidence intervals need both NORMAL and PNEUMONIA images; check its NORMAL/ and PNEUMONIA/ folders."
        )
    labels, probabilities = predictions.labels, predictions.probabilities
    intervals = metrics.bootstrap_ci(labels, probabilities, threshold, metrics=CI_METRICS,
                                     n_boot=bootstrap_samples, confidence=CONFIDENCE, seed=seed)
    return {
        **metrics.classification_metrics(labels, probabilities, threshold),  # "threshold": the one given
        "threshold_rule": str(rule),
        "ci95": {name: {"low": low, "high": high} for name, (low, high) in intervals.items()},
        AT_DEFAULT: metrics.classification_metrics(labels, probabilities, DEFAULT_THRESHOLD),
    }


def evaluation_scores(val: Predictions, test: Predictions, threshold: float, rule: float | str,
                      bootstrap_samples: int, seed: int) -> dict[str, Any]:
    """The test split's scores: its metrics at the `threshold` `rule` chose on validation (top level), with
    95% bootstrap intervals, the same at 0.5, and what the threshold gives on validation."""
    scores = split_scores(test, threshold, rule, "test split (data/raw/test)", bootstrap_samples, seed)
    on_validation = metrics.classification_metrics(val.labels, val.probabilities, threshold)
    return finite_or_none({**scores, "validation": {key: on_validation[key] for key in VALIDATION_KEYS}})


def external_scores(external: Predictions, threshold: float, rule: float | str, source: str, audit: dict,
                    bootstrap_samples: int, seed: int) -> dict[str, Any]:
    """The external set's scores (`source`: evaluate.external; `audit`: the external stage's): at the threshold
    chosen on validation, as test is scored."""
    scores = split_scores(external, threshold, rule, f"external set (evaluate.external = {source!r})",
                          bootstrap_samples, seed)
    return finite_or_none({**scores, "source": source, "patients": audit.get("patients"),
                           "input_checks": audit.get("input_checks")})  # images outside the intended use


def ood_summary(scores: np.ndarray, threshold: float, mirror_log_odds: np.ndarray, blurred: np.ndarray,
                noisy: np.ndarray) -> dict[str, Any]:
    """How many images of a split the out-of-distribution flag raises at `threshold`; the mirror check
    (pneumonia.ood.MirrorCheck, its `mirror_log_odds`) as they are and once mirrored left to right (mirroring
    negates the log-odds); the detail check's flags (pneumonia.ood.DetailCheck)."""
    flagged = int(np.sum(scores > threshold))
    mirrored, once_mirrored = int(np.sum(mirror_log_odds < 0)), int(np.sum(mirror_log_odds > 0))
    detail_flagged = int(np.sum(blurred | noisy))

    def share(count: int) -> float | None:
        return count / len(scores) if len(scores) else None

    return {"ood_flagged_share": share(flagged),
            "ood": {"threshold": threshold, "flagged": flagged, "images": len(scores)},
            "mirror_flagged_share": share(mirrored),
            "mirror": {"flagged": mirrored, "flagged_once_mirrored": once_mirrored, "images": len(scores)},
            "detail_flagged_share": share(detail_flagged),
            "detail": {"blurred": int(np.sum(blurred)), "noisy": int(np.sum(noisy)), "images": len(scores)}}


# What `dvc exp show` compares of each split: its columns test.roc_auc, ..., external.accuracy (distinct names:
# the same key in two metrics files would be shown as metrics/test.json:roc_auc, too wide for one screen).
HEADLINE_KEYS = ("roc_auc", "sensitivity", "specificity", "accuracy", "ece")


def headline(test: dict[str, Any], external: dict[str, Any] | None) -> dict[str, Any]:
    """metrics/evaluation.json: the threshold chosen on validation, the test-time views each probability is
    the mean of (evaluate.tta_views) and the headline metrics of each split at it; no "external" without an
    external set."""
    splits = {"test": test, **({"external": external} if external else {})}
    return {"threshold": test["threshold"], "tta_views": test.get("tta_views", 1),
            **{name: {key: scores[key] for key in HEADLINE_KEYS} for name, scores in splits.items()}}


# What a split contributes to the MLflow run's metrics: the headline numbers and the 95% intervals of
# CI_METRICS, so the compare view lists a few dozen meaningful columns. The rest (counts, metrics at
# 0.5, validation) stays in reports/evaluation/<split>.json, logged as an artifact of the run.
MLFLOW_KEYS = ("roc_auc", "pr_auc", "sensitivity", "specificity", "precision", "accuracy", "balanced_accuracy", "f1",
               "brier", "ece", "threshold", "border_share", "ood_flagged_share", "mirror_flagged_share",
               "detail_flagged_share")


def mlflow_metrics(scores: dict[str, Any], prefix: str = "test") -> dict[str, float]:
    """The headline numbers of `scores` for MLflow: test_roc_auc, ..., test_ci95_roc_auc_low, ..."""
    flat = {f"{prefix}_{key}": float(scores[key]) for key in MLFLOW_KEYS if scores.get(key) is not None}
    for name, interval in scores.get("ci95", {}).items():
        flat.update({f"{prefix}_ci95_{name}_{end}": float(value)
                     for end, value in interval.items() if value is not None})
    return flat


# -------------------------------------------------------------- the tables of plots/ and their curves


def predictions_table(scored: Predictions, threshold: float, ood_threshold: float | None = None) -> dict[str, list]:
    """One row per image, class names as labels, at the chosen threshold and at 0.5; with out-of-distribution
    scores, each with its flag at `ood_threshold`."""

    def names(flags):
        return [CLASS_NAMES[int(flag)] for flag in flags]

    return {
        "file_name": scored.file_names,
        "actual": names(scored.labels),
        "predicted": names(scored.probabilities >= threshold),
        "predicted_at_0_5": names(scored.probabilities >= DEFAULT_THRESHOLD),
        "probability": [f"{p:.6f}" for p in scored.probabilities],
        **({} if scored.ood_scores is None else {
            "ood_score": [f"{score:.4f}" for score in scored.ood_scores],
            "out_of_distribution": [bool(score > ood_threshold) for score in scored.ood_scores]}),
    }


def curves(scored: Predictions) -> dict[str, dict[str, list[float]]]:
    """ROC, precision-recall and calibration points, {name: {column: values}}.

    The curves' "nobody positive" end has threshold infinity: its threshold is written as 1.0,
    the probability above which nothing can lie, so the CSVs hold only finite numbers.
    """
    roc = metrics.roc_points(scored.labels, scored.probabilities)
    pr = metrics.pr_points(scored.labels, scored.probabilities)
    calibration = metrics.calibration_points(scored.labels, scored.probabilities)
    for curve in (roc, pr):
        curve["threshold"] = np.minimum(curve["threshold"], 1.0).tolist()
    return {"roc": roc, "precision_recall": pr, "calibration": calibration}


def header_and_rows(columns: dict[str, list]) -> tuple[list[str], list[list]]:
    """{column: values} as (header, rows) for atomic.write_csv."""
    return list(columns), [list(row) for row in zip(*columns.values())]


# ------------------------------------------------------ the cases shown, with their Grad-CAM maps
#
# A few of each outcome: errors are the most confident ones (what most needs a radiologist's look);
# correct answers are drawn at random (what the model typically gets right), reproducibly from the seed.

# (name, actual label, predicted label), in the order the figures show them.
OUTCOMES = (
    ("true positive", 1, 1),
    ("false negative", 1, 0),
    ("true negative", 0, 0),
    ("false positive", 0, 1),
)


@dataclass(frozen=True)
class Case:
    index: int  # position in the split, in file order
    file_name: str
    label: int
    predicted: int
    probability: float  # of pneumonia
    outcome: str

    @property
    def caption(self) -> str:
        return (f"{self.outcome}\ntrue {CLASS_NAMES[self.label]}, predicted {CLASS_NAMES[self.predicted]}\n"
                f"p(pneumonia) = {self.probability:.3f}")


def pick_cases(predictions: Predictions, threshold: float, per_outcome: int, seed: int) -> list[Case]:
    """Up to `per_outcome` cases of each outcome at `threshold`, outcome by outcome."""
    predicted = (predictions.probabilities >= threshold).astype(int)
    rng = np.random.default_rng(seed)
    cases = []
    for outcome, label, guess in OUTCOMES:
        members = np.flatnonzero((predictions.labels == label) & (predicted == guess))
        if label != guess:  # most confidently wrong first
            confidence = np.abs(predictions.probabilities[members] - threshold)
            chosen = members[np.argsort(-confidence, kind="stable")[:per_outcome]]
        else:
            chosen = np.sort(rng.choice(members, size=min(per_outcome, len(members)), replace=False))
        cases += [Case(int(i), predictions.file_names[i], label, guess, float(predictions.probabilities[i]), outcome)
                  for i in chosen]
    return cases


def load_images(tfrecords: Path, split: str, cases: list[Case]) -> np.ndarray:
    """The images of `cases` as uint8 (n, height, width, 3), in the order of `cases`."""
    return images_at(tfrecords, split, [case.index for case in cases], [case.file_name for case in cases])


# ------------------------------------------------------------------------------ the scored split


@dataclass(frozen=True)
class ScoredSplit:
    name: str  # "test" or "external": titles, figure file prefixes, MLflow metric prefixes
    scores: dict[str, Any]  # metrics/<name>.json
    predictions: Predictions
    curves: dict[str, dict[str, list[float]]]
    cases: list[Case]
    images: np.ndarray  # of the cases
    heatmaps: np.ndarray  # Grad-CAM of the cases

    def tables(self) -> dict[str, tuple[list[str], list[list]]]:
        """The split's tables, {name: (header, rows)} for atomic.write_csv: predictions
        (one row per image), roc, precision_recall, calibration."""
        ood_threshold = self.scores.get("ood", {}).get("threshold")
        columns = {"predictions": predictions_table(self.predictions, self.scores["threshold"], ood_threshold),
                   **self.curves}
        return {name: header_and_rows(table) for name, table in columns.items()}


def score_split(model: keras.Model, tfrecords: Path, name: str, predictions: Predictions, scores: dict[str, Any],
                seed: int, images_per_outcome: int) -> ScoredSplit:
    """`scores` (evaluation_scores or external_scores) completed with the shortcut audit, and what the figures
    and the report show of the split: `images_per_outcome` cases of each outcome with their Grad-CAM maps."""
    threshold = scores["threshold"]
    scores = finite_or_none({**scores, **gradcam.border_audit(model, tfrecords, name, predictions, threshold, seed)})
    cases = pick_cases(predictions, threshold, images_per_outcome, seed)
    images = load_images(tfrecords, name, cases)
    heatmaps = gradcam.heatmaps(model, images, target_class=[case.predicted for case in cases])
    return ScoredSplit(name, scores, predictions, curves(predictions), cases, images, heatmaps)
