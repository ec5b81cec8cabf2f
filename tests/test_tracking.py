"""Where runs go, and what identifies them."""

import time
from pathlib import Path

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from pneumonia import tracking
from pneumonia.config import flatten, parse_params


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

    with tracking.training_run(params.tracking, flatten(params), manifests) as run:
        tracking.write_run_info(tmp_path / "run.json")
    with tracking.resumed_run(tmp_path / "run.json") as resumed:
        mlflow.log_metric("test_auc", 0.9)
        assert resumed.info.run_id == run.info.run_id

    stored = MlflowClient(tracking.tracking_uri()).get_run(run.info.run_id)
    assert stored.data.params["train.epochs"] == "3"
    assert "evaluate.threshold" not in stored.data.params  # evaluate records its own settings
    assert stored.data.tags["dvc.exp_name"] == "brave-newt"
    assert stored.info.run_name == "brave-newt"  # the run is named as `dvc exp show` names the experiment
    assert stored.data.tags["data.manifests_sha256"] == tracking.manifests_hash(manifests)
    assert stored.data.metrics["test_auc"] == 0.9
    experiment = MlflowClient(tracking.tracking_uri()).get_experiment(stored.info.experiment_id)
    assert experiment.artifact_location == (tmp_path / "mlartifacts").as_uri()


def test_manifests_hash_changes_with_content(tmp_path):
    (tmp_path / "train.csv").write_text("a\n")
    first = tracking.manifests_hash(tmp_path)
    (tmp_path / "train.csv").write_text("b\n")
    assert tracking.manifests_hash(tmp_path) != first


# MLflow's 20 s SQLite busy timeout cut to 0.2 s in a process that writes (the test's lock is held past it)
SHORT_BUSY_TIMEOUT = """
from mlflow.store.db import utils
from sqlalchemy import sql
utils.sql = type("sql", (), {"text": staticmethod(lambda text: sql.text(text.replace("= 20000", "= 200")))})
"""

# One queued experiment's training: its run opened as the train stage opens it (on a store that may not
# exist yet), then per-epoch metrics as tracking.epoch_metrics_callback logs them.
LOGGER = SHORT_BUSY_TIMEOUT + """
import sys, time
from pathlib import Path
from pneumonia import tracking
from pneumonia.config import parse_params
folder = Path(sys.argv[1])
config = parse_params({"tracking": {"experiment": "queue"}}).tracking
with tracking.training_run(config, {"model.name": "custom_cnn"}, folder) as run:
    (folder / f"ready-{run.info.run_id}").touch()
    while not (folder / "locked").exists():
        time.sleep(0.1)
    for epoch in range(1, 6):
        tracking.log_epoch_metrics({"loss": 1 / epoch, "val_auc": 0.5 + epoch / 20}, epoch)
"""


@pytest.mark.slow
def test_four_processes_start_on_a_new_store_and_log_per_epoch_metrics_while_it_is_locked(tmp_path):
    """4 trainings start at once on a project with no MLflow store yet, as a queued sweep does (before,
    MLflow's schema migrations broke when two ran at once); then each logs every epoch while another
    process holds the store's write lock longer than MLflow's busy timeout (a long write of another
    experiment, a backup, `mlflow gc`; the timeout, 20 s, is cut to 0.2 s here): before, each failed with
    "database is locked"."""
    import sqlite3
    import subprocess
    import sys
    import time

    from conftest import tool_env

    assert not (tmp_path / "mlflow.db").exists()
    loggers = [subprocess.Popen([sys.executable, "-c", LOGGER, str(tmp_path)], env=tool_env(DVC_ROOT=str(tmp_path)),
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for _ in range(4)]
    try:
        deadline = time.monotonic() + 180
        while len(list(tmp_path.glob("ready-*"))) < 4:
            assert time.monotonic() < deadline and all(p.poll() is None for p in loggers), "loggers did not start"
            time.sleep(0.2)
        lock = sqlite3.connect(tmp_path / "mlflow.db", isolation_level=None)
        lock.execute("BEGIN EXCLUSIVE")
        (tmp_path / "locked").touch()
        time.sleep(3)
        lock.execute("COMMIT")
        lock.close()
        outputs = [p.communicate(timeout=240)[0] for p in loggers]
    finally:
        for p in loggers:
            p.kill()
    assert [p.returncode for p in loggers] == [0] * 4, "\n".join(outputs)
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    [experiment] = [e for e in client.search_experiments() if e.name == "queue"]
    assert {r.info.run_id for r in client.search_runs([experiment.experiment_id])} == {
        ready.name.removeprefix("ready-") for ready in tmp_path.glob("ready-*")}
    for ready in tmp_path.glob("ready-*"):
        history = client.get_metric_history(ready.name.removeprefix("ready-"), "val_auc")
        assert sorted(point.step for point in history) == [1, 2, 3, 4, 5]


def test_plain_repro_runs_are_named_after_model_and_commit(tmp_path, monkeypatch):
    monkeypatch.delenv("DVC_EXP_NAME", raising=False)
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))  # not a git repository: no commit to name
    assert tracking.run_name("mobilenetv2") == "repro-mobilenetv2"
    monkeypatch.setattr(tracking, "git_commit", lambda: "0123456789abcdef")
    assert tracking.run_name("mobilenetv2") == "repro-mobilenetv2-0123456"


def test_manifests_are_logged_as_datasets_with_content_digests(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    for split, rows in (("train", "a.jpeg,0\nb.jpeg,1\n"), ("val", "c.jpeg,1\n"), ("test", "d.jpeg,0\n")):
        (tmp_path / f"{split}.csv").write_text("path,label\n" + rows)
    params = parse_params({})
    with tracking.training_run(params.tracking, flatten(params), tmp_path) as run:
        logged = tracking.log_manifests(tmp_path, {"train": "training", "val": "validation", "test": "testing"})
    inputs = MlflowClient(tracking.tracking_uri()).get_run(run.info.run_id).inputs.dataset_inputs
    found = {i.dataset.name: (i.dataset.digest, [t.value for t in i.tags if t.key == "mlflow.data.context"])
             for i in inputs}
    assert found == {name: (dataset.digest, [context]) for (name, dataset), context in
                     zip(logged.items(), ("training", "validation", "testing"))}
    assert len({digest for digest, _ in found.values()}) == 3  # the content decides the digest


@pytest.mark.parametrize("command", [["promote", "pneumonia-model"], ["compare", "--experiment", "pneumonia"],
                                     ["predict", "--model-uri", "models:/pneumonia-model@champion", "x.png"]])
def test_commands_fail_fast_on_a_dead_tracking_server(monkeypatch, capsys, command):
    """issue 27: promote, compare and predict --model-uri retried a closed port for minutes (promote 268 s, then
    reported a missing alias); they stop at once with the train stage's message."""
    from conftest import free_port
    from pneumonia import cli, comparison, serving  # noqa: F401 - imported before the clock starts

    dead = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", dead)
    started = time.monotonic()
    with pytest.raises(SystemExit) as exit_info:
        cli.main(command)
    assert time.monotonic() - started < 10
    assert exit_info.value.code == 2
    assert f"the MLflow tracking server {dead} (MLFLOW_TRACKING_URI) cannot be reached" in capsys.readouterr().err


# The evaluate stage's MLflow writes (stages/evaluate.py) and `pneumonia promote`, on a run the train stage
# opened; before each write it waits until the test holds the store's write lock. MLflow's 20 s busy
# timeout is cut to 0.2 s here, so that a lock held 1.5 s is one held past it.
EVALUATE_WRITES = SHORT_BUSY_TIMEOUT + """
import sys, time
from pathlib import Path

import keras, mlflow
from pneumonia import serving, tracking
from pneumonia.config import parse_params

folder = Path(sys.argv[1])
step = 0

def locked():
    global step
    step += 1
    (folder / f"ready-{step}").touch()
    while not (folder / f"locked-{step}").exists():
        time.sleep(0.05)

manifests = folder / "manifests"
manifests.mkdir()
(manifests / "test.csv").write_text("path,label\\na.jpeg,0\\n")
inputs = keras.Input((8, 8, 3))
pooled = keras.layers.GlobalAveragePooling2D()(keras.layers.Conv2D(2, 3)(inputs))
model = keras.Model(inputs, keras.layers.Dense(1, activation="sigmoid")(pooled))
model.save(folder / "model.keras")
sys.path.insert(0, sys.argv[2])
from bundles import write_settings
write_settings(folder / "model.keras", 0.5, 90, model=model)
config = parse_params({}).tracking
with tracking.training_run(config, {"model.name": "custom_cnn"}, manifests) as run:
    tracking.write_run_info(folder / "run.json")
locked()
with tracking.resumed_run(folder / "run.json"):
    locked()
    tracking.retry_locked(mlflow.set_tags, {"evaluate.seed": 1})
    locked()
    logged = serving.log_model(folder / "model.keras", "pneumonia-test")
    locked()
    datasets = tracking.log_manifests(manifests, {"test": "testing"})
    locked()
    tracking.retry_locked(mlflow.log_metrics, {"test_auc": 0.9}, model_id=logged.model_id, dataset=datasets["test"])
    locked()
    tracking.retry_locked(mlflow.log_artifact, str(folder / "run.json"), artifact_path="evaluation")
    locked()
locked()
print("promoted to version", serving.promote("pneumonia-test"))
"""


@pytest.mark.slow
def test_every_write_of_evaluate_and_promote_waits_out_a_locked_store(tmp_path):
    """Each write the evaluate stage and `pneumonia promote` make (reopening the run, tags, the logged and
    registered model, datasets, metrics, artifacts, closing the run, moving an alias) meets a store whose
    write lock another process holds past the busy timeout: each succeeds once it is released (before,
    the evaluate stage failed after all its work with "database is locked")."""
    import sqlite3
    import subprocess
    import sys
    import time

    from conftest import tool_env

    writes, log, waiting = 8, tmp_path / "log", "the MLflow store is locked by another process"

    def wait_for(reached, what: str) -> None:
        deadline = time.monotonic() + 180
        while not reached():
            assert process.poll() is None, log.read_text()
            assert time.monotonic() < deadline, f"{what} not reached:\n{log.read_text()}"
            time.sleep(0.05)

    with log.open("w") as output:
        process = subprocess.Popen([sys.executable, "-c", EVALUATE_WRITES, str(tmp_path), str(Path(__file__).parent)],
                                   env=tool_env(DVC_ROOT=str(tmp_path)), stdout=output, stderr=subprocess.STDOUT)
    try:
        for step in range(1, writes + 1):
            wait_for((tmp_path / f"ready-{step}").exists, f"write {step}")
            waited = log.read_text().count(waiting)
            lock = sqlite3.connect(tmp_path / "mlflow.db", isolation_level=None)
            lock.execute("BEGIN EXCLUSIVE")
            (tmp_path / f"locked-{step}").touch()
            # Held until the write has met it past the busy timeout and said it waits: released, it succeeds
            wait_for(lambda waited=waited: log.read_text().count(waiting) > waited, f"the wait of write {step}")
            lock.execute("COMMIT")
            lock.close()
        process.wait(timeout=240)
        output = log.read_text()
    finally:
        process.kill()
    assert process.returncode == 0, output
    assert "promoted to version 1" in output
    assert output.count(waiting) >= writes
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    [run] = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert run.info.status == "FINISHED" and run.data.metrics["test_auc"] == 0.9
    assert run.data.tags["evaluate.seed"] == "1"
    assert str(client.get_model_version_by_alias("pneumonia-test", "champion").version) == "1"


def test_a_deleted_run_or_the_store_of_another_project_is_refused_before_evaluating(tmp_path, monkeypatch):
    """issue 33: a deleted run failed the evaluate stage after its work (an MlflowException traceback); a copy of
    the project (cp -r) wrote into the original's store, which models/mlflow_run.json names by absolute path."""
    from pneumonia.errors import PipelineError

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    original, copy = tmp_path / "original", tmp_path / "copy"
    (original / "manifests").mkdir(parents=True)
    (original / "manifests" / "train.csv").write_text("path,label\na.jpeg,0\n")
    monkeypatch.setenv("DVC_ROOT", str(original))
    with tracking.training_run(parse_params({}).tracking, {"model.name": "custom_cnn"},
                                                             original / "manifests") as run:
        tracking.write_run_info(original / "run.json")
    tracking.check_run(original / "run.json")  # the run as the train stage left it: fine

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # mlflow.set_tracking_uri sets it: a fresh process's
    copy.mkdir()
    (copy / "run.json").write_bytes((original / "run.json").read_bytes())
    monkeypatch.setenv("DVC_ROOT", str(copy))
    for check in (tracking.check_run, lambda info: tracking.resumed_run(info).__enter__()):
        with pytest.raises(PipelineError, match=rf"records run {run.info.run_id} in the MLflow store of the project "
                                                rf"at {original}, not in this one \({copy}\): this folder was copied"):
            check(copy / "run.json")
    assert not (copy / "mlflow.db").exists()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{original / 'mlflow.db'}")  # on purpose: allowed
    tracking.check_run(copy / "run.json")

    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    monkeypatch.setenv("DVC_ROOT", str(original))
    MlflowClient(tracking.tracking_uri()).delete_run(run.info.run_id)
    with pytest.raises(PipelineError, match=rf"run {run.info.run_id} that .* was deleted: restore it "
                                            rf"\(`mlflow runs restore --run-id {run.info.run_id}`"):
        tracking.check_run(original / "run.json")
