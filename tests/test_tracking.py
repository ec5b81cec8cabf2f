"""Where runs go, and what identifies them."""

import mlflow
from mlflow.tracking import MlflowClient

from pneumonia import tracking
from pneumonia.config import parse_params


def test_store_is_at_the_dvc_root_unless_overridden(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    assert tracking.tracking_uri() == f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert tracking.tracking_uri() == "http://127.0.0.1:5000"


def test_training_run_logs_params_tags_and_hands_over_its_id(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    monkeypatch.setenv("DVC_EXP_NAME", "brave-newt")
    manifests = tmp_path / "manifests"
    manifests.mkdir()
    (manifests / "train.csv").write_text("path,label\na.jpeg,0\n")
    params = parse_params({"train": {"epochs": 3}})

    with tracking.training_run(params, manifests) as run:
        tracking.write_run_info(run, tmp_path / "run.json")
    with tracking.resumed_run(tmp_path / "run.json") as resumed:
        mlflow.log_metric("test_auc", 0.9)
        assert resumed.info.run_id == run.info.run_id

    stored = MlflowClient(tracking.tracking_uri()).get_run(run.info.run_id)
    assert stored.data.params["train.epochs"] == "3"
    assert "evaluate.threshold" not in stored.data.params  # evaluate records its own settings
    assert stored.data.tags["dvc.exp_name"] == "brave-newt"
    assert stored.data.tags["data.manifests_sha256"] == tracking.manifests_hash(manifests)
    assert stored.data.metrics["test_auc"] == 0.9
    experiment = MlflowClient(tracking.tracking_uri()).get_experiment(stored.info.experiment_id)
    assert experiment.artifact_location == (tmp_path / "mlartifacts").as_uri()


def test_manifests_hash_changes_with_content(tmp_path):
    (tmp_path / "train.csv").write_text("a\n")
    first = tracking.manifests_hash(tmp_path)
    (tmp_path / "train.csv").write_text("b\n")
    assert tracking.manifests_hash(tmp_path) != first
