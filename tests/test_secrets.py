"""A tracking URI with a password goes through every output of the tracking code (models/mlflow_run.json,
logs, stdout, error messages, tracebacks, the MLflow run itself) with the password replaced by ***."""

import json
import subprocess
import sys
import textwrap
from collections.abc import Iterator

import pytest
from mlflow import MlflowClient

from conftest import mlflow_tracking_server, tool_env
from pneumonia.logs import redact

pytestmark = pytest.mark.slow  # each starts a tracking server or a stage

PASSWORD = "s3cret@Pw:x"  # a raw "@" and ":" in it: redaction goes to the last "@"

# What the train and evaluate stages do with the store, under run_stage, then a failure of each kind.
STAGE = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    import mlflow
    from pneumonia import serving, tracking
    from pneumonia.config import flatten, parse_params
    from pneumonia.logs import run_stage

    def main():
        manifests = Path("manifests")
        manifests.mkdir(exist_ok=True)
        (manifests / "train.csv").write_text("path,label\\na.jpeg,0\\n")
        params = parse_params({})
        with tracking.training_run(params.tracking, flatten(params), manifests) as run:
            mlflow.log_metrics({"loss": 0.5}, step=1)
            tracking.write_run_info(Path("mlflow_run.json"))
        with tracking.resumed_run(Path("mlflow_run.json")):
            mlflow.log_metric("test_auc", 0.9)
        print("run", run.info.run_id)
        if sys.argv[1] == "pipeline-error":
            serving.logged_classifier("models:/no-such-model@candidate")
        else:
            raise RuntimeError("unexpected failure talking to " + tracking.tracking_uri())

    run_stage(main)
""")


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[int]:
    """A real `mlflow server` on 127.0.0.1 (it ignores the basic-auth header the URI's password makes): its port."""
    root = tmp_path_factory.mktemp("server")
    with mlflow_tracking_server(root / "mlflow.db", root / "artifacts") as url:
        yield int(url.rsplit(":", 1)[1])


def test_redact_hides_only_the_password():
    assert redact("postgresql://alice:pw@db:5432/mlflow") == "postgresql://alice:***@db:5432/mlflow"
    assert redact("see mysql+pymysql://root:x%40y@h/m and http://h:80/") == "see mysql+pymysql://root:***@h/m and http://h:80/"
    assert redact("sqlite:////abs/mlflow.db") == "sqlite:////abs/mlflow.db"
    assert redact("http://h:80/x?to=a@b") == "http://h:80/x?to=a@b"


@pytest.mark.parametrize("password", ["p@ss", "p:ss", "p%40ss", "p/ss", "a@b:c/d%40e@f"])
def test_redact_hides_a_password_whatever_its_characters(password):
    """Up to the last "@" of the authority: a raw "@", ":" or "/" in a password leaves no part of it."""
    assert redact(f"http://alice:{password}@h:5000/x") == "http://alice:***@h:5000/x"
    assert redact(f"store http://alice:{password}@h, then more") == "store http://alice:***@h, then more"


@pytest.mark.parametrize("failure", ["pipeline-error", "traceback"])
def test_a_password_in_the_tracking_uri_reaches_no_output(server, tmp_path, failure):
    uri = f"http://alice:{PASSWORD}@127.0.0.1:{server}"
    result = subprocess.run([sys.executable, "-c", STAGE, failure], cwd=tmp_path, capture_output=True, text=True,
                            env=tool_env(MLFLOW_TRACKING_URI=uri), timeout=300)
    output = result.stdout + result.stderr
    assert result.returncode != 0 and "run " in result.stdout, output  # it logged, then failed as asked
    assert "alice:***@127.0.0.1" in result.stderr  # the logs and the error name the store ...
    assert PASSWORD not in output and "@Pw" not in output  # ... without its password or a part of it
    assert ("cannot load the MLflow model" if failure == "pipeline-error" else "RuntimeError") in result.stderr

    handed_over = json.loads((tmp_path / "mlflow_run.json").read_text())
    assert handed_over["tracking_uri"] == f"http://alice:***@127.0.0.1:{server}"
    run = MlflowClient(f"http://127.0.0.1:{server}").get_run(handed_over["run_id"])
    assert run.data.metrics["test_auc"] == 0.9  # the evaluate side found the run with the password from the env
    assert PASSWORD not in json.dumps([run.data.params, run.data.tags, run.info.artifact_uri])


def test_resuming_without_the_password_says_what_to_set(server, tmp_path, monkeypatch):
    from pneumonia import tracking
    from pneumonia.errors import PipelineError

    (tmp_path / "run.json").write_text(json.dumps(
        {"run_id": "0" * 32, "experiment_id": "0", "tracking_uri": f"http://alice:***@127.0.0.1:{server}"}))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with pytest.raises(PipelineError, match=r"set MLFLOW_TRACKING_URI to that URI with its password"):
        with tracking.resumed_run(tmp_path / "run.json"):
            pass
