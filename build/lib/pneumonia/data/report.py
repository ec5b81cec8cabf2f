"""The data report: what a model was trained on, in numbers and pictures.

From what the data stages wrote (data/raw/source.json, data/images.csv, data/split_counts.json, the
training manifest, the class weights, the leakage audit): the summary and the figures (for MLflow and
`dvc plots`), which the stage writes into one folder.
"""

from collections import Counter
from pathlib import Path

import numpy as np

from pneumonia import CLASS_NAMES, SPLITS
from pneumonia.data.audit import ImageFacts
from pneumonia.data.images import open_image, to_grey
from pneumonia.data.manifest import Record
from pneumonia.plotting import plt, save_png

SAMPLES_PER_CLASS = 8


def counts(images: list[ImageFacts]) -> dict[str, dict[str, int]]:
    found = Counter((image.kaggle_split, image.label) for image in images)
    return {split: {name: found[split, label] for label, name in enumerate(CLASS_NAMES)} for split in SPLITS}


def _spread(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    return {"min": float(np.min(values)), "median": float(np.median(values)), "max": float(np.max(values))}


def image_statistics(images: list[ImageFacts]) -> dict:
    """Size, colour mode and grayscale intensity of the readable raw files."""
    readable = [image for image in images if not image.error]
    means = np.array([image.mean for image in readable])
    stds = np.array([image.std for image in readable])
    # Pixel-level mean and std over all images (each image weighted equally).
    pixel_mean = float(means.mean()) if readable else 0.0
    pixel_std = float(np.sqrt(np.mean(stds**2 + means**2) - pixel_mean**2)) if readable else 0.0
    return {
        "width": _spread([image.width for image in readable]),
        "height": _spread([image.height for image in readable]),
        "modes": dict(sorted(Counter(image.mode for image in readable).items())),
        "intensity": {"mean": round(pixel_mean, 3), "std": round(pixel_std, 3)},
    }


def data_summary(source: dict, images: list[ImageFacts], data_metrics: dict, class_weights: dict, audit: dict) -> dict:
    return {
        "source": {key: value for key, value in source.items() if key != "images"},
        "images": {"as_shipped": counts(images), "as_used": data_metrics["images"]},
        "unreadable": [{"path": image.path, "error": image.error} for image in images if image.error],
        "raw_images": image_statistics(images),
        "class_weights": {CLASS_NAMES[int(label)]: weight for label, weight in sorted(class_weights.items())},
        "leakage_audit": audit,
    }


def class_distribution_png(images: dict, path: Path) -> None:
    figure, axes = plt.subplots(1, 2, figsize=(9, 3.5), sharey=True)
    for ax, (title, table) in zip(axes, (("as shipped (data/raw)", images["as_shipped"]),
                                         ("as used (train / val re-drawn by patient)", images["as_used"]))):
        x = np.arange(len(SPLITS))
        for offset, name in zip((-0.2, 0.2), CLASS_NAMES):
            heights = [table[split][name] for split in SPLITS]
            bars = ax.bar(x + offset, heights, width=0.4, label=name)
            ax.bar_label(bars, fontsize=8)
        ax.set_xticks(x, SPLITS)
        ax.set_title(title, fontsize=10)
    axes[0].set_ylabel("images")
    axes[0].legend()
    save_png(figure, path)


def image_sizes_png(images: list[ImageFacts], path: Path) -> None:
    figure, ax = plt.subplots(figsize=(5, 4))
    for label, name in enumerate(CLASS_NAMES):
        chosen = [image for image in images if image.label == label and not image.error]
        ax.scatter([i.width for i in chosen], [i.height for i in chosen], s=4, alpha=0.4, label=name)
    ax.set_xlabel("width (px)")
    ax.set_ylabel("height (px)")
    ax.set_title("raw image sizes")
    ax.legend()
    save_png(figure, path)


def intensity_png(images: list[ImageFacts], path: Path) -> None:
    figure, ax = plt.subplots(figsize=(5, 3.5))
    for label, name in enumerate(CLASS_NAMES):
        ax.hist([i.mean for i in images if i.label == label and not i.error], bins=40, alpha=0.5, label=name)
    ax.set_xlabel("mean grayscale intensity of an image (0-255)")
    ax.set_ylabel("images")
    ax.legend()
    save_png(figure, path)


def sample_grid_png(train: list[Record], path: Path) -> None:
    """A few training images per class: the first by content hash, a fixed but arbitrary choice."""
    figure, axes = plt.subplots(len(CLASS_NAMES), SAMPLES_PER_CLASS, figsize=(SAMPLES_PER_CLASS * 1.5, 3.4),
                                squeeze=False)
    for label, name in enumerate(CLASS_NAMES):
        chosen = sorted((r for r in train if r.label == label), key=lambda r: r.sha256)[:SAMPLES_PER_CLASS]
        for ax, record in zip(axes[label], chosen):
            with open_image(record.path) as image:
                image.draft("L", (128, 128))
                ax.imshow(to_grey(image), cmap="gray", vmin=0, vmax=255)
        for ax in axes[label]:
            ax.set_xticks([])
            ax.set_yticks([])
        axes[label][0].set_ylabel(name)
    save_png(figure, path)


def draw_data_figures(folder: Path, report: dict, images: list[ImageFacts], train: list[Record]) -> None:
    """The report's figures as PNG files in `folder`, created (the stage's temporary report folder)."""
    folder.mkdir()
    class_distribution_png(report["images"], folder / "class_distribution.png")
    image_sizes_png(images, folder / "image_sizes.png")
    intensity_png(images, folder / "intensity.png")
    sample_grid_png(train, folder / "sample_grid.png")
