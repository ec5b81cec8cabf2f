"""A train stage killed (SIGKILL) after its first epoch resumes at the second when started again,
in the same MLflow run, and ends with the outputs of an uninterrupted run."""

import json
import time

from test_distribute import prepared_project, run_store, train_stage

EPOCHS = 3


def finished_epochs(backup_state) -> int:
    try:
        return json.loads(backup_state.read_text())["epoch"]
    except (OSError, ValueError, KeyError):  # not written yet, or being written
        return 0


def test_a_killed_training_resumes_after_its_last_finished_epoch(synthetic_data, tmp_path):
    project = prepared_project(synthetic_data, tmp_path, epochs=EPOCHS, early_stopping_patience=EPOCHS)
    backup = project / "backup/train/chief"

    first = train_stage(project)
    while finished_epochs(backup / "stage-1/training_metadata.json") < 1 and first.poll() is None:
        time.sleep(0.02)
    first.kill()
    output = first.communicate()[0]
    assert first.returncode == -9, output[-3000:]  # killed, not finished
    backed_up = finished_epochs(backup / "stage-1/training_metadata.json")
    assert backed_up == 1, output[-3000:]
    run_id = (backup / "mlflow_run_id").read_text()
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
    assert not backup.exists()  # finished: the next training starts afresh


def test_a_backup_of_other_params_or_data_is_discarded_not_resumed(tmp_path):
    from pneumonia.training import open_backup

    backup = tmp_path / "backup"
    assert not open_backup(backup, "params A")  # nothing to resume
    (backup / "history.json").write_text("[]")
    assert open_backup(backup, "params A") and (backup / "history.json").exists()  # same: resume
    assert not open_backup(backup, "params B") and not (backup / "history.json").exists()  # other: start afresh
