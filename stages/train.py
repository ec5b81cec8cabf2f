"""DVC stage `train`: fit the configured model -> models/, per-epoch history, metrics/train.json (best
epoch, epochs, seconds), the MLflow run (also the best epoch's metrics and what the run cost: peak memory,
parameter counts, for comparing models).

Where it trains follows train.accelerator (pneumonia.distribute); in a TF_CONFIG cluster every
worker runs this script and only the chief writes outputs and logs to MLflow. A killed training
started again resumes from its backup (paths.TRAIN_BACKUP, or under train.backup_uri) and logs into
the same MLflow run.
"""

import json

from pneumonia import distribute, paths, tracking
from pneumonia.atomic import write_csv, write_json
from pneumonia.config import flatten, load_params
from pneumonia.logs import run_stage
from pneumonia.training.backup import TrainingBackup
from pneumonia.training.fit import train


def main() -> None:
    params = load_params()
    # First: a multi-worker strategy must exist before TensorFlow does anything else.
    placement = distribute.place(params.train.accelerator, params.train.precision, params.model.backbone)
    class_weight = {int(label): weight for label, weight in json.loads(paths.CLASS_WEIGHTS.read_text()).items()}
    fingerprint = TrainingBackup.fingerprint_of(params.model, params.train, paths.TFRECORDS, tracking.tracking_uri())
    backup = TrainingBackup.of_worker(paths.TRAIN_BACKUP, params.train.backup_uri, placement.worker_name, fingerprint)
    resuming = backup.open()
    if not placement.is_chief:
        train(params.model, params.train, paths.TFRECORDS, class_weight, paths.MODEL, placement, backup)
        backup.remove()
        return

    resume_run_id = backup.run_id() if resuming else None
    with tracking.training_run(params.tracking, flatten(params), paths.MANIFESTS, resume_run_id) as run:
        backup.keep_run_id(run.info.run_id)
        result = train(params.model, params.train, paths.TFRECORDS, class_weight, paths.MODEL, placement, backup)
        write_csv(paths.TRAIN_HISTORY, *result.history_table())
        write_json(paths.TRAIN_METRICS, result.headline())
        tracking.log_training(result.summary(), inputs=[paths.CLASS_WEIGHTS, paths.SPLIT_COUNTS, paths.RAW_SOURCE])
        tracking.log_manifests(paths.MANIFESTS, {"train": "training", "val": "validation"})
        tracking.write_run_info(run, paths.RUN_INFO)
    backup.remove()  # finished: the next training starts afresh


if __name__ == "__main__":
    run_stage(main)
