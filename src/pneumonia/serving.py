"""The MLflow model of a run: base64-encoded JPEG/PNG/TIFF/DICOM images in; probability of pneumonia, label,
out-of-distribution score and flag, the mirror and detail checks' flags, and the reasons an image is outside the
intended use out.

The evaluate stage logs it: it carries the model bundle (the Keras model, its settings, its
out-of-distribution reference and its ONNX graph: pneumonia.model_settings), the model card and this package's code, and
preprocesses like training (pneumonia.classifier). `pneumonia serve -m <uri>` (serve, below) or
`mlflow models serve -m <uri>` serves it; a request is a DataFrame with a column "image" of base64 strings, e.g.

    {"dataframe_split": {"columns": ["image"], "data": [["/9j/4AAQ..."]]}}

and the answer is {"predictions": [{"probability": 0.93, "label": "PNEUMONIA", "ood_score": 2.1,
"out_of_distribution": false, "mirrored": false, "blurred": false, "noisy": false, "flags": ""}, ...]}.

`pneumonia serve` serves the app `mlflow models serve` serves (MLflow's scoring server: the same routes,
requests and answers) behind a check MLflow's lacks: a JSON body nested deeper than any request gets HTTP 400,
not the 500 of a RecursionError (MLflow's server parses the body with Python's json module, which recurses a
level a call, before the model sees the request).
"""

import asyncio
import base64
import binascii
import dataclasses
import io
import logging
import os
import re
import threading
from collections.abc import Callable
from importlib.metadata import version
from pathlib import Path
from typing import TypeVar

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
from pneumonia.data.input_checks import OutsideIntendedUse
from pneumonia.data.layout import IMAGE_KINDS
from pneumonia.errors import PipelineError
from pneumonia.inference import prediction
from pneumonia.logs import redact
from pneumonia.model_settings import onnx_file, ood_file, read_settings_file, settings_file

log = logging.getLogger(__name__)
T = TypeVar("T")

MODEL_NAME = "model"  # the run's model: runs:/<run id>/model
IMAGE_COLUMN = "image"
KERAS_MODEL = "keras_model"  # the artifact holding the .keras file; the bundle's other files lie beside it
SETTINGS_ARTIFACT = "settings"
OOD_ARTIFACT = "ood_reference"
ONNX_ARTIFACT = "onnx_model"  # the bundle's .onnx: the served model predicts with ONNX Runtime (pneumonia.engines)
CARD_ARTIFACT = "model_card"
CANDIDATE = "candidate"  # alias of a newly registered version; promotion moves "champion"
SIGNATURE = ModelSignature(
    inputs=Schema([ColSpec("string", IMAGE_COLUMN)]),
    outputs=Schema([ColSpec("double", "probability"), ColSpec("string", "label"), ColSpec("double", "ood_score"),
                    ColSpec("boolean", "out_of_distribution"), ColSpec("boolean", "mirrored"),
                    ColSpec("boolean", "blurred"), ColSpec("boolean", "noisy"), ColSpec("string", "flags")]),
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
REQUIREMENTS = ("tensorflow", "keras", "onnxruntime", "simplejpeg", "numpy", "pandas", "pillow", "pydicom", "pylibjpeg",
                "pylibjpeg-openjpeg", "python-gdcm")


class PneumoniaModel(mlflow.pyfunc.PythonModel):
    def load_context(self, context):
        if SETTINGS_ARTIFACT not in context.artifacts:
            raise PipelineError("this MLflow model was logged before models carried their settings (threshold, "
                                "out-of-distribution reference): evaluate the model again (`dvc repro -f -s "
                                "evaluate`) and use the new run's model")
        self.classifier = load_classifier(Path(context.artifacts[KERAS_MODEL]))

    # The type hint: MLflow warns about a predict() without one each time the model is loaded (a DataFrame
    # changes nothing else: the signature stays SIGNATURE's).
    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        """model_input: a DataFrame with a column "image" of base64-encoded JPEG, PNG, TIFF or DICOM files."""
        if len(model_input) > MAX_ROWS:
            raise MlflowException.invalid_parameter_value(
                f"the request has {len(model_input)} rows, more than the limit of {MAX_ROWS} images a request: "
                f"send at most {MAX_ROWS} per request")
        requested = [self.request_image(value, row) for row, value in enumerate(model_input[IMAGE_COLUMN])]
        predicted = self.classifier.predict([image for image, _ in requested])
        rows = [prediction(self.classifier, "", predicted, index, reasons)
                for index, (_, reasons) in enumerate(requested)]
        return pd.DataFrame({name: [getattr(row, name) for row in rows] for name in SIGNATURE.outputs.input_names()})

    def request_image(self, value: object, row: int) -> tuple[np.ndarray, list[str]]:
        """One request's image, preprocessed, and the input checks' reasons; a bad one is the client's error
        (HTTP 400) naming its row."""
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
            reasons = self.classifier.flags(encoded)
        except OutsideIntendedUse as exc:
            raise MlflowException.invalid_parameter_value(f"row {row} of column {IMAGE_COLUMN!r} is {exc}") from None
        try:
            with DECODING:
                return self.classifier.preprocess(encoded), reasons
        except ImageTooLarge as exc:
            raise MlflowException.invalid_parameter_value(
                f"row {row} of column {IMAGE_COLUMN!r} is too large: {exc}") from None
        except Exception as exc:  # noqa: BLE001 - any decoder failure means "not a readable image"
            raise MlflowException.invalid_parameter_value(
                f"row {row} of column {IMAGE_COLUMN!r} is not a readable image ({type(exc).__name__}: {exc}): "
                f"send {IMAGE_KINDS} files"
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


def log_model(model_path: Path, name: str | None = None, model_card: Path | None = None,
              settings: Path | None = None, ood: Path | None = None, onnx: Path | None = None) -> ModelInfo:
    """Log the model bundle of the .keras file `model_path` (the model, its settings, out-of-distribution
    reference and ONNX graph if it has one: the files beside it, or `settings`, `ood` and `onnx` named like them,
    as the evaluate stage stages them) as the active run's MLflow model, with the `model_card` file.

    With a `name` (tracking.register_model), the model is also registered under it and the new
    version gets the alias "candidate".
    """
    settings, ood = settings or settings_file(model_path), ood or ood_file(model_path)
    onnx = onnx or onnx_file(model_path)
    if (settings.name, ood.name, onnx.name) != (settings_file(model_path).name, ood_file(model_path).name,
                                                onnx_file(model_path).name):
        raise ValueError(f"{settings.name}, {ood.name} and {onnx.name} are not named as {model_path.name}'s bundle: "
                         "the logged model would not find them")
    shown_settings = read_settings_file(settings)
    artifacts = {KERAS_MODEL: str(model_path), SETTINGS_ARTIFACT: str(settings), OOD_ARTIFACT: str(ood),
                 **({ONNX_ARTIFACT: str(onnx)} if onnx.is_file() else {}),
                 **({CARD_ARTIFACT: str(model_card)} if model_card else {})}
    # the logged model's own params (on its page), not the run's
    # flat: MLflow's params are not nested
    shown = {"threshold": shown_settings.threshold, "threshold_rule": shown_settings.threshold_rule,
             "jpeg_quality": shown_settings.jpeg_quality, "tta_views": shown_settings.tta_views,
             **{f"calibration_{key}": value for key, value in shown_settings.calibration.model_dump().items()},
             "ood_threshold": shown_settings.ood.threshold, "input_checks": shown_settings.input_checks}
    info = tracking.retry_locked(
        mlflow.pyfunc.log_model,
        name=MODEL_NAME,
        python_model=PneumoniaModel(),
        artifacts=artifacts,
        params=shown,
        # Where a user of the served model reads what it is for and not for
        metadata={"intended_use": shown_settings.intended_use.purpose,
                  "population": shown_settings.intended_use.population,
                  "not_for": list(shown_settings.intended_use.not_for),
                  "model_card": f"artifacts/{model_card.name}" if model_card else
                  shown_settings.intended_use.model_card},
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


def fetch_logged_model(model_uri: str, fetch: Callable[[str], T], nothing_done: str) -> T:
    """fetch(model_uri) of a logged model (runs:/<run id>/model, models:/<name>@<alias>, a path) from the
    tracking store, checked reachable first (else a message ending with `nothing_done`); MLflow's failure a
    message."""
    if model_uri.startswith(("runs:", "models:")):  # found through the tracking store
        tracking.check_reachable(tracking.tracking_uri(), nothing_done)
    tracking.use_tracking_uri(tracking.tracking_uri())
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # a bar per artifact: noise for a model
    try:
        return fetch(model_uri)
    except (MlflowException, OSError) as exc:
        raise PipelineError(
            f"cannot load the MLflow model {model_uri!r} from {tracking.shown_uri()}: {redact(str(exc))}") from None


def download_logged_model(model_uri: str, nothing_done: str) -> Path:
    """A local copy of the logged model `model_uri` (runs:/<run id>/model, models:/<name>@<alias>, a path), fetched
    as fetch_logged_model fetches."""
    return Path(fetch_logged_model(model_uri, mlflow.artifacts.download_artifacts, nothing_done))


def logged_model_file(copy: Path) -> Path | None:
    """The .keras file of the bundle inside `copy`, a logged model's local copy, where its MLmodel file puts it; None
    when it names none (not a model this package logged: loading it says so)."""
    from mlflow.models import Model

    try:
        return copy / Model.load(copy).flavors["python_function"]["artifacts"][KERAS_MODEL]["path"]
    except (MlflowException, OSError, KeyError, TypeError):
        return None


def logged_classifier(model_uri: str, input_checks_policy: str | None = None, copy: Path | None = None) -> Classifier:
    """The classifier inside a logged model: runs:/<run id>/model, models:/<name>@<alias>, a path; `copy`: its local
    copy, already downloaded (download_logged_model); `input_checks_policy` overrides its input checks."""
    model = fetch_logged_model(model_uri, lambda uri: mlflow.pyfunc.load_model(str(copy) if copy else uri),
                               "Nothing was predicted.")
    python_model = model.unwrap_python_model()
    if not isinstance(python_model, PneumoniaModel):
        raise PipelineError(f"{model_uri!r} is not a pneumonia model logged by the evaluate stage")
    classifier = python_model.classifier
    return dataclasses.replace(classifier, input_checks=input_checks_policy) if input_checks_policy else classifier


# A request nests 4 levels ({"dataframe_split": {"data": [["..."]]}}); Python's json parser fails near 1000.
MAX_JSON_DEPTH = 32
SERVED_MODEL = "PNEUMONIA_SERVED_MODEL"  # the local copy of the model, for the server's worker processes
# A JSON string, or an unterminated one up to the end: it always matches where a string starts, so a body of
# quotes costs one pass. Escaped characters (\" among them) stay inside.
JSON_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*(?:"|\\?\Z)', re.DOTALL)
NOT_BRACKETS = bytes(sorted(set(range(256)) - set(b"[]{}")))
OPENING = np.frombuffer(b"[{", np.uint8)
BRACKETS_A_STEP = 2**20  # counted at once: 8 MB of levels


def json_depth(body: bytes, limit: int = MAX_JSON_DEPTH) -> int:
    """How deep `body`'s arrays and objects nest (brackets inside strings do not count), without parsing it;
    counting stops past `limit` (then the depth found so far)."""
    brackets = np.frombuffer(JSON_STRING.sub(b"", body).translate(None, NOT_BRACKETS), np.uint8)
    deepest = depth = 0
    for start in range(0, len(brackets), BRACKETS_A_STEP):
        levels = depth + np.cumsum(np.where(np.isin(brackets[start:start + BRACKETS_A_STEP], OPENING), 1, -1))
        deepest, depth = max(deepest, int(levels.max())), int(levels[-1])
        if deepest > limit:
            break
    return deepest


class JsonDepthLimit:
    """ASGI middleware: a JSON request body nested more than MAX_JSON_DEPTH levels gets HTTP 400 with MLflow's
    error body (error_code, message); any other request goes on to `app` as it came."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not dict(scope["headers"]).get(b"content-type", b"").lower().startswith(
                b"application/json"):
            return await self.app(scope, receive, send)
        chunks, more = [], True
        while more:  # MLflow's scoring server reads the body whole too
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            more = message.get("more_body", False)
        body = b"".join(chunks)
        del chunks
        if await asyncio.to_thread(json_depth, body) > MAX_JSON_DEPTH:
            return await self.refuse(send)
        replayed = False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()  # after the body: the client's disconnect
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        return await self.app(scope, replay, send)

    @staticmethod
    async def refuse(send):
        refused = MlflowException.invalid_parameter_value(
            f"the request's JSON is nested more than {MAX_JSON_DEPTH} levels deep; a request is 4 levels deep: "
            '{"dataframe_split": {"columns": ["image"], "data": [["<base64>"], ...]}}')
        content = refused.serialize_as_json().encode()
        await send({"type": "http.response.start", "status": refused.get_http_status_code(),
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(content)).encode())]})
        await send({"type": "http.response.body", "body": content})


def served_app():
    """The app of each server process: MLflow's scoring server of the model at $PNEUMONIA_SERVED_MODEL
    (what `mlflow models serve` runs), behind JsonDepthLimit."""
    from mlflow.pyfunc import scoring_server

    return JsonDepthLimit(scoring_server.init(mlflow.pyfunc.load_model(os.environ[SERVED_MODEL])))


def check_free(host: str, port: int) -> None:
    """Refuse host:port, before any model is fetched, where the server could not listen: taken by another server
    (`mlflow ui` listens on 5000, this command's default too) or not an address of this machine."""
    import socket

    # bound as uvicorn binds its socket (Config.bind_socket), so no host:port it would take is refused
    try:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind((host, port))
    except OSError as exc:
        raise PipelineError(f"cannot serve on {host}:{port}: {exc.strerror or exc}. Choose another port (-p) or "
                            "host (--host), or stop what listens there"
                            + (" (`mlflow ui` listens on 5000 too)" if port == 5000 else "")) from None


def serve(copy: Path, host: str, port: int, workers: int) -> None:
    """Serve the logged model whose local copy is `copy` (download_logged_model: once, for every worker) on
    host:port until stopped, in `workers` processes, as `mlflow models serve --env-manager local` does."""
    import uvicorn

    os.environ[SERVED_MODEL] = str(copy)
    uvicorn.run(f"{__name__}:served_app", factory=True, host=host, port=port, workers=workers)
