"""Every figure of an evaluation, drawn into one folder, with titles and captions for the report."""

import csv
from pathlib import Path
from typing import Any

import numpy as np

from pneumonia.evaluation import plots
from pneumonia.evaluation.gallery import Case
from pneumonia.evaluation.predictions import Predictions
from pneumonia.evaluation.report import Figure
from pneumonia.evaluation.summary import AT_DEFAULT, DEFAULT_THRESHOLD


def read_history(path: Path) -> dict[str, list[float]]:
    """plots/train_history.csv as {column: values per epoch}."""
    with open(path, newline="") as file:
        rows = list(csv.DictReader(file))
    return {column: [float(row[column]) for row in rows] for column in (rows[0] if rows else {})}


def draw_figures(folder: Path, scores: dict[str, Any], test: Predictions, curves: dict[str, dict[str, list[float]]],
                 history: dict[str, list[float]], cases: list[Case], images: np.ndarray, heatmaps: np.ndarray,
                 gradcam_layer: str) -> list[Figure]:
    threshold, default = scores["threshold"], scores[AT_DEFAULT]
    chosen = f"chosen threshold {threshold:.3f}"
    fixed = f"threshold {DEFAULT_THRESHOLD}"
    figures = [
        Figure("Training curves", folder / "training_curves.png",
               "Loss, accuracy and ROC AUC per epoch on the training and validation splits."),
        Figure("Confusion matrices (test)", folder / "confusion_matrix.png",
               f"Left: at the threshold chosen on validation ({scores['threshold_rule']}); "
               f"right: at {DEFAULT_THRESHOLD}."),
        Figure("ROC curve (test)", folder / "roc.png", "Markers: the operating points of the confusion matrices."),
        Figure("Precision-recall curve (test)", folder / "precision_recall.png",
               "Markers: the operating points of the confusion matrices."),
        Figure("Calibration (test)", folder / "calibration.png",
               "Fraction of pneumonia cases per bin of predicted probability; the diagonal is perfect calibration."),
        Figure("Test images", folder / "test_images.png",
               "Rows by outcome at the chosen threshold: errors are the most confident ones, correct ones are random."),
        Figure("Grad-CAM (test)", folder / "gradcam.png",
               f"Where the model found evidence for the class it predicted (Grad-CAM on layer {gradcam_layer}); "
               "same images as above."),
    ]
    paths = {figure.path.stem: figure.path for figure in figures}

    plots.training_curves_png(history, paths["training_curves"])
    plots.confusion_matrices_png([(f"test, {chosen}", scores), (f"test, {fixed}", default)], paths["confusion_matrix"])
    roc_points = [(chosen, 1 - scores["specificity"], scores["sensitivity"]),
                  (fixed, 1 - default["specificity"], default["sensitivity"])]
    plots.roc_png(curves["roc"], scores["roc_auc"], roc_points, paths["roc"])
    pr_points = [(chosen, scores["sensitivity"], scores["precision"]),
                 (fixed, default["sensitivity"], default["precision"])]
    plots.precision_recall_png(curves["precision_recall"], scores["pr_auc"], float(test.labels.mean()), pr_points,
                               paths["precision_recall"])
    plots.calibration_png(curves["calibration"], test.probabilities, scores["ece"], paths["calibration"])
    plots.image_grid_png(images, cases, "Test images: true and predicted label", paths["test_images"])
    plots.image_grid_png(images, cases, "Grad-CAM: evidence for the predicted class", paths["gradcam"],
                         heatmaps=heatmaps)
    return figures
