"""Every figure of an evaluation, as PNG files: for MLflow, the HTML report and `dvc plots show`. All the
evaluation's matplotlib is here: `draw_figures` draws them all into one folder, with titles and captions for
the report; each `*_png` function draws one figure from plain numbers (no model, no files read) and writes
it atomically.
"""

import csv
import itertools
from pathlib import Path

import numpy as np
from matplotlib.ticker import MaxNLocator

from pneumonia import CLASS_NAMES
from pneumonia.evaluation.report import Figure
from pneumonia.evaluation.scores import AT_DEFAULT, Case, ScoredSplit
from pneumonia.plotting import plt, save_png
from pneumonia.threshold_rule import DEFAULT_THRESHOLD

# Operating points on the curves: (legend label, marker).
POINT_MARKERS = ("o", "s")
TRAINING_CURVES = (("loss", "loss"), ("accuracy", "accuracy"), ("auc", "ROC AUC"))


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
    training_curves_png(history, figure.path)
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
    confusion_matrices_png([(f"{name}, {chosen}", scores), (f"{name}, {fixed}", default)], confusion)
    roc_points = [(chosen, 1 - scores["specificity"], scores["sensitivity"]),
                  (fixed, 1 - default["specificity"], default["sensitivity"])]
    roc_png(split.curves["roc"], scores["roc_auc"], roc_points, roc, name)
    pr_points = [(chosen, scores["sensitivity"], scores["precision"]),
                 (fixed, default["sensitivity"], default["precision"])]
    precision_recall_png(split.curves["precision_recall"], scores["pr_auc"], float(split.predictions.labels.mean()),
                         pr_points, pr, name)
    calibration_png(split.curves["calibration"], split.predictions.probabilities, scores["ece"], calibration, name)
    image_grid_png(split.images, split.cases, f"{name.capitalize()} images: true and predicted label", images)
    image_grid_png(split.images, split.cases, f"Grad-CAM ({name}): evidence for the predicted class", gradcam,
                   heatmaps=split.heatmaps)
    return figures


# ------------------------------------------------------------------------ one figure each


def training_curves_png(history: dict[str, list[float]], path: Path) -> None:
    """Loss, accuracy and AUC per epoch, training and validation (columns as Keras names them)."""
    shown = [(key, title) for key, title in TRAINING_CURVES if key in history]
    figure, axes = plt.subplots(1, len(shown), figsize=(4 * len(shown), 3.2), squeeze=False)
    for ax, (key, title) in zip(axes[0], shown):
        ax.plot(history["epoch"], history[key], marker=".", label="training")
        if f"val_{key}" in history:
            ax.plot(history["epoch"], history[f"val_{key}"], marker=".", label="validation")
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
    figure.tight_layout()
    save_png(figure, path)


def confusion_matrices_png(matrices: list[tuple[str, dict[str, int]]], path: Path) -> None:
    """One confusion matrix per (title, counts of tn/fp/fn/tp), side by side."""
    figure, axes = plt.subplots(1, len(matrices), figsize=(4 * len(matrices), 4), squeeze=False)
    for ax, (title, counts) in zip(axes[0], matrices):
        matrix = np.array([[counts["tn"], counts["fp"]], [counts["fn"], counts["tp"]]])
        ax.imshow(matrix, cmap="Blues", vmin=0)
        for row, column in itertools.product(range(2), range(2)):
            dark = matrix[row, column] > matrix.max() / 2
            ax.text(column, row, matrix[row, column], ha="center", va="center", fontsize=14,
                    color="white" if dark else "black")
        ax.set_xticks([0, 1], CLASS_NAMES)
        ax.set_yticks([0, 1], CLASS_NAMES)
        ax.set_xlabel("predicted")
        ax.set_ylabel("actual")
        ax.set_title(title)
    figure.tight_layout()
    save_png(figure, path)


def _mark_points(ax, points: list[tuple[str, float, float]]) -> None:
    for (label, x, y), marker in zip(points, POINT_MARKERS):
        ax.plot([x], [y], marker=marker, markersize=9, linestyle="none", label=label)


def roc_png(roc: dict[str, list[float]], auc: float, points: list[tuple[str, float, float]], path: Path,
            split: str = "test") -> None:
    """ROC curve with operating points (label, false positive rate, sensitivity) marked."""
    figure, ax = plt.subplots(figsize=(4.5, 4.5))
    ax.plot(roc["fpr"], roc["tpr"], label=f"ROC, AUC {auc:.3f}")
    ax.plot([0, 1], [0, 1], linestyle="--", color="grey", label="chance")
    _mark_points(ax, points)
    ax.set_xlabel("1 - specificity (false positive rate)")
    ax.set_ylabel("sensitivity (true positive rate)")
    ax.set_title(f"ROC curve ({split})")
    ax.legend(loc="lower right", fontsize=8)
    save_png(figure, path)


def precision_recall_png(pr: dict[str, list[float]], average_precision: float, prevalence: float,
                         points: list[tuple[str, float, float]], path: Path, split: str = "test") -> None:
    """Precision-recall curve with operating points (label, sensitivity, precision) marked."""
    figure, ax = plt.subplots(figsize=(4.5, 4.5))
    ax.plot(pr["recall"], pr["precision"], drawstyle="steps-post", label=f"PR, AP {average_precision:.3f}")
    ax.axhline(prevalence, linestyle="--", color="grey", label=f"chance (prevalence {prevalence:.2f})")
    _mark_points(ax, points)
    ax.set_xlabel("recall (sensitivity)")
    ax.set_ylabel("precision (positive predictive value)")
    ax.set_ylim(0, 1.02)
    ax.set_title(f"Precision-recall curve ({split})")
    ax.legend(loc="lower left", fontsize=8)
    save_png(figure, path)


def calibration_png(calibration: dict[str, list[float]], probabilities: np.ndarray, ece: float, path: Path,
                    split: str = "test") -> None:
    """Reliability diagram over a histogram of the predicted probabilities."""
    figure, (curve, histogram) = plt.subplots(2, 1, figsize=(4.5, 5.5), sharex=True,
                                              gridspec_kw={"height_ratios": [3, 1]})
    curve.plot([0, 1], [0, 1], linestyle="--", color="grey", label="perfectly calibrated")
    curve.plot(calibration["mean_predicted"], calibration["fraction_positive"], marker="o",
               label=f"model, ECE {ece:.3f}")
    curve.set_ylabel("fraction with pneumonia")
    curve.set_title(f"Calibration ({split})")
    curve.legend(loc="upper left", fontsize=8)
    histogram.hist(probabilities, bins=np.linspace(0, 1, 11), color="grey")
    histogram.set_xlabel("predicted probability of pneumonia")
    histogram.set_ylabel("images")
    figure.tight_layout()
    save_png(figure, path)


def image_grid_png(images: np.ndarray, cases: list[Case], title: str, path: Path,
                   heatmaps: np.ndarray | None = None) -> None:
    """Images in rows by outcome, captioned with true and predicted label and probability;
    with `heatmaps` (values in [0, 1]) laid over them."""
    rows = list(dict.fromkeys(case.outcome for case in cases))  # outcomes present, in order
    columns = max(sum(case.outcome == row for case in cases) for row in rows) if rows else 1
    figure, axes = plt.subplots(max(len(rows), 1), columns, figsize=(2.3 * columns, 3.2 * max(len(rows), 1)),
                                squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    slots = {row: iter(axes[number]) for number, row in enumerate(rows)}
    for position, case in enumerate(cases):
        ax = next(slots[case.outcome])
        ax.imshow(images[position])
        if heatmaps is not None:  # opacity follows the heat: where there is no evidence, the plain image
            overlay = plt.get_cmap("jet")(heatmaps[position])
            overlay[..., 3] = 0.6 * heatmaps[position]
            ax.imshow(overlay)
        wrong = case.label != case.predicted
        ax.set_title(case.caption, fontsize=7, color="firebrick" if wrong else "black")
    figure.suptitle(title)
    figure.tight_layout()
    save_png(figure, path)
