"""One scored split (test, or an external set): its metrics at the chosen threshold, the border
share of the model's evidence, its curves, and the cases shown with their Grad-CAM maps."""

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import keras
import numpy as np

from pneumonia.config import EvaluateConfig
from pneumonia.evaluation import gallery, gradcam, shortcuts, summary
from pneumonia.evaluation.predictions import Predictions


@dataclass(frozen=True)
class ScoredSplit:
    name: str  # "test" or "external": titles, figure file prefixes, MLflow metric prefixes
    scores: dict[str, Any]  # metrics/<name>.json
    predictions: Predictions
    curves: dict[str, dict[str, list[float]]]
    cases: list[gallery.Case]
    images: np.ndarray  # of the cases
    heatmaps: np.ndarray  # Grad-CAM of the cases

    def tables(self) -> dict[str, tuple[list[str], list[list]]]:
        """The split's tables, {name: (header, rows)} for atomic.write_csv: predictions
        (one row per image), roc, precision_recall, calibration."""
        ood_threshold = self.scores.get("ood", {}).get("threshold")
        columns = {"predictions": summary.predictions_table(self.predictions, self.scores["threshold"], ood_threshold),
                   **self.curves}
        return {name: summary.header_and_rows(table) for name, table in columns.items()}


def score_split(model: keras.Model, tfrecords: Path, name: str, predictions: Predictions, scores: dict[str, Any],
                config: EvaluateConfig) -> ScoredSplit:
    """`scores` (summary.evaluation_scores or external_scores) completed with the shortcut audit,
    and what the figures and the report show of the split."""
    threshold = scores["threshold"]
    scores = summary.finite_or_none(
        {**scores, **shortcuts.border_audit(model, tfrecords, name, predictions, threshold, config.seed)})
    cases = gallery.pick_cases(predictions, threshold, config.images_per_outcome, config.seed)
    images = gallery.load_images(tfrecords, name, cases)
    heatmaps = gradcam.heatmaps(model, images, target_class=[case.predicted for case in cases])
    return ScoredSplit(name, scores, predictions, summary.curves(predictions), cases, images, heatmaps)
