"""Every figure of an evaluation, drawn into one folder, with titles and captions for the report."""

import csv
from pathlib import Path

from pneumonia.evaluation import plots
from pneumonia.evaluation.report import Figure
from pneumonia.evaluation.scoring import ScoredSplit
from pneumonia.evaluation.summary import AT_DEFAULT
from pneumonia.threshold_rule import DEFAULT_THRESHOLD


def read_history(path: Path) -> dict[str, list[float]]:
    """plots/train_history.csv as {column: values per epoch}."""
    with open(path, newline="") as file:
        rows = list(csv.DictReader(file))
    return {column: [float(row[column]) for row in rows] for column in (rows[0] if rows else {})}


def _share(value: float | None) -> str:
    return "n/a (no heat: the model's evidence is flat)" if value is None else f"{value:.2f}"


def draw_figures(folder: Path, history: dict[str, list[float]], splits: list[ScoredSplit],
                 gradcam_layer: str) -> list[Figure]:
    figure = Figure("Training curves", folder / "training_curves.png",
                    "Loss, accuracy and ROC AUC per epoch on the training and validation splits.")
    plots.training_curves_png(history, figure.path)
    return [figure, *(figure for split in splits for figure in split_figures(folder, split, gradcam_layer))]


def split_figures(folder: Path, split: ScoredSplit, gradcam_layer: str) -> list[Figure]:
    scores, name = split.scores, split.name
    threshold, default = scores["threshold"], scores[AT_DEFAULT]
    chosen = f"chosen threshold {threshold:.3f}"
    fixed = f"threshold {DEFAULT_THRESHOLD}"
    prefix = "" if name == "test" else f"{name}_"  # test keeps the file names it always had
    figures = [
        Figure(f"Confusion matrices ({name})", folder / f"{prefix}confusion_matrix.png",
               f"Left: at the threshold chosen on validation ({scores['threshold_rule']}); "
               f"right: at {DEFAULT_THRESHOLD}."),
        Figure(f"ROC curve ({name})", folder / f"{prefix}roc.png",
               "Markers: the operating points of the confusion matrices."),
        Figure(f"Precision-recall curve ({name})", folder / f"{prefix}precision_recall.png",
               "Markers: the operating points of the confusion matrices."),
        Figure(f"Calibration ({name})", folder / f"{prefix}calibration.png",
               "Fraction of pneumonia cases per bin of predicted probability; the diagonal is perfect calibration."),
        Figure(f"{name.capitalize()} images", folder / f"{name}_images.png",
               "Rows by outcome at the chosen threshold: errors are the most confident ones, correct ones are random."),
        Figure(f"Grad-CAM ({name})", folder / f"{prefix}gradcam.png",
               f"Where the model found evidence for the class it predicted (Grad-CAM on layer {gradcam_layer}); "
               f"same images as above. Share of the heat in the outer {scores['border_band']:.0%} of the image "
               f"over {scores['border_audit_images']} {name} images: {_share(scores['border_share'])} "
               f"(evenly spread heat: {scores['border_share_if_uniform']:.2f})."),
    ]
    confusion, roc, pr, calibration, images, gradcam = (figure.path for figure in figures)
    plots.confusion_matrices_png([(f"{name}, {chosen}", scores), (f"{name}, {fixed}", default)], confusion)
    roc_points = [(chosen, 1 - scores["specificity"], scores["sensitivity"]),
                  (fixed, 1 - default["specificity"], default["sensitivity"])]
    plots.roc_png(split.curves["roc"], scores["roc_auc"], roc_points, roc, name)
    pr_points = [(chosen, scores["sensitivity"], scores["precision"]),
                 (fixed, default["sensitivity"], default["precision"])]
    plots.precision_recall_png(split.curves["precision_recall"], scores["pr_auc"],
                               float(split.predictions.labels.mean()), pr_points, pr, name)
    plots.calibration_png(split.curves["calibration"], split.predictions.probabilities, scores["ece"], calibration,
                          name)
    plots.image_grid_png(split.images, split.cases, f"{name.capitalize()} images: true and predicted label", images)
    plots.image_grid_png(split.images, split.cases, f"Grad-CAM ({name}): evidence for the predicted class", gradcam,
                         heatmaps=split.heatmaps)
    return figures
