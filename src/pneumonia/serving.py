"""The MLflow model of a run: base64-encoded JPEG/PNG/DICOM images in, probability of pneumonia and label out.

The evaluate stage logs it (it knows the decision threshold); it carries the Keras model, the
threshold, the JPEG quality of the TFRecords and this package's code, and preprocesses like
training (pneumonia.classifier). `mlflow models serve -m <uri>` serves it; a request is a
DataFrame with a column "image" of base64 strings, e.g.

    {"dataframe_split": {"columns": ["image"], "data": [["/9j/4AAQ..."]]}}

and the answer is {"predictions": [{"probability": 0.93, "label": "PNEUMONIA"}, ...]}.
"""

import base64
import binascii
import io
import json
import logging
import os
import tempfile
import threading
from importlib.metadata import version
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.models.model import ModelInfo
from mlflow.types import ColSpec, Schema
from PIL import Image

from pneumonia import tracking
from pneumonia.classifier import Classifier, load_classifier
from pneumonia.data.images import ImageTooLarge
from pneumonia.errors import PipelineError
from pneumonia.evaluation.calibration import UNCALIBRATED, Calibration
from pneumonia.logs import redact

log = logging.getLogger(__name__)

MODEL_NAME = "model"  # the run's model: runs:/<run id>/model
IMAGE_COLUMN = "image"
KERAS_MODEL = "keras_model"  # the artifact holding the .keras file
CONFIG = "config"  # the artifact holding {"threshold", "jpeg_quality"} (not model_config: MLflow would also
# log that as run params, unprefixed duplicates of tfrecords.jpeg_quality and the test_threshold metric)
CANDIDATE = "candidate"  # alias of a newly registered version; promotion moves "champion"
SIGNATURE = ModelSignature(
    inputs=Schema([ColSpec("string", IMAGE_COLUMN)]),
    outputs=Schema([ColSpec("double", "probability"), ColSpec("string", "label")]),
)
# Limits of a request, so that a few hostile ones cannot exhaust the server's memory: the server
# answers a timed-out request with 504 but its thread goes on decoding. Rows a request, bytes an
# image file (base64 is 4/3 of it), and images decoded at once in this process (each up to
# images.MAX_PIXELS: ~0.2 GB at worst while decoded).
MAX_ROWS = 64
MAX_IMAGE_BYTES = 16 * 2**20
MAX_ENCODED_CHARS = MAX_IMAGE_BYTES * 4 // 3 * 77 // 76 + 4  # with GNU base64's line breaks
DECODING = threading.BoundedSemaphore(2)
# Needed to load and run the model where it is served; mlflow adds itself.
REQUIREMENTS = ("tensorflow", "keras", "numpy", "pandas", "pillow", "pydicom", "pylibjpeg", "pylibjpeg-openjpeg",
                "python-gdcm")


class PneumoniaModel(mlflow.pyfunc.PythonModel):
    def load_context(self, context):
        if CONFIG in context.artifacts:
            config = json.loads(Path(context.artifacts[CONFIG]).read_text())
        else:  # models logged before the config became an artifact
            config = context.model_config
        self.classifier = load_classifier(Path(context.artifacts[KERAS_MODEL]), config["threshold"],
                                          config["jpeg_quality"], config.get("tta_views", 1),
                                          Calibration.from_dict(config.get("calibration")))

    # The type hint: MLflow warns about a predict() without one each time the model is loaded (a DataFrame
    # changes nothing else: the signature stays SIGNATURE's).
    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        """model_input: a DataFrame with a column "image" of base64-encoded JPEG, PNG or DICOM files."""
        if len(model_input) > MAX_ROWS:
            raise MlflowException.invalid_parameter_value(
                f"the request has {len(model_input)} rows, more than the limit of {MAX_ROWS} images a request: "
                f"send at most {MAX_ROWS} per request")
        images = [self.request_image(value, row) for row, value in enumerate(model_input[IMAGE_COLUMN])]
        probabilities = self.classifier.probabilities(images)
        return pd.DataFrame({"probability": probabilities,
                             "label": [self.classifier.label(p) for p in probabilities]})

    def request_image(self, value: object, row: int) -> np.ndarray:
        """One request's image, preprocessed; a bad one is the client's error (HTTP 400) naming its row."""
        if isinstance(value, str) and len(value) > MAX_ENCODED_CHARS:
            raise MlflowException.invalid_parameter_value(
                f"row {row} of column {IMAGE_COLUMN!r} is {len(value) / 2**20:.1f} MiB of base64, more than the "
                f"limit of {MAX_IMAGE_BYTES // 2**20} MiB an image file: downscale or compress the image")
        try:
            # Line breaks are ignored: GNU `base64` wraps at 76 columns (MIME does too).
            encoded = base64.b64decode("".join(value.split()) if isinstance(value, str) else value, validate=True)
        except (binascii.Error, TypeError, ValueError) as exc:
            raise MlflowException.invalid_parameter_value(
                f"row {row} of column {IMAGE_COLUMN!r} is not base64 ({exc}): send each image file base64-encoded"
            ) from None
        try:
            with DECODING:
                return self.classifier.preprocess(encoded)
        except ImageTooLarge as exc:
            raise MlflowException.invalid_parameter_value(
                f"row {row} of column {IMAGE_COLUMN!r} is too large: {exc}") from None
        except Exception as exc:  # noqa: BLE001 - any decoder failure means "not a readable image"
            raise MlflowException.invalid_parameter_value(
                f"row {row} of column {IMAGE_COLUMN!r} is not a readable image ({type(exc).__name__}: {exc}): "
                "send JPEG, PNG or DICOM files"
            ) from None


def encode_image(data: bytes) -> str:
    """An image file as the model takes it (the client's side of image_bytes)."""
    return base64.b64encode(data).decode("ascii")


def input_example() -> pd.DataFrame:
    """A small grey gradient PNG: logged with the model so that MLflow can show and check a request."""
    gradient = np.tile(np.linspace(0, 255, 64, dtype=np.uint8), (64, 1))
    buffer = io.BytesIO()
    Image.fromarray(gradient, mode="L").save(buffer, format="PNG")
    return pd.DataFrame({IMAGE_COLUMN: [encode_image(buffer.getvalue())]})


def log_model(model_path: Path, threshold: float, jpeg_quality: int, name: str | None = None,
              tta_views: int = 1, calibration: Calibration = UNCALIBRATED) -> ModelInfo:
    """Log the Keras model at `model_path` as the active run's MLflow model, deciding at `threshold` on
    images encoded at `jpeg_quality` (tfrecords.jpeg_quality), each probability the mean over `tta_views`
    views of the image (evaluate.tta_views), then calibrated (evaluate.calibration).

    With a `name` (tracking.register_model), the model is also registered under it and the new
    version gets the alias "candidate".
    """
    config = {"threshold": float(threshold), "jpeg_quality": jpeg_quality, "tta_views": tta_views,
              "calibration": calibration.as_dict()}
    with tempfile.TemporaryDirectory() as scratch:
        config_file = Path(scratch) / "config.json"
        config_file.write_text(json.dumps(config))
        info = tracking.retry_locked(
            mlflow.pyfunc.log_model,
            name=MODEL_NAME,
            python_model=PneumoniaModel(),
            artifacts={KERAS_MODEL: str(model_path), CONFIG: str(config_file)},
            # the logged model's own params (on its page), not the run's; flat: MLflow's params are not nested
            params={**{key: value for key, value in config.items() if key != "calibration"},
                    **{f"calibration_{key}": value for key, value in calibration.as_dict().items()}},
            # This package's code goes with the model: it loads and serves without the project installed.
            code_paths=[str(Path(__file__).parent)],
            signature=SIGNATURE,
            input_example=input_example(),
            pip_requirements=[f"{package}=={version(package)}" for package in REQUIREMENTS],
            registered_model_name=name,
        )
    if name:
        tracking.retry_locked(mlflow.MlflowClient().set_registered_model_alias, name, CANDIDATE,
                              info.registered_model_version)
        log.info("registered %s version %s as %s@%s", MODEL_NAME, info.registered_model_version, name, CANDIDATE)
    return info


CHAMPION = "champion"


def promote(name: str, source: str = CANDIDATE, target: str = CHAMPION, version: str | None = None) -> str:
    """Point the registered model `name`'s alias `target` at the version aliased `source` (or at
    `version`); return that version. MlflowClient.set_registered_model_alias, with clear errors."""
    tracking.check_reachable(tracking.tracking_uri(), "Nothing was promoted.")
    mlflow.set_tracking_uri(tracking.tracking_uri())
    client = mlflow.MlflowClient()
    try:
        chosen = tracking.retry_locked(*((client.get_model_version, name, version) if version else
                                         (client.get_model_version_by_alias, name, source)))
    except MlflowException as exc:
        what = f"version {version}" if version else f"version with alias {source!r}"
        raise PipelineError(
            f"registered model {name!r} has no {what} in {tracking.tracking_uri()} ({exc.message.splitlines()[0]}). "
            "Register models with tracking.register_model (each evaluated model becomes a version aliased "
            f"{CANDIDATE!r}); `mlflow ui` lists them."
        ) from None
    tracking.retry_locked(client.set_registered_model_alias, name, target, chosen.version)
    return chosen.version


def logged_classifier(model_uri: str) -> Classifier:
    """The classifier inside a logged model: runs:/<run id>/model, models:/<name>@<alias>, a path."""
    if model_uri.startswith(("runs:", "models:")):  # found through the tracking store
        tracking.check_reachable(tracking.tracking_uri(), "Nothing was predicted.")
    tracking.use_tracking_uri(tracking.tracking_uri())
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # a bar per artifact: noise for a model
    try:
        model = mlflow.pyfunc.load_model(model_uri)
    except (MlflowException, OSError) as exc:
        raise PipelineError(
            f"cannot load the MLflow model {model_uri!r} from {tracking.shown_uri()}: {redact(str(exc))}") from None
    python_model = model.unwrap_python_model()
    if not isinstance(python_model, PneumoniaModel):
        raise PipelineError(f"{model_uri!r} is not a pneumonia model logged by the evaluate stage")
    return python_model.classifier
