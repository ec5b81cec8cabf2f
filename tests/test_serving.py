"""The run's MLflow model: logged and registered as `candidate`, served by `pneumonia serve` (the app of the real
`mlflow models serve`, JSON depth checked) on 127.0.0.1, answering real X-rays exactly as `pneumonia predict`
does."""

import base64
import json
import re
import socket
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import mlflow
import numpy as np
import pytest
import requests
from mlflow import MlflowClient

from bundles import write_settings
from conftest import mlflow_model_server, tool_env
from dicoms import FORMS, SECRETS, dataset, dicom_file, file_bytes, png_bytes, sample_xrays
from harness import PNEUMONIA_SERVE
from pneumonia import cli, serving
from pneumonia.config import parse_params
from pneumonia.training.fit import train
from test_predict import WITH_IMPORTS

pytestmark = pytest.mark.slow  # each starts an MLflow model server or registry

REGISTERED = "pneumonia-test"
THRESHOLD = 0.37
JPEG_QUALITY = 90  # not the default: the logged model must carry it
SERVER_START_SECONDS = 180  # TensorFlow import and model load on a busy 2-core machine


@pytest.fixture(scope="module")
def store(synthetic_data, tmp_path_factory) -> dict[str, str]:
    """A tiny model trained on the synthetic set (1 epoch, 48 px), logged with serving.log_model into
    a SQLite store of its own and registered; MLFLOW_TRACKING_URI points at that store meanwhile."""
    root = tmp_path_factory.mktemp("store")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    params = parse_params({
        "data": {"image_size": 48}, "tfrecords": {"jpeg_quality": JPEG_QUALITY},
        "train": {"epochs": 1, "batch_size": 8}, "tracking": {"register_model": REGISTERED},
    })
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", uri)
        mlflow.set_tracking_uri(uri)
        experiment = mlflow.create_experiment("serving", artifact_location=(root / "artifacts").as_uri())
        with mlflow.start_run(experiment_id=experiment) as run:
            train(params.model, params.train, synthetic_data / "data/tfrecords", None, root / "model.keras")
            write_settings(root / "model.keras", THRESHOLD, params.tfrecords.jpeg_quality)  # as evaluate does
            info = serving.log_model(root / "model.keras", params.tracking.register_model)
        yield {"uri": uri, "run_id": run.info.run_id, "model": str(root / "model.keras"),
               "version": info.registered_model_version}


@pytest.fixture(scope="module")
def xrays(repo_sample, tmp_path_factory) -> list[Path]:
    """Six real test X-rays of the committed sample, three of each class, as files."""
    folder = tmp_path_factory.mktemp("xrays")
    with zipfile.ZipFile(repo_sample) as archive:
        names = sorted(name for name in archive.namelist() if "/test/" in name and name.endswith(".jpeg"))
        for label in ("NORMAL", "PNEUMONIA"):
            for name in [name for name in names if f"/{label}/" in name][:3]:
                (folder / Path(name).name).write_bytes(archive.read(name))
    return sorted(folder.iterdir())


@pytest.fixture(scope="module")
def server(served) -> str:
    return served[0]


@pytest.fixture(scope="module")
def served(store, tmp_path_factory) -> tuple[str, int, Path]:
    """`pneumonia serve` of the registered candidate, its process group and its output; stopped at teardown."""
    log = tmp_path_factory.mktemp("server") / "server.log"
    with mlflow_model_server(f"models:/{REGISTERED}@candidate", store["uri"], log, SERVER_START_SECONDS,
                             PNEUMONIA_SERVE) as (url, group, _):
        yield url, group, log


@pytest.fixture(scope="module")
def dicom_xrays(tmp_path_factory) -> list[tuple[Path, Path]]:
    """(DICOM, PNG of the same 8-bit image) of two X-rays of the sample (NORMAL, PNEUMONIA), the DICOM in each
    form, with made-up patient data in its header; in one folder, the DICOMs named without a suffix."""
    folder = tmp_path_factory.mktemp("dicom")
    pairs = []
    for index, (_, grey) in enumerate(sample_xrays(2, width=320)):
        for form in FORMS:
            data, pixels = dicom_file(grey, form)
            (folder / f"{index}-{form}").write_bytes(data)
            (folder / f"{index}-{form}.png").write_bytes(png_bytes(pixels))
            pairs.append((folder / f"{index}-{form}", folder / f"{index}-{form}.png"))
    return pairs


def invoke(url: str, body: bytes | str, content_type: str = "application/json") -> requests.Response:
    return requests.post(f"{url}/invocations", data=body, headers={"Content-Type": content_type}, timeout=60)


def request_for(files: list[Path]) -> str:
    encoded = [[serving.encode_image(file.read_bytes())] for file in files]
    return json.dumps({"dataframe_split": {"columns": [serving.IMAGE_COLUMN], "data": encoded}})


def test_logged_model_is_registered_as_candidate_with_its_threshold(store):
    client = MlflowClient(store["uri"])
    version = client.get_model_version_by_alias(REGISTERED, serving.CANDIDATE)
    assert version.version == store["version"] and version.run_id == store["run_id"]
    info = mlflow.models.get_model_info(f"models:/{REGISTERED}@{serving.CANDIDATE}")
    assert info.signature.inputs.input_names() == [serving.IMAGE_COLUMN]
    assert info.signature.outputs.input_names() == ["probability", "label", "ood_score", "out_of_distribution",
                                                    "mirrored", "blurred", "noisy", "flags"]
    assert "decision support" in info.metadata["intended_use"].lower()
    assert info.saved_input_example_info is not None
    # threshold and JPEG quality travel with the model (its params and an artifact), not as unprefixed run params
    logged = client.get_logged_model(info.model_id)
    assert logged.params["threshold"] == str(THRESHOLD) and logged.params["jpeg_quality"] == str(JPEG_QUALITY)
    assert not {"threshold", "jpeg_quality"} & set(client.get_run(store["run_id"]).data.params)
    classifier = serving.logged_classifier(f"models:/{REGISTERED}@{serving.CANDIDATE}")
    assert (classifier.threshold, classifier.jpeg_quality) == (THRESHOLD, JPEG_QUALITY)
    assert type(classifier.engine).__name__ == "OnnxEngine"  # the bundle's model.onnx travelled with it


def test_predict_with_gradcam_on_a_logged_model_prints_the_result_and_nothing_else(store, xrays, tmp_path):
    """One image through `pneumonia predict --model-uri ... --gradcam`: the table on stdout, the overlay's line
    on stderr; no progress bars (MLflow's artifact downloads, the prediction's), no start-up chatter."""
    result = subprocess.run(["pneumonia", "predict", str(xrays[0]), "--model-uri", f"models:/{REGISTERED}@candidate",
                             "--gradcam", str(tmp_path / "cams")], env=tool_env(MLFLOW_TRACKING_URI=store["uri"]),
                            capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert len(result.stdout.splitlines()) == 2, result.stdout  # the header and the image's row
    # TensorFlow's C++ runtime logs through absl before anything can configure it (TF_CPP_MIN_LOG_LEVEL does
    # not reach those lines): on a machine with a CUDA build and no GPU, "I0000 ... cudart_stub.cc ...".
    said = [line for line in result.stderr.splitlines()
            if not re.match(r"[IWE]\d{4} |WARNING: All log messages before absl::InitializeLog", line)]
    assert said == [f"1 Grad-CAM overlays in {tmp_path / 'cams'}"], result.stderr


def test_promote_moves_the_champion_alias_and_says_what_is_missing(store, capsys):
    client = MlflowClient(store["uri"])
    cli.main(["promote", REGISTERED])
    assert client.get_model_version_by_alias(REGISTERED, serving.CHAMPION).version == store["version"]
    assert f"{REGISTERED}@champion -> version {store['version']}" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_code:
        cli.main(["promote", REGISTERED, "--from", "no-such-alias"])
    assert exit_code.value.code == 2
    error = capsys.readouterr().err
    assert "has no version with alias 'no-such-alias'" in error and "tracking.register_model" in error


def test_serve_refuses_a_taken_port_before_fetching_the_model(capsys, monkeypatch, tmp_path):
    """`mlflow ui` listens on 5000, this command's default too: the port is checked first, so a taken one is named
    (with what to do) before any model is fetched, here one that does not exist."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")  # never the project's
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(SystemExit) as exit_info:
            cli.main(["serve", "-m", "models:/no-such-model@candidate", "--port", str(port)])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert f"cannot serve on 127.0.0.1:{port}: Address already in use" in error and "another port (-p)" in error


def test_served_answers_equal_pneumonia_predict(served, store, xrays, tmp_path, monkeypatch):
    server, group, _ = served
    answer = invoke(server, request_for(xrays))
    assert answer.status_code == 200, answer.text
    answers = answer.json()["predictions"]
    # It predicts with ONNX Runtime: TensorFlow is not even loaded (its import was most of the start-up and memory)
    assert "/tensorflow/" not in Path(f"/proc/{group}/maps").read_text()

    # The CLI as a user runs it, on the registered model (it imports neither TensorFlow nor Keras either) ...
    by_uri = tmp_path / "by_uri.json"
    by_cli = subprocess.run([sys.executable, "-c", WITH_IMPORTS, "predict", *map(str, xrays), "--model-uri",
                             f"models:/{REGISTERED}@candidate", "--json", str(by_uri)],
                            env=tool_env(MLFLOW_TRACKING_URI=store["uri"]), check=True, capture_output=True,
                            text=True, timeout=300)
    assert by_cli.stderr.splitlines()[-1] == "imported: []", by_cli.stderr
    # ... and on the .keras file with its settings beside it, from another folder.
    monkeypatch.chdir(tmp_path)
    cli.main(["predict", *map(str, xrays), "--model", store["model"], "--json", "by_keras.json"])

    for predicted in (json.loads(by_uri.read_text()), json.loads(Path("by_keras.json").read_text())):
        assert [row["file"] for row in predicted] == [str(file) for file in xrays]
        np.testing.assert_allclose([row["probability"] for row in answers], [row["probability"] for row in predicted],
                                   rtol=1e-5, atol=1e-6)
        assert [row["label"] for row in answers] == [row["label"] for row in predicted]
        np.testing.assert_allclose([row["ood_score"] for row in answers], [row["ood_score"] for row in predicted],
                                   rtol=1e-3)
        assert [row["out_of_distribution"] for row in answers] == [row["out_of_distribution"] for row in predicted]
        checks = ("mirrored", "blurred", "noisy", "flags")
        assert [[row[key] for key in checks] for row in answers] == [[row[key] for key in checks] for row in predicted]
    assert all(isinstance(row[key], bool) for row in answers for key in ("mirrored", "blurred", "noisy"))
    assert {row["label"] for row in answers} <= {"NORMAL", "PNEUMONIA"}
    assert all(row["label"] == ("PNEUMONIA" if row["probability"] >= THRESHOLD else "NORMAL") for row in answers)


@pytest.mark.parametrize(("body", "message"), [
    (json.dumps({"dataframe_split": {"columns": ["image"], "data": [["this is not base64!"]]}}),
     "row 0 of column 'image' is not base64"),
    (json.dumps({"dataframe_records": [{"image": base64.b64encode(b"plain text, not a picture").decode()}]}),
     "row 0 of column 'image' is not a readable image"),
    ("", "Ensure that input is a valid JSON"),
    (json.dumps({"dataframe_records": [{"picture": "abcd"}]}), "image"),
], ids=["not-base64", "not-an-image", "empty-body", "no-image-column"])
def test_a_malformed_request_gets_a_4xx_with_a_message_and_the_server_keeps_serving(server, xrays, body, message):
    answer = invoke(server, body)
    assert 400 <= answer.status_code < 500, answer.text
    assert message in answer.json()["message"]

    assert invoke(server, request_for(xrays[:1])).status_code == 200


def test_json_nested_past_any_request_gets_a_400_and_the_server_keeps_serving(server, xrays):
    """100,000 levels of arrays, alone or inside a request: a 400 naming the limit (Python's JSON parser, which
    MLflow's scoring server calls before the model sees the request, recursed into a RecursionError: HTTP 500).
    Brackets inside a string are no nesting: that request gets the model's own answer."""
    deep = "[" * 100_000 + "]" * 100_000
    for body in (deep, '{"dataframe_split": {"columns": ["image"], "data": ' + deep + "}}"):
        answer = invoke(server, body)
        assert answer.status_code == 400, answer.text[:300]
        assert f"nested more than {serving.MAX_JSON_DEPTH} levels deep" in answer.json()["message"]
    brackets_in_a_string = json.dumps({"dataframe_split": {"columns": ["image"], "data": [["[" * 100_000]]}})
    assert "is not base64" in invoke(server, brackets_in_a_string).json()["message"]

    assert invoke(server, request_for(xrays[:1])).status_code == 200


@pytest.mark.parametrize(("body", "depth"), [
    ('{"dataframe_split": {"columns": ["image"], "data": [["abc"]]}}', 4),
    ('{"dataframe_records": [{"image": "[[[["}]}', 3),
    ('[["a \\" [[[ \\\\", "]]"]]', 2),  # an escaped quote, then an escaped backslash, inside strings
    ('[["unterminated [[[[[[', 2),  # the parser stops at the string: what follows is not nesting
    ("[]" * 1000, 1),
    ("", 0),
], ids=["request", "records-brackets-in-a-string", "escapes", "unterminated-string", "flat", "empty"])
def test_json_depth_counts_brackets_outside_strings(body, depth):
    assert serving.json_depth(body.encode()) == depth


def test_base64_wrapped_at_76_columns_is_accepted(server, xrays):
    wrapped = base64.encodebytes(xrays[0].read_bytes()).decode()  # what GNU `base64` prints: 76 columns
    assert "\n" in wrapped
    answers = [invoke(server, json.dumps({"dataframe_split": {"columns": ["image"], "data": [[encoded]]}}))
               for encoded in (wrapped, serving.encode_image(xrays[0].read_bytes()))]
    assert [answer.status_code for answer in answers] == [200, 200], answers[0].text
    assert answers[0].json() == answers[1].json()


def huge_png_base64() -> str:
    from test_images import huge_png

    return serving.encode_image(huge_png(10_000, 10_000))  # ~130 KiB of base64, 100 MP decoded


def hostile_requests() -> dict[str, tuple[str, str]]:
    """{name: (body, what the 400's message says)}: each over one limit, the limit named."""
    def frame(images: list[str]) -> str:
        return json.dumps({"dataframe_split": {"columns": ["image"], "data": [[image] for image in images]}})

    tiny = serving.input_example()[serving.IMAGE_COLUMN][0]
    return {
        "100-megapixels": (frame([huge_png_base64()]), "more than the 36 megapixel limit"),
        "too-many-rows": (frame([tiny] * (serving.MAX_ROWS + 1)), f"more than the limit of {serving.MAX_ROWS} images"),
        "17-MiB-file": (frame(["A" * (17 * 2**20 * 4 // 3)]), "more than the limit of 16 MiB an image file"),
    }


@pytest.mark.parametrize("name", ["100-megapixels", "too-many-rows", "17-MiB-file"])
def test_a_request_over_a_limit_gets_a_400_naming_the_limit(server, name):
    body, message = hostile_requests()[name]
    answer = invoke(server, body)
    assert answer.status_code == 400, answer.text[:300]
    assert message in answer.json()["message"]


def group_rss_mb(group: int) -> float:
    """Resident memory of the processes in a process group, MiB."""
    total = 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[2]) == group:  # field 5 of /proc/<pid>/stat: the process group
                status = (stat.parent / "status").read_text()
                total += int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmRSS:")))
        except (OSError, StopIteration, IndexError, ValueError):
            continue  # a process that ended meanwhile
    return total / 1024


LOAD_CLIENTS = 8
LOAD_REQUESTS = 6  # each client: good and hostile requests in turn
MEMORY_CEILING_MB = 2048  # the server's processes (CLI and worker, TensorFlow and the model loaded) at most


def test_concurrent_good_and_hostile_requests_memory_stays_bounded(served, xrays):
    import threading
    from concurrent.futures import ThreadPoolExecutor

    url, group, _ = served
    good = request_for(xrays[:2])
    expected = invoke(url, good).json()
    hostile = list(hostile_requests().values())
    baseline, peak, done = group_rss_mb(group), [0.0], threading.Event()

    def watch():
        while not done.is_set():
            peak[0] = max(peak[0], group_rss_mb(group))
            time.sleep(0.1)

    def client(number: int) -> list[tuple[str, int, object]]:
        answers = []
        for index in range(LOAD_REQUESTS):
            if (number + index) % 2:
                body, message = hostile[(number + index) % len(hostile)]
                answer = invoke(url, body)
                answers.append(("hostile", answer.status_code, message in answer.text))
            else:
                answer = invoke(url, good)
                answers.append(("good", answer.status_code, answer.json() if answer.ok else answer.text))
        return answers

    watcher = threading.Thread(target=watch)
    watcher.start()
    started = time.monotonic()
    try:
        with ThreadPoolExecutor(LOAD_CLIENTS) as pool:
            results = [answer for answers in pool.map(client, range(LOAD_CLIENTS)) for answer in answers]
    finally:
        done.set()
        watcher.join()
    seconds = time.monotonic() - started

    assert len(results) == LOAD_CLIENTS * LOAD_REQUESTS
    for kind, status, content in results:
        if kind == "good":
            assert status == 200 and content == expected, (status, content)  # every good request, answered right
        else:
            assert status == 400 and content is True, status
    assert peak[0] < MEMORY_CEILING_MB, f"server memory peaked at {peak[0]:.0f} MiB (at rest {baseline:.0f} MiB)"
    print(f"load: {len(results)} requests in {seconds:.1f} s, server memory {baseline:.0f} -> peak {peak[0]:.0f} MiB")


def test_dicom_in_each_form_predicts_as_its_png_served_and_by_the_cli_and_no_patient_data_leaves(
        served, store, dicom_xrays, tmp_path):
    """The same X-ray as PNG and as DICOM in each form: probabilities within 0.001 from the served model and
    from `pneumonia predict` on the folder (DICOM known by content); a DICOM that is not an X-ray gets a 400
    naming why. No header value of the DICOMs in any answer, output, file written, log or the MLflow store."""
    url, _, log = served
    answer = invoke(url, request_for([file for pair in dicom_xrays for file in pair]))
    assert answer.status_code == 200, answer.text
    served_probabilities = np.array([row["probability"] for row in answer.json()["predictions"]]).reshape(-1, 2)
    np.testing.assert_allclose(served_probabilities[:, 0], served_probabilities[:, 1], atol=1e-3)  # DICOM, PNG

    folder = dicom_xrays[0][0].parent
    result = subprocess.run(["pneumonia", "predict", str(folder), "--model-uri", f"models:/{REGISTERED}@candidate",
                             "--json", str(tmp_path / "predictions.json"), "--csv", str(tmp_path / "predictions.csv"),
                             "--gradcam", str(tmp_path / "cams")],
                            env=tool_env(MLFLOW_TRACKING_URI=store["uri"]), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    by_file = {row["file"]: row["probability"] for row in json.loads((tmp_path / "predictions.json").read_text())}
    assert len(by_file) == 2 * len(dicom_xrays)
    predicted = np.array([[by_file[str(file)] for file in pair] for pair in dicom_xrays])
    np.testing.assert_allclose(predicted, served_probabilities, atol=1e-3)

    not_an_x_ray = serving.encode_image(file_bytes(dataset(np.zeros((64, 64), np.uint8), 8, modality="CT")))
    refused = invoke(url, json.dumps({"dataframe_split": {"columns": ["image"], "data": [[not_an_x_ray]]}}))
    assert refused.status_code == 400 and "modality is 'CT', not an X-ray" in refused.json()["message"]
    huge = dataset(np.zeros((1, 1), np.uint8), 8)
    huge.Rows = huge.Columns = 10_000  # 100 megapixels by its header: refused before decoding, as a PNG is
    too_large = invoke(url, json.dumps({"dataframe_split": {"columns": ["image"],
                                                            "data": [[serving.encode_image(file_bytes(huge))]]}}))
    assert too_large.status_code == 400 and "more than the 36 megapixel limit" in too_large.json()["message"]

    store_root = Path(store["model"]).parent
    seen = [answer.text, refused.text, too_large.text, result.stdout, result.stderr, log.read_text(errors="replace")]
    seen += [path.read_bytes().decode("latin-1") for root in (tmp_path, store_root) for path in root.rglob("*")
             if path.is_file()]
    assert not [secret for secret in SECRETS if any(secret in text for text in seen)]


def random_convolution(seed: int):
    """A small random convolution whose output follows the image (the store's one-epoch model, and an untrained
    custom_cnn, score every image alike)."""
    import keras

    inputs = keras.Input((48, 48, 3))
    features = keras.layers.Conv2D(4, 5, kernel_initializer=keras.initializers.RandomNormal(seed=seed))(inputs / 255)
    outputs = keras.layers.Dense(1, "sigmoid", kernel_initializer=keras.initializers.RandomNormal(stddev=5,
                                                                                                  seed=seed + 1))(
        keras.layers.GlobalAveragePooling2D()(keras.layers.Activation("relu")(features)))
    return keras.Model(inputs, outputs)


@pytest.mark.parametrize("members", [1, 2], ids=["one-model", "ensemble-of-two"])
def test_onnx_runtime_gives_the_keras_probabilities_and_ood_scores_of_real_xrays(repo_sample, tmp_path, members):
    """issue 36: the bundle's model.onnx (what predict and the served model predict with) and the Keras model it
    was exported from agree on 40 test X-rays of the committed sample, to float rounding; of one model, and of an
    ensemble of two."""
    import dataclasses

    from pneumonia.classifier import load_classifier
    from pneumonia.engines import KerasEngine, OnnxEngine
    from pneumonia.models.build import ensemble_of

    model = random_convolution(0) if members == 1 else ensemble_of([random_convolution(seed) for seed in (0, 10)])
    model.save(tmp_path / "model.keras")
    write_settings(tmp_path / "model.keras", THRESHOLD, JPEG_QUALITY, model=model)
    with zipfile.ZipFile(repo_sample) as archive:
        names = sorted(name for name in archive.namelist() if "/test/" in name and name.endswith(".jpeg"))
        files = [archive.read(name) for name in names[::len(names) // 40][:40]]
    by_onnx = load_classifier(tmp_path / "model.keras")
    by_keras = dataclasses.replace(by_onnx, engine=KerasEngine(model))
    assert isinstance(by_onnx.engine, OnnxEngine)
    images = [by_onnx.preprocess(data) for data in files]
    onnx, keras = by_onnx.predict(images), by_keras.predict(images)
    assert keras.probabilities.std() > 1e-3 and keras.ood_scores.std() > 0.1  # a model that tells images apart
    np.testing.assert_allclose(onnx.probabilities, keras.probabilities, rtol=0, atol=1e-5)
    np.testing.assert_allclose(onnx.ood_scores, keras.ood_scores, rtol=1e-5)


@pytest.mark.slow  # logs a second model: 15 s
@pytest.mark.parametrize("members", [1, 2], ids=["one-model", "ensemble-of-two"])
def test_test_time_augmentation_gives_evaluate_predict_and_the_served_model_the_same_probabilities(
        store, synthetic_data, xrays, tmp_path, members):
    """evaluate.tta_views: 9. The evaluate stage's predictions (TFRecords), `pneumonia predict`'s (a Classifier)
    and the logged model's (what `mlflow models serve` runs) are each the mean over the same nine views; of one
    model, and of an ensemble of two (train.ensemble_members), saved and loaded as one model file."""
    import pandas as pd

    from pneumonia.classifier import Classifier, load_classifier
    from pneumonia.engines import KerasEngine
    from pneumonia.errors import PipelineError
    from pneumonia.evaluation.calibration import Calibration
    from pneumonia.evaluation.predictions import images_at, predict_split
    from pneumonia.models.augmentation import with_test_time_augmentation
    from pneumonia.models.build import ensemble_of, members_of

    calibration = Calibration("platt", scale=0.7, shift=-0.4)
    model = random_convolution(0) if members == 1 else ensemble_of([random_convolution(seed) for seed in (0, 10)])
    model.save(tmp_path / "model.keras")
    write_settings(tmp_path / "model.keras", THRESHOLD, JPEG_QUALITY, tta_views=9, calibration=calibration)
    model = load_classifier(tmp_path / "model.keras").model  # as `pneumonia predict` has it
    tfrecords = synthetic_data / "data/tfrecords"
    evaluated = predict_split(with_tta := with_test_time_augmentation(model, 9), tfrecords, "test", 8)
    classifier = Classifier(KerasEngine(model, tta_views=9), THRESHOLD, JPEG_QUALITY)
    images = images_at(tfrecords, "test", list(range(len(evaluated.labels))))
    np.testing.assert_allclose(classifier.probabilities(list(images)), evaluated.probabilities, rtol=1e-5)
    assert classifier.engine.predictor is not model and with_tta is not model

    with mlflow.start_run(experiment_id=mlflow.get_experiment_by_name("serving").experiment_id):
        info = serving.log_model(tmp_path / "model.keras")
    served = mlflow.pyfunc.load_model(info.model_uri).predict(
        pd.DataFrame({serving.IMAGE_COLUMN: [serving.encode_image(file.read_bytes()) for file in xrays]}))
    preprocessed = [classifier.preprocess(file) for file in xrays]
    # served: the mean over the views, then the run's calibration (evaluate.calibration), as evaluate makes it
    np.testing.assert_allclose(served["probability"], calibration.apply(classifier.probabilities(preprocessed)),
                               rtol=1e-5)
    assert served["probability"].tolist() == pytest.approx(
        Classifier(KerasEngine(model, 9), THRESHOLD, JPEG_QUALITY, calibration).probabilities(preprocessed).tolist(),
        rel=1e-5)
    plain = Classifier(KerasEngine(model), THRESHOLD, JPEG_QUALITY).probabilities(preprocessed)
    assert not np.allclose(classifier.probabilities(preprocessed), plain, rtol=1e-5)  # the views change them
    if members > 1:  # the mean of the members' probabilities, as benchmarks/prediction_levers averages them
        by_member = [Classifier(KerasEngine(member), THRESHOLD, JPEG_QUALITY).probabilities(preprocessed)
                     for member in members_of(model)]
        assert len(by_member) == members and not np.allclose(*by_member)
        np.testing.assert_allclose(plain, np.mean(by_member, axis=0), rtol=1e-5)

    # `pneumonia predict` takes the views from the model's settings, as it takes the threshold.
    assert load_classifier(tmp_path / "model.keras").tta_views == 9
    settings = tmp_path / "model.json"
    settings.write_text(settings.read_text().replace('"tta_views": 9', '"tta_views": 5'))
    with pytest.raises(PipelineError, match=r"model.json is not a model settings file of this version \(tta_views"):
        load_classifier(tmp_path / "model.keras")


@pytest.mark.slow  # self-trains and logs a small model: 20 s
def test_a_self_trained_model_gives_evaluate_predict_and_the_served_model_its_own_probabilities(
        store, synthetic_data, xrays, tmp_path):
    """`pneumonia adapt --method self_training` writes a .keras model: the evaluate stage's predictions (TFRecords),
    `pneumonia predict --model`'s (a Classifier of the file) and the logged model's are those of the model
    self-training made in memory."""
    import keras
    import pandas as pd

    from pneumonia import adaptation
    from pneumonia.classifier import Classifier, load_classifier
    from pneumonia.engines import KerasEngine
    from pneumonia.evaluation.predictions import images_at, pneumonia_probability, predict_split
    from pneumonia.models.build import load_model
    from test_adaptation import site_model

    tfrecords = synthetic_data / "data/tfrecords"
    count = len(predict_split(site_model(48), tfrecords, "test", 8).labels)
    images = images_at(tfrecords, "test", list(range(count)))
    adapted = adaptation.self_train(site_model(48), images, 0.5, seed=0, epochs=1, min_per_class=2)
    keras.saving.save_model(adapted, tmp_path / "adapted.keras")
    write_settings(tmp_path / "adapted.keras", THRESHOLD, JPEG_QUALITY)
    in_memory = pneumonia_probability(adapted.predict(images.astype(np.float32), verbose=0))

    evaluated = predict_split(load_model(tmp_path / "adapted.keras"), tfrecords, "test", 8)
    np.testing.assert_allclose(evaluated.probabilities, in_memory, rtol=1e-5)
    predicted = load_classifier(tmp_path / "adapted.keras").probabilities(list(images))
    np.testing.assert_allclose(predicted, in_memory, rtol=1e-5, atol=1e-5)  # adapted.onnx: ONNX Runtime's rounding
    with mlflow.start_run(experiment_id=mlflow.get_experiment_by_name("serving").experiment_id):
        info = serving.log_model(tmp_path / "adapted.keras")
    served = mlflow.pyfunc.load_model(info.model_uri).predict(
        pd.DataFrame({serving.IMAGE_COLUMN: [serving.encode_image(file.read_bytes()) for file in xrays]}))
    classifier = Classifier(KerasEngine(adapted), THRESHOLD, JPEG_QUALITY)
    expected = classifier.probabilities([classifier.preprocess(file) for file in xrays])
    np.testing.assert_allclose(served["probability"], expected, rtol=1e-5, atol=1e-5)
    assert not np.allclose(expected, Classifier(KerasEngine(site_model(48)), THRESHOLD, JPEG_QUALITY).probabilities(
        [classifier.preprocess(file) for file in xrays]), rtol=1e-3)  # self-training changed the model
