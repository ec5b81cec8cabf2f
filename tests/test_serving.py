"""The run's MLflow model: logged and registered as `candidate`, served by the real `mlflow models serve`
on 127.0.0.1, answering real X-rays exactly as `pneumonia predict` does."""

import base64
import json
import os
import signal
import subprocess
import time
import zipfile
from pathlib import Path

import mlflow
import numpy as np
import pytest
import requests
from conftest import free_port, tool_env
from mlflow import MlflowClient

from pneumonia import cli, serving
from pneumonia.config import parse_params
from pneumonia.training import train

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
            train(params, synthetic_data / "data/tfrecords", None, root / "model.keras")
            info = serving.log_model(root / "model.keras", THRESHOLD, params)
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
def server(store) -> str:
    """`mlflow models serve` of the registered candidate, in this environment; stopped at teardown."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    process = subprocess.Popen(
        ["mlflow", "models", "serve", "-m", f"models:/{REGISTERED}@candidate", "-h", "127.0.0.1", "-p", str(port),
         "--env-manager", "local", "--workers", "1"],
        env=tool_env(MLFLOW_TRACKING_URI=store["uri"]), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        start_new_session=True,  # its own process group: the uvicorn worker goes down with it
    )
    try:
        deadline = time.monotonic() + SERVER_START_SECONDS
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise AssertionError(
                    f"mlflow models serve exited ({process.returncode}):\n{process.stderr.read().decode()}")
            try:
                if requests.get(f"{url}/ping", timeout=2).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            time.sleep(1)
        else:
            raise AssertionError(f"mlflow models serve did not answer /ping within {SERVER_START_SECONDS} s")
        yield url
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=30)


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
    assert info.signature.outputs.input_names() == ["probability", "label"]
    assert info.saved_input_example_info is not None
    # threshold and JPEG quality travel with the model (its params and an artifact), not as unprefixed run params
    logged = client.get_logged_model(info.model_id)
    assert logged.params["threshold"] == str(THRESHOLD) and logged.params["jpeg_quality"] == str(JPEG_QUALITY)
    assert not {"threshold", "jpeg_quality"} & set(client.get_run(store["run_id"]).data.params)
    classifier = serving.load_classifier(f"models:/{REGISTERED}@{serving.CANDIDATE}")
    assert (classifier.threshold, classifier.jpeg_quality) == (THRESHOLD, JPEG_QUALITY)


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


def test_served_answers_equal_pneumonia_predict(server, store, xrays, tmp_path, monkeypatch):
    answer = invoke(server, request_for(xrays))
    assert answer.status_code == 200, answer.text
    served = answer.json()["predictions"]

    # The CLI as a user runs it, on the registered model ...
    by_uri = tmp_path / "by_uri.json"
    subprocess.run(["pneumonia", "predict", *map(str, xrays), "--model-uri", f"models:/{REGISTERED}@candidate",
                    "--json", str(by_uri)], env=tool_env(MLFLOW_TRACKING_URI=store["uri"]), check=True,
                   capture_output=True, timeout=300)
    # ... and on the plain .keras file with the evaluate stage's threshold and the params' JPEG quality.
    monkeypatch.chdir(tmp_path)
    Path("models").mkdir()
    Path("models/model.keras").symlink_to(store["model"])
    Path("metrics").mkdir()
    Path("metrics/test.json").write_text(json.dumps({"threshold": THRESHOLD}))
    Path("params.yaml").write_text(f"tfrecords:\n  jpeg_quality: {JPEG_QUALITY}\n")
    cli.main(["predict", *map(str, xrays), "--json", "by_keras.json"])

    for predicted in (json.loads(by_uri.read_text()), json.loads(Path("by_keras.json").read_text())):
        assert [row["file"] for row in predicted] == [str(file) for file in xrays]
        np.testing.assert_allclose([row["probability"] for row in served], [row["probability"] for row in predicted],
                                   rtol=1e-5, atol=1e-6)
        assert [row["label"] for row in served] == [row["label"] for row in predicted]
    assert {row["label"] for row in served} <= {"NORMAL", "PNEUMONIA"}
    assert all(row["label"] == ("PNEUMONIA" if row["probability"] >= THRESHOLD else "NORMAL") for row in served)


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
