"""Evaluation figures as PNG files, for MLflow (dvc plots renders the CSVs itself)."""

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display on servers and in CI
import matplotlib.pyplot as plt  # noqa: E402

from pneumonia import CLASS_NAMES  # noqa: E402
from pneumonia.atomic import atomic_path  # noqa: E402


def _save(figure, path: Path) -> None:
    with atomic_path(path) as temporary:
        figure.savefig(temporary, format="png", dpi=100, bbox_inches="tight")
    plt.close(figure)


def confusion_matrix_png(counts: dict[str, int], path: Path, title: str) -> None:
    matrix = [[counts["tn"], counts["fp"]], [counts["fn"], counts["tp"]]]
    figure, axes = plt.subplots(figsize=(4, 4))
    axes.imshow(matrix, cmap="Blues")
    for row in range(2):
        for column in range(2):
            axes.text(column, row, matrix[row][column], ha="center", va="center", fontsize=14)
    axes.set_xticks([0, 1], CLASS_NAMES)
    axes.set_yticks([0, 1], CLASS_NAMES)
    axes.set_xlabel("predicted")
    axes.set_ylabel("actual")
    axes.set_title(title)
    _save(figure, path)


def roc_png(fpr: list[float], tpr: list[float], auc: float, path: Path) -> None:
    figure, axes = plt.subplots(figsize=(4, 4))
    axes.plot(fpr, tpr, label=f"ROC AUC {auc:.3f}")
    axes.plot([0, 1], [0, 1], linestyle="--", color="grey")
    axes.set_xlabel("1 - specificity (false positive rate)")
    axes.set_ylabel("sensitivity (true positive rate)")
    axes.legend(loc="lower right")
    _save(figure, path)
