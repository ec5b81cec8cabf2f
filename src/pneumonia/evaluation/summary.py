"""The evaluation's numbers: threshold chosen on validation, test metrics at it and at 0.5 with
bootstrap confidence intervals, and the tables of plots/ (predictions, curves).

A split's scores (reports/evaluation/test.json, external.json) keep the metrics at the chosen
threshold at the top level and nest the rest; metrics/evaluation.json, the columns of `dvc exp show`,
holds only the headline of each. Undefined values (NaN, e.g. ROC AUC of a one-class split) become
null: JSON has no NaN or infinity.
"""

import math
from typing import Any

import numpy as np

from pneumonia import CLASS_NAMES
from pneumonia.config import EvaluateConfig
from pneumonia.errors import PipelineError
from pneumonia.evaluation import metrics
from pneumonia.evaluation.predictions import Predictions
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


def threshold_on_validation(val: Predictions, rule: float | str) -> float:
    """The probability threshold that `rule` picks on the validation predictions."""
    try:
        return metrics.choose_threshold(val.labels, val.probabilities, rule)
    except ValueError as exc:
        raise PipelineError(
            f"params.yaml: evaluate.threshold = {rule!r} cannot be chosen on the validation split ({exc}).\n"
            "Use a fixed number (e.g. `dvc exp run -S evaluate.threshold=0.5`) or a validation split "
            "with both classes (data.val_fraction)."
        ) from None


def split_scores(predictions: Predictions, threshold: float, config: EvaluateConfig, what: str) -> dict[str, Any]:
    """Metrics of a scored split (test, or an external set) at `threshold` (top level) with 95%
    bootstrap intervals, and the same at 0.5."""
    if not 0 < predictions.labels.sum() < len(predictions.labels):
        raise PipelineError(
            f"the {what} has {len(predictions.labels)} images of one class only: ROC, precision-recall and "
            "confidence intervals need both NORMAL and PNEUMONIA images; check its NORMAL/ and PNEUMONIA/ folders."
        )
    labels, probabilities = predictions.labels, predictions.probabilities
    intervals = metrics.bootstrap_ci(labels, probabilities, threshold, metrics=CI_METRICS,
                                     n_boot=config.bootstrap_samples, confidence=CONFIDENCE, seed=config.seed)
    return {
        **metrics.classification_metrics(labels, probabilities, threshold),  # "threshold": the one given
        "threshold_rule": str(config.threshold),
        "ci95": {name: {"low": low, "high": high} for name, (low, high) in intervals.items()},
        AT_DEFAULT: metrics.classification_metrics(labels, probabilities, DEFAULT_THRESHOLD),
    }


def evaluation_scores(val: Predictions, test: Predictions, config: EvaluateConfig) -> dict[str, Any]:
    """The test split's scores: its metrics at the threshold chosen on validation (top level), with
    95% bootstrap intervals, the same at 0.5, and what the threshold gives on validation."""
    threshold = threshold_on_validation(val, config.threshold)
    scores = split_scores(test, threshold, config, "test split (data/raw/test)")
    on_validation = metrics.classification_metrics(val.labels, val.probabilities, threshold)
    return finite_or_none({**scores, "validation": {key: on_validation[key] for key in VALIDATION_KEYS}})


def external_scores(external: Predictions, threshold: float, config: EvaluateConfig, audit: dict) -> dict[str, Any]:
    """The external set's scores: at the threshold chosen on validation, as test is scored."""
    scores = split_scores(external, threshold, config, f"external set (evaluate.external = {config.external!r})")
    return finite_or_none({**scores, "source": config.external, "patients": audit.get("patients"),
                           "input_checks": audit.get("input_checks")})  # DICOM headers outside the intended use


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
               "brier", "ece", "threshold", "border_share", "ood_flagged_share")


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


def ood_summary(scores: np.ndarray, threshold: float) -> dict[str, Any]:
    """How many images of a split the out-of-distribution flag raises at `threshold`."""
    flagged = int(np.sum(scores > threshold))
    return {"ood_flagged_share": flagged / len(scores) if len(scores) else None,
            "ood": {"threshold": threshold, "flagged": flagged, "images": len(scores)}}
