"""DVC stage `train`: fit the configured model -> models/, per-epoch history, best validation metrics
and what the run cost (seconds, peak memory, parameter counts) for comparing models.

Where it trains follows train.accelerator (pneumonia.distribute); in a TF_CONFIG cluster every
worker runs this script and only the chief writes outputs and logs to MLflow. A killed training
started again resumes from its backup (paths.TRAIN_BACKUP, or under train.backup_uri) and logs into
the same MLflow run.
"""

import json

from pneumonia import distribute, paths, tracking, training
from pneumonia.atomic import write_csv, write_json
from pneumonia.config import load_params
from pneumonia.logs import run_stage

RUN_ID_FILE = "mlflow_run_id"  # in the chief's backup folder: the run a resumed training logs into


def main() -> None:
    params = load_params()
    # First: a multi-worker strategy must exist before TensorFlow does anything else.
    placement = distribute.place(params.train.accelerator, params.train.precision)
    class_weight = {int(label): weight for label, weight in json.loads(paths.CLASS_WEIGHTS.read_text()).items()}
    fingerprint = training.backup_fingerprint(params, paths.TFRECORDS, tracking.tracking_uri())
    backup = training.backup_folder(paths.TRAIN_BACKUP, params.train.backup_uri, placement.worker_name, fingerprint)
    resuming = training.open_backup(backup, fingerprint)
    if not placement.is_chief:
        training.train(params, paths.TFRECORDS, class_weight, paths.MODEL, placement, backup)
        training.remove_backup(backup)
        return

    run_id_file = paths.join(backup, RUN_ID_FILE)
    resume_run_id = training.read_backup_file(run_id_file) if resuming else None
    with tracking.training_run(params, paths.MANIFESTS, resume_run_id) as run:
        training.write_backup_file(run_id_file, run.info.run_id)
        result = training.train(params, paths.TFRECORDS, class_weight, paths.MODEL, placement, backup)

        epochs = range(1, len(next(iter(result.history.values()))) + 1)
        names = sorted(result.history)
        write_csv(paths.TRAIN_HISTORY, ["epoch", *names],
                  [[epoch, *(result.history[name][epoch - 1] for name in names)] for epoch in epochs])
        summary = result.summary()
        write_json(paths.TRAIN_METRICS, summary)
        tracking.log_training(summary, inputs=[paths.CLASS_WEIGHTS, paths.DATA_METRICS, paths.RAW_SOURCE])
        tracking.log_manifests(paths.MANIFESTS, {"train": "training", "val": "validation"})
        tracking.write_run_info(run, paths.RUN_INFO)
    training.remove_backup(backup)  # finished: the next training starts afresh


if __name__ == "__main__":
    run_stage(main)
