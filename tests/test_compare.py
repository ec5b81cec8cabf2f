"""`pneumonia compare` on runs in an MLflow store; tests/test_pipeline_e2e.py runs it on a queued sweep."""

import csv

import pytest
from mlflow.tracking import MlflowClient

from conftest import PNG_MAGIC
from pneumonia import cli
from pneumonia.comparison import compare
from pneumonia.errors import PipelineError


def log_run(client: MlflowClient, experiment_id: str, model: str, fine_tune: str = "full", **metrics: float) -> None:
    run_id = client.create_run(experiment_id, tags={"dvc.exp_name": f"exp-{model}"}).info.run_id
    for key, value in {"model.name": model, "train.fine_tune": fine_tune, "data.image_size": 64}.items():
        client.log_param(run_id, key, value)
    for key, value in metrics.items():
        client.log_metric(run_id, key, value)
    client.set_terminated(run_id)


@pytest.mark.slow
def test_compare_tables_and_plots_the_runs_best_auc_first(tmp_path, monkeypatch):
    # The store `pneumonia compare` finds through MLFLOW_TRACKING_URI, as a user's tracking server.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    sweep = client.create_experiment("sweep")
    log_run(client, sweep, "custom_cnn", train_seconds=30, peak_memory_mb=900, total_params=1e5,
            trainable_params=1e5, test_accuracy=0.8, test_roc_auc=0.85)
    log_run(client, sweep, "densenet121", "frozen", train_seconds=300, peak_memory_mb=2500, total_params=7e6,
            trainable_params=1e5, test_accuracy=0.9, test_roc_auc=0.95)
    log_run(client, sweep, "xception", "partial", train_seconds=200, peak_memory_mb=2000)  # not evaluated (yet)
    log_run(client, sweep, "resnet50v2")  # failed before the end of training: left out

    cli.main(["compare", "--experiment", "sweep", "--out", str(tmp_path / "out")])

    with (tmp_path / "out/runs.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [row["model.name"] for row in rows] == ["densenet121", "custom_cnn", "xception"]
    assert rows[0]["test_roc_auc"] == "0.95" and rows[0]["train_seconds"] == "300" and rows[2]["test_roc_auc"] == ""
    assert "gpu_peak_memory_mb" not in rows[0]  # no run had a GPU: no empty column
    markdown = (tmp_path / "out/runs.md").read_text()
    assert "| densenet121 |" in markdown and markdown.count("\n|") == 2 + 3  # header, rule, three runs
    assert (tmp_path / "out/runs.png").read_bytes().startswith(PNG_MAGIC)

    with pytest.raises(PipelineError, match="no MLflow experiment 'nope'.*sweep"):
        compare("nope", tmp_path / "out")
