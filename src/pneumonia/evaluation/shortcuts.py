"""The shortcut audit: how much of a model's evidence lies in the image border.

Burned-in markers, collimation edges and corners differ between acquisitions; a model that learned
them scores well on images like its training set and badly on another site's. Grad-CAM over a
seeded sample of a split's images (explaining the class each is predicted at the chosen threshold)
turns that into one number per split: the mean share of heat-map mass in the outer band.
"""

from pathlib import Path

import keras
import numpy as np

from pneumonia.evaluation import gradcam
from pneumonia.evaluation.gallery import images_at
from pneumonia.evaluation.predictions import Predictions

MAX_IMAGES = 400  # Grad-CAM of a seeded sample: a few seconds on a CPU, whatever the split's size


def border_audit(model: keras.Model, tfrecords: Path, split: str, predictions: Predictions, threshold: float,
                 seed: int) -> dict[str, float | int]:
    rng = np.random.default_rng(seed)
    count = len(predictions.labels)
    chosen = np.sort(rng.choice(count, size=min(count, MAX_IMAGES), replace=False)).tolist()
    images = images_at(tfrecords, split, chosen, [predictions.file_names[index] for index in chosen])
    predicted = (predictions.probabilities[chosen] >= threshold).astype(int)
    shares = gradcam.border_share(gradcam.heatmaps(model, images, target_class=predicted))
    band = gradcam.BORDER_BAND
    return {
        "border_share": float(np.nanmean(shares)) if np.isfinite(shares).any() else float("nan"),
        "border_band": band,
        "border_share_if_uniform": round(1 - (1 - 2 * band) ** 2, 4),
        "border_audit_images": int(np.isfinite(shares).sum()),
    }
