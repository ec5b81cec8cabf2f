"""A trained model as it is used on images: the preprocessing of training, the model's probability
of pneumonia, and the label at the decision threshold of the model's run.

Shared by `pneumonia predict` (pneumonia.inference) and the served MLflow model (pneumonia.serving),
so both give the probability the evaluate stage gave the same image.
"""

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np

from pneumonia import CLASS_NAMES
from pneumonia.data.images import encode_jpeg, load_resized
from pneumonia.errors import PipelineError
from pneumonia.evaluation.calibration import UNCALIBRATED, Calibration
from pneumonia.evaluation.predictions import pneumonia_probability
from pneumonia.models.build import load_model

BATCH_SIZE = 32  # images a forward pass: bounds memory whatever the number of files


def model_input(source: bytes | str | Path, image_size: int, jpeg_quality: int) -> np.ndarray:
    """An encoded image (bytes) or image file as training saw its images: uint8 (size, size, 3).

    The exact path of a training image: load_resized, the JPEG re-encode of the TFRecords writer
    at tfrecords.jpeg_quality, and TensorFlow's JPEG decoder as in data.dataset (PIL's decoder
    differs from it by up to ~14 grey levels: another IDCT). So a test image gets exactly the
    probability the evaluate stage gave it.
    """
    import tensorflow as tf

    image = load_resized(source if isinstance(source, bytes) else str(source), image_size)
    return tf.io.decode_jpeg(encode_jpeg(image, jpeg_quality), channels=3).numpy()


@dataclass(frozen=True)
class Classifier:
    """A trained Keras model with the preprocessing and the decision threshold of its run."""

    model: object  # keras.Model: plain [0, 255] RGB in, a sigmoid or [NORMAL, PNEUMONIA] softmax out
    threshold: float
    jpeg_quality: int
    tta_views: int = 1  # each probability the mean over this many views of the image (evaluate.tta_views)
    calibration: Calibration = UNCALIBRATED  # fitted on validation by the evaluate stage; the threshold is on it

    @cached_property
    def predictor(self):
        """The model as the evaluate stage predicted with it: over `tta_views` views of each image."""
        from pneumonia.models.augmentation import with_test_time_augmentation

        return with_test_time_augmentation(self.model, self.tta_views)

    @property
    def image_size(self) -> int:
        return int(self.model.input_shape[1])

    def preprocess(self, source: bytes | str | Path) -> np.ndarray:
        return model_input(source, self.image_size, self.jpeg_quality)

    def probabilities(self, images: Sequence[np.ndarray]) -> np.ndarray:
        if not images:
            return np.empty(0)
        # predict_on_batch, not predict: predict's per-call setup costs more than a batch's forward pass
        batches = [np.stack(images[start:start + BATCH_SIZE]) for start in range(0, len(images), BATCH_SIZE)]
        return self.calibration.apply(
            pneumonia_probability(np.concatenate([self.predictor.predict_on_batch(batch) for batch in batches])))

    def label(self, probability: float) -> str:
        return CLASS_NAMES[int(probability >= self.threshold)]


def load_classifier(model_path: Path, threshold: float, jpeg_quality: int, tta_views: int = 1,
                    calibration: Calibration = UNCALIBRATED) -> Classifier:
    """A Keras model file (the pipeline's models/model.keras, one `pneumonia adapt` wrote, or the file inside a
    logged MLflow model) deciding at `threshold`, its input encoded as the TFRecords were, each probability
    the mean over `tta_views` views of the image, then calibrated."""
    if not model_path.is_file():
        raise PipelineError(f"{model_path} not found: train a model first (`dvc repro`), or name one with --model-uri")
    return Classifier(load_model(model_path), threshold, jpeg_quality, tta_views, calibration)
