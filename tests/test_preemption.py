"""A train stage killed (SIGKILL) after its first epoch resumes at the second when started again,
in the same MLflow run, and ends with the outputs of an uninterrupted run; with its backup in the
project's backup/train/ or under train.backup_uri (a file:// URI here, through tf.io.gfile as a
gs:// bucket would be: no bucket is reachable from the tests)."""

import json
import time
from pathlib import Path

import pytest

from pneumonia.config import parse_params
from pneumonia.errors import PipelineError
from test_distribute import prepared_project, run_store, train_stage

EPOCHS = 3


def finished_epochs(backup: Path | None) -> int:
    """The epochs Keras's backup of the first stage in `backup` records as finished."""
    try:
        return json.loads((backup / "stage-1/training_metadata.json").read_text())["epoch"]
    except (TypeError, OSError, ValueError, KeyError):  # no backup yet, not written yet, or being written
        return 0


@pytest.mark.parametrize(("backup_uri", "chief_backup"), [
    (None, "backup/train/chief"),  # the default: in the project
    ("backups", "backups/*/chief"),  # train.backup_uri = file://<tmp>/backups: <uri>/<fingerprint>/<worker>
], ids=["local", "file-uri"])
@pytest.mark.e2e
def test_a_killed_training_resumes_after_its_last_finished_epoch(synthetic_data, tmp_path, backup_uri, chief_backup):
    uri = {"backup_uri": f"file://{tmp_path / backup_uri}"} if backup_uri else {}
    # min_epochs 1: every epoch may be checkpointed, so the killed run has a best model to resume beside
    project = prepared_project(synthetic_data, tmp_path, epochs=EPOCHS, early_stopping_patience=EPOCHS, min_epochs=1,
                               **uri)

    def backup() -> Path | None:
        return next(tmp_path.glob(chief_backup), None)

    first = train_stage(project)
    while finished_epochs(backup()) < 1 and first.poll() is None:
        time.sleep(0.02)
    first.kill()
    output = first.communicate()[0]
    assert first.returncode == -9, output[-3000:]  # killed, not finished
    backed_up = finished_epochs(backup())
    assert backed_up == 1, output[-3000:]
    chief = backup()
    assert ({"fingerprint", "history.json", "best.keras", "mlflow_run_id", "stage-1"}
            <= {p.name for p in chief.iterdir()})
    assert "sqlite" not in (chief / "fingerprint").read_text()  # the tracking URI is hashed in, never written
    if backup_uri:
        assert not (project / "backup").exists()  # nothing kept on the VM's disk
    run_id = (chief / "mlflow_run_id").read_text()
    assert not (project / "models/model.keras").exists()

    second = train_stage(project)
    output = second.communicate(timeout=240)[0]
    assert second.returncode == 0, output[-3000:]
    assert f"Epoch 2/{EPOCHS}" in output and f"Epoch 1/{EPOCHS}" not in output  # resumed at epoch 2

    assert (project / "models/model.keras").is_file()
    assert json.loads((project / "metrics/train.json").read_text())["epochs_trained"] == EPOCHS
    history_rows = (project / "plots/train_history.csv").read_text().splitlines()[1:]
    assert [row.split(",")[0] for row in history_rows] == ["1", "2", "3"]
    store = run_store(project)
    [run] = store.search_runs([store.get_experiment_by_name("pneumonia").experiment_id])
    assert run.info.run_id == run_id and run.info.status == "FINISHED"  # the same run, reopened
    for metric in ("loss", "val_auc", "val_loss"):
        assert [point.step for point in store.get_metric_history(run_id, metric)] == [1, 2, 3], metric
    assert json.loads((project / "models/mlflow_run.json").read_text())["run_id"] == run_id
    assert not chief.exists()  # finished: the next training starts afresh
    if backup_uri:
        assert not any((tmp_path / backup_uri).iterdir())  # its fingerprint's folder too
        assert not (project / "backup").exists()


@pytest.mark.parametrize("as_uri", [False, True], ids=["local", "file-uri"])
def test_a_backup_of_other_params_or_data_is_discarded_not_resumed(tmp_path, as_uri):
    from pneumonia.training.backup import TrainingBackup

    backup = tmp_path / "backup"
    folder = f"file://{backup}" if as_uri else backup
    assert not TrainingBackup(folder, "params A").open()  # nothing to resume
    (backup / "history.json").write_text("[]")
    assert TrainingBackup(folder, "params A").open() and (backup / "history.json").exists()  # same: resume
    assert not TrainingBackup(folder, "params B").open() and not (backup / "history.json").exists()  # start afresh


def test_experiments_sharing_a_backup_uri_keep_apart(synthetic_data):
    """Queued experiments or several machines may share train.backup_uri: each training's backup is
    under its own fingerprint (params, data, tracking URI), so none removes or resumes another's."""
    from pneumonia.training.backup import TrainingBackup

    tfrecords = synthetic_data / "data/tfrecords"
    params = parse_params({"train": {"backup_uri": "gs://bucket/backups/"}})
    fingerprint = TrainingBackup.fingerprint_of(params.model, params.train, tfrecords, "http://user:secret@mlflow:5000")
    others = [TrainingBackup.fingerprint_of(params.model, params.train.model_copy(update={"epochs": 3}), tfrecords,
                                            "http://user:secret@mlflow:5000"),
              TrainingBackup.fingerprint_of(params.model, params.train, tfrecords, "http://mlflow.elsewhere:5000")]
    assert "secret" not in fingerprint and fingerprint not in others

    def folder_of(backup_uri: str, worker: str, fingerprint: str) -> str:
        return TrainingBackup.of_worker(Path("backup/train"), backup_uri, worker, fingerprint).folder

    folder = folder_of(params.train.backup_uri, "chief", fingerprint)
    assert folder == f"gs://bucket/backups/{fingerprint[:16]}/chief"  # not gs:/bucket/...
    assert all(folder_of(params.train.backup_uri, "chief", other) != folder for other in others)
    assert folder_of("", "worker-1", fingerprint) == "backup/train/worker-1"  # as always


def test_a_finished_training_leaves_no_backup_folder(tmp_path, monkeypatch):
    """The local backup's folders (backup/train/<worker>, and backup/train/ and backup/ that opening it
    made) are gone once it is removed; a folder that still holds another worker's backup stays."""
    from pneumonia import paths
    from pneumonia.training.backup import TrainingBackup

    monkeypatch.chdir(tmp_path)
    chief, worker = (TrainingBackup.of_worker(paths.TRAIN_BACKUP, "", name, "params A")
                     for name in ("chief", "worker-1"))
    chief.open(), worker.open()
    chief.remove()
    assert [entry.name for entry in paths.TRAIN_BACKUP.iterdir()] == ["worker-1"]
    worker.remove()
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("uri", ["/mnt/backups", "backups", "gs:/bucket/x", "gs://"])
def test_backup_uri_without_a_scheme_is_refused(uri):
    with pytest.raises(PipelineError, match=r"train\.backup_uri = .*scheme.*leave train\.backup_uri empty"):
        parse_params({"train": {"backup_uri": uri}})


def test_a_backup_uri_tensorflow_cannot_write_to_is_a_clear_error(tmp_path):
    from pneumonia.training.backup import TrainingBackup

    with pytest.raises(PipelineError, match=r"nosuchfs://bucket/x(.|\n)*train\.backup_uri"):
        TrainingBackup("nosuchfs://bucket/x", "params A").open()
