"""DVC stage `train`: fit the configured model -> models/, per-epoch history, metrics/train.json (best
epoch, epochs, seconds), the MLflow run (also the best epoch's metrics and what the run cost: peak memory,
parameter counts, for comparing models). With train.ensemble_members > 1, models/model.keras is the
ensemble of the members (one model file) and the history, best epoch and epochs are member 0's.

Where it trains follows train.accelerator (pneumonia.distribute); in a TF_CONFIG cluster every
worker runs this script and only the chief writes outputs and logs to MLflow. A killed training
started again resumes from its backup (paths.TRAIN_BACKUP, or under train.backup_uri) and logs into
the same MLflow run. In a SageMaker training job (pneumonia.training.sagemaker) it trains on the job's
channel with its hyperparameters, writes the model and outputs where SageMaker uploads them and prints
the metrics for its metric_definitions; no MLflow run.
"""

import json
import os

from pneumonia import distribute, paths, tracking
from pneumonia.atomic import write_csv, write_json
from pneumonia.config import flatten, load_params
from pneumonia.logs import run_stage
from pneumonia.training.backup import TrainingBackup
from pneumonia.training.fit import train
from pneumonia.training.sagemaker import MetricLines, TrainingJob, metric_line


def train_in_job(job: TrainingJob) -> None:
    params = load_params(overrides=job.params_overrides())
    job.check_folders()
    placement = distribute.place(params.train.accelerator, params.train.precision, params.model.backbone)
    result = train(params.model, params.train, job.tfrecords(), job.class_weight(), job.model_dir / paths.MODEL.name,
                   placement, extra_callbacks=[MetricLines()])
    if placement.is_chief:
        metrics = result.metrics()
        write_csv(job.output_data_dir / paths.TRAIN_HISTORY.name, *result.history_table())
        write_json(job.output_data_dir / paths.TRAIN_METRICS.name, metrics)
        print(metric_line(metrics), flush=True)


def main() -> None:
    job = TrainingJob.from_environ(os.environ)
    if job:
        train_in_job(job)
        return
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
        tracking.log_training(result.metrics(), inputs=[paths.CLASS_WEIGHTS, paths.SPLIT_COUNTS, paths.RAW_SOURCE])
        tracking.log_manifests(paths.MANIFESTS, {"train": "training", "val": "validation"})
        tracking.write_run_info(run, paths.RUN_INFO)
    backup.remove()  # finished: the next training starts afresh


if __name__ == "__main__":
    run_stage(main)
