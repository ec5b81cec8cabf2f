"""A trained model as it is used on images: the preprocessing of training, the model's probability
of pneumonia, the label at the decision threshold of the model's run, the input checks of its intended
use, how unlike the training X-rays each image is (the out-of-distribution score and flag), whether it
looks mirrored left to right (the mirror check) and whether it is blurred or noisy beyond them (the detail check).

Shared by `pneumonia predict` (pneumonia.inference), `pneumonia adapt` and the served MLflow model
(pneumonia.serving), so all give the probability the evaluate stage gave the same image. Every setting
comes from the model's bundle (pneumonia.model_settings): `load_classifier` reads it, and predicts with
ONNX Runtime where the bundle allows it, with Keras otherwise (pneumonia.engines).

Imports neither TensorFlow nor Keras itself: a prediction with ONNX Runtime runs without them.
"""

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pneumonia import CLASS_NAMES
from pneumonia.data import input_checks
from pneumonia.data.images import encode_jpeg, load_resized
from pneumonia.engines import KerasEngine, OnnxEngine
from pneumonia.errors import PipelineError
from pneumonia.evaluation.calibration import UNCALIBRATED, Calibration
from pneumonia.evaluation.predictions import pneumonia_probability
from pneumonia.model_settings import (
    ModelSettings,
    check_belongs,
    checked_onnx,
    model_file,
    onnx_file,
    ood_file,
    read_settings,
    settings_file,
)
from pneumonia.ood import OodReference, fine_detail, layout

IMAGES_PER_PASS = 32  # images a forward pass: bounds memory whatever the number of files


def model_input(source: bytes | str | Path, image_size: int, jpeg_quality: int) -> np.ndarray:
    """An encoded image (bytes) or image file as training saw its images: uint8 (size, size, 3).

    The exact path of a training image: load_resized, the JPEG re-encode of the TFRecords writer
    at tfrecords.jpeg_quality, and the JPEG decode of data.dataset, pixel for pixel. That decode is
    TensorFlow's (tf.io.decode_jpeg: libjpeg-turbo with its fast integer IDCT); simplejpeg runs the same
    libjpeg-turbo IDCT with fastdct=True and gives the same pixels without importing TensorFlow (PIL's
    decoder differs by up to ~14 grey levels: the accurate IDCT). So a test image gets exactly the
    probability the evaluate stage gave it.
    """
    import simplejpeg

    image = load_resized(source if isinstance(source, bytes) else str(source), image_size)
    return simplejpeg.decode_jpeg(encode_jpeg(image, jpeg_quality), colorspace="RGB", fastdct=True)


@dataclass(frozen=True)
class Predicted:
    probabilities: np.ndarray  # of pneumonia
    ood_scores: np.ndarray  # NaN without an out-of-distribution reference
    mirrored: np.ndarray  # the mirror check's flag (pneumonia.ood.MirrorCheck); False without one
    blurred: np.ndarray  # the detail check's flags (pneumonia.ood.DetailCheck); False without one
    noisy: np.ndarray


@dataclass(frozen=True)
class Classifier:
    """A trained model with the preprocessing, decision threshold and checks of its run."""

    engine: KerasEngine | OnnxEngine  # plain [0, 255] RGB in, a sigmoid or [NORMAL, PNEUMONIA] softmax out
    threshold: float
    jpeg_quality: int
    calibration: Calibration = UNCALIBRATED  # fitted on validation by the evaluate stage; the threshold is on it
    ood: OodReference | None = None  # None: no out-of-distribution score (a model without its bundle, in tests)
    input_checks: str = "flag"  # evaluate.input_checks: flag, refuse or ignore
    age_years: tuple[int, int] = (0, 5)  # of the intended use (model_settings.IntendedUse)
    settings: ModelSettings | None = field(default=None, compare=False)  # the bundle's, when loaded from one

    @property
    def model(self):
        """The Keras model (Grad-CAM maps, adaptation): loaded now if the engine is ONNX Runtime."""
        return self.engine.keras_model

    @property
    def tta_views(self) -> int:
        """Each probability is the mean over this many views of the image (evaluate.tta_views)."""
        return self.engine.tta_views

    @property
    def image_size(self) -> int:
        return self.engine.image_size

    def preprocess(self, source: bytes | str | Path) -> np.ndarray:
        return model_input(source, self.image_size, self.jpeg_quality)

    def flags(self, source: bytes | str | Path) -> list[str]:
        """Why `source`'s header puts it outside the intended use: its DICOM attributes, its size (raises under
        input_checks: refuse)."""
        return input_checks.checked(source, self.input_checks, self.age_years, self.image_size)

    def predict(self, images: Sequence[np.ndarray]) -> Predicted:
        """Probabilities, out-of-distribution scores, mirror and detail flags of preprocessed images, a batch a
        forward pass (two with test-time views: the score is of the image itself)."""
        if not len(images):
            return Predicted(np.empty(0), np.empty(0), *(np.empty(0, bool),) * 3)
        probabilities, scores, mirrored, blurred, noisy = [], [], [], [], []
        for start in range(0, len(images), IMAGES_PER_PASS):
            batch = np.stack(images[start:start + IMAGES_PER_PASS])
            outputs, features = self.engine.predict(batch, features=self.ood is not None)
            probabilities.append(pneumonia_probability(outputs))
            unflagged = np.zeros(len(batch), bool)
            if self.ood is None:
                scores.append(np.full(len(batch), np.nan))
                mirrored.append(unflagged)
            else:
                thumbnails = layout(batch)
                scores.append(self.ood.scores(thumbnails, features))
                mirrored.append(self.ood.mirrored(thumbnails))
            if self.ood is None or self.ood.detail is None:
                blurred.append(unflagged)
                noisy.append(unflagged)
            else:
                detail = fine_detail(batch)
                blurred.append(self.ood.detail.blurred(detail))
                noisy.append(self.ood.detail.noisy(detail))
        return Predicted(self.calibration.apply(np.concatenate(probabilities)),
                         *map(np.concatenate, (scores, mirrored, blurred, noisy)))

    def probabilities(self, images: Sequence[np.ndarray]) -> np.ndarray:
        return self.predict(images).probabilities

    def label(self, probability: float) -> str:
        return CLASS_NAMES[int(probability >= self.threshold)]

    def out_of_distribution(self, score: float) -> bool:
        return self.ood is not None and bool(score > self.ood.threshold)


def load_classifier(path: Path, input_checks_policy: str | None = None) -> Classifier:
    """The model bundle at `path` (a folder such as models/, or its .keras file with <stem>.json,
    <stem>.ood.npz and <stem>.onnx beside it: the pipeline's, one `pneumonia adapt` wrote, or one inside a logged MLflow
    model), used with every setting of its run; `input_checks_policy` overrides its input checks.

    It predicts with ONNX Runtime when the bundle holds its <stem>.onnx and each probability is of one view
    of the image (tta_views 1), with Keras otherwise (pneumonia.engines)."""
    model = model_file(path)
    if not model.is_file():
        raise PipelineError(f"{model} not found: train a model first (`dvc repro`), name a model file or a folder "
                            "holding model.keras with --model, or an MLflow model with --model-uri")
    settings = read_settings(model)
    if not ood_file(model).is_file():
        raise PipelineError(f"{ood_file(model)} (the out-of-distribution reference) is missing beside {model}: copy "
                            "the whole models/ folder, or run the evaluate stage again (`dvc repro`)")
    onnx = checked_onnx(settings, model)
    if onnx is not None and settings.tta_views == 1:
        check_belongs(settings, model)
        engine = OnnxEngine.of(onnx, model)
    else:
        from pneumonia.models.build import load_model

        engine = KerasEngine(load_model(model, compile=False), settings.tta_views)  # it only predicts
        check_belongs(settings, model)  # after loading: a damaged file is called damaged
    return classifier_of(engine, settings, OodReference.load(ood_file(model), settings.ood.threshold),
                         input_checks_policy)


def predicts_with_onnx(path: Path) -> bool:
    """Whether load_classifier(path) predicts with ONNX Runtime, i.e. without TensorFlow (False for a bundle it
    refuses: it says why)."""
    model = model_file(path)
    try:
        return onnx_file(model).is_file() and settings_file(model).is_file() and read_settings(model).tta_views == 1
    except PipelineError:
        return False


def classifier_of(engine: KerasEngine | OnnxEngine, settings: ModelSettings, ood: OodReference,
                  input_checks_policy: str | None = None) -> Classifier:
    if engine.image_size != settings.image_size:
        raise PipelineError(f"the model takes {engine.image_size} px images but its settings say "
                            f"{settings.image_size}: the settings file belongs to another model; copy the "
                            "model's own bundle")
    return Classifier(engine, settings.threshold, settings.jpeg_quality,
                      Calibration(**settings.calibration.model_dump()), ood,
                      input_checks_policy or settings.input_checks, settings.intended_use.age_years, settings)
