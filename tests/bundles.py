"""Model bundles for tests: the settings and out-of-distribution reference the evaluate stage writes beside a
model, made here for a model a test built or trained (pneumonia.model_settings, pneumonia.ood: the real fitting,
on images the test gives or on smooth random ones)."""

from pathlib import Path

import numpy as np

from pneumonia import CLASS_NAMES, engines, ood
from pneumonia.model_settings import (
    CalibrationSettings,
    ModelSettings,
    OodSettings,
    TrainingData,
    model_digest,
    write_beside,
)
from pneumonia.models.build import load_model


def smooth_images(count: int, size: int, seed: int = 0) -> np.ndarray:
    """uint8 (count, size, size, 3): random low-frequency grey images, a stand-in training set."""
    import tensorflow as tf

    coarse = np.random.default_rng(seed).uniform(0, 255, (count, 4, 4, 1)).astype(np.float32)
    grey = tf.image.resize(coarse, (size, size), method="bilinear").numpy()
    return np.repeat(np.clip(grey, 0, 255).astype(np.uint8), 3, axis=-1)


def write_settings(model_path: Path, threshold: float, jpeg_quality: int = 95, tta_views: int = 1,
                   input_checks: str = "flag", threshold_rule: str = "a test's", images: np.ndarray | None = None,
                   model=None, calibration=None, onnx: bool = True) -> ModelSettings:
    """Settings deciding at `threshold` (on the probability `calibration`, evaluation.calibration, makes) and an OOD
    reference fitted on `images` (every other one; the flag's threshold on the rest), written beside the .keras file
    `model_path` with the model's ONNX graph (as the evaluate stage writes them; without it for `onnx=False`)."""
    model = model or load_model(model_path)
    size = int(model.input_shape[1])
    images = smooth_images(48, size) if images is None else images
    pooled = ood.pooled_features_model(model).predict(images, verbose=0)[1]
    thumbnails = ood.layout(images)
    reference = ood.fit((thumbnails[::2], pooled[::2]), (thumbnails[1::2], pooled[1::2]), 0.05,
                        ood.fine_detail(images[::2]))
    settings = ModelSettings(
        model_sha256=model_digest(model_path), model_name=model.name, class_names=CLASS_NAMES, image_size=size,
        input_norm="per_image", crop=0.0,
        jpeg_quality=jpeg_quality, tta_views=tta_views, threshold=threshold, threshold_rule=threshold_rule,
        input_checks=input_checks,
        calibration=CalibrationSettings(**calibration.as_dict()) if calibration else CalibrationSettings(),
        ood=OodSettings(method=ood.METHOD, threshold=reference.threshold,
                                                   validation_flagged=0.05),
        training_data=TrainingData(source="synthetic", archive_sha256=None, manifests_sha256="0" * 64,
                                   images={"train": len(images)}), git_commit=None)
    write_beside(model_path, settings, reference, engines.onnx_model(model) if onnx else None)
    return settings
