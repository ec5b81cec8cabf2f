"""What runs a bundle's network on preprocessed images: ONNX Runtime on the bundle's `<stem>.onnx`, or Keras
on its `<stem>.keras`. Either gives, for a batch of model inputs (uint8 or float, (n, size, size, 3)), the
model's outputs (a sigmoid or [NORMAL, PNEUMONIA] softmax) and the pooled features of the out-of-distribution
score (pneumonia.ood) from one forward pass.

ONNX Runtime, where it applies (one view an image), so that `pneumonia predict` and the served model need not
import TensorFlow: its import is most of a one-image prediction's time (docs/performance.md). The `.onnx` is
ood.pooled_features_model's graph exported by tf2onnx (`onnx_model`); its probabilities and features equal
Keras's to float rounding (tests/test_serving.py, on real X-rays). Keras stays where ONNX cannot follow:
test-time views (evaluate.tta_views > 1: their affine warps have no ONNX operator), Grad-CAM maps (gradients)
and `pneumonia adapt` (training); an OnnxEngine loads the Keras model only when one of them asks for it.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import keras
    import onnxruntime

INPUT_NAME = "image"  # of the exported graph's one input
ONNX_OPSET = 18


def onnx_model(model: keras.Model) -> bytes:
    """The serialized ONNX graph of `model` and its pooled features (ood.pooled_features_model): a float32
    (n, size, size, 3) input named INPUT_NAME, the model's output and the features out."""
    import logging

    import tensorflow as tf
    import tf2onnx

    from pneumonia.ood import pooled_features_model

    features_model = pooled_features_model(model)
    spec = (tf.TensorSpec((None, *features_model.input_shape[1:]), tf.float32, name=INPUT_NAME),)
    logging.getLogger("tf2onnx").setLevel(logging.WARNING)  # a dozen INFO lines of its progress an export
    proto, _ = tf2onnx.convert.from_keras(features_model, input_signature=spec, opset=ONNX_OPSET)
    return proto.SerializeToString()


@dataclass(frozen=True)
class KerasEngine:
    """A Keras model predicting as the evaluate stage predicted with it: each probability the mean over
    `tta_views` views of the image (models.augmentation), the features of the image itself."""

    model: keras.Model
    tta_views: int = 1

    @cached_property
    def predictor(self):
        from pneumonia.models.augmentation import with_test_time_augmentation

        return with_test_time_augmentation(self.model, self.tta_views)

    @cached_property
    def with_features(self):
        from pneumonia.ood import pooled_features_model

        return pooled_features_model(self.model)

    @property
    def image_size(self) -> int:
        return int(self.model.input_shape[1])

    @property
    def keras_model(self) -> keras.Model:
        return self.model

    def predict(self, batch: np.ndarray, features: bool = True) -> tuple[np.ndarray, np.ndarray | None]:
        """(outputs, pooled features, or None when not asked for) of a batch; two forward passes with
        test-time views."""
        # predict_on_batch, not predict: predict's per-call setup costs more than a batch's forward pass
        if not features:
            return self.predictor.predict_on_batch(batch), None
        outputs, pooled = self.with_features.predict_on_batch(batch)
        if self.tta_views > 1:
            outputs = self.predictor.predict_on_batch(batch)
        return outputs, pooled


@dataclass(frozen=True)
class OnnxEngine:
    """The bundle's `.onnx` in ONNX Runtime (one view an image); the Keras model of `keras_file` is loaded
    only when asked for (Grad-CAM, adapt)."""

    session: onnxruntime.InferenceSession
    keras_file: Path
    tta_views = 1

    @classmethod
    def of(cls, onnx: bytes, keras_file: Path) -> OnnxEngine:
        import onnxruntime

        from pneumonia.errors import PipelineError
        from pneumonia.model_settings import onnx_file

        options = onnxruntime.SessionOptions()
        options.log_severity_level = 3  # errors only: its warnings are about graph optimisations
        try:
            session = onnxruntime.InferenceSession(onnx, options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # noqa: BLE001 - ONNX Runtime raises its own types for a graph it cannot run
            # e.g. one exported before models.build.in_float32 from a model trained in mixed precision
            raise PipelineError(
                f"ONNX Runtime cannot run {onnx_file(keras_file)} ({type(exc).__name__}: {str(exc)[:300]}): run the "
                f"evaluate stage again (`dvc repro -f -s evaluate`) to export it anew, or delete it to predict with "
                f"{keras_file.name}") from None
        return cls(session, keras_file)

    @property
    def image_size(self) -> int:
        return int(self.session.get_inputs()[0].shape[1])

    @cached_property
    def keras_model(self) -> keras.Model:
        from pneumonia.models.build import load_model

        return load_model(self.keras_file, compile=False)

    def predict(self, batch: np.ndarray, features: bool = True) -> tuple[np.ndarray, np.ndarray | None]:
        outputs, pooled = self.session.run(None, {INPUT_NAME: np.asarray(batch, dtype=np.float32)})
        return outputs, pooled if features else None
