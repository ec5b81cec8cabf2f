"""DVC stage `train`: fit the configured model -> models/, per-epoch history, metrics/train.json (best
epoch, epochs, seconds), the MLflow run (also the best epoch's metrics and what the run cost: peak memory,
parameter counts, for comparing models). With train.ensemble_members > 1, models/model.keras is the
ensemble of the members (one model file) and the history, best epoch and epochs are member 0's.

Where it trains, resuming a killed training and the workers of a cluster: pneumonia.training.resumable
(only the chief writes outputs). In a SageMaker training job (pneumonia.training.sagemaker) it trains on
the job's channel with its hyperparameters instead, and writes where SageMaker uploads; no MLflow run.
"""

import os

from pneumonia import paths, tracking
from pneumonia.atomic import write_csv, write_json
from pneumonia.config import load_params
from pneumonia.logs import run_stage
from pneumonia.training.resumable import resumable_training
from pneumonia.training.sagemaker import TrainingJob, train_job


def main() -> None:
    job = TrainingJob.from_environ(os.environ)
    if job:
        train_job(job)
        return
    params = load_params()
    with resumable_training(params, paths.TFRECORDS, paths.CLASS_WEIGHTS, paths.MODEL, paths.TRAIN_BACKUP,
                            paths.MANIFESTS) as result:
        if result:  # the chief
            write_csv(paths.TRAIN_HISTORY, *result.history_table())
            write_json(paths.TRAIN_METRICS, result.headline())
            tracking.log_training(result.metrics(), inputs=[paths.CLASS_WEIGHTS, paths.SPLIT_COUNTS, paths.RAW_SOURCE])
            tracking.log_manifests(paths.MANIFESTS, {"train": "training", "val": "validation"})
            tracking.write_run_info(paths.RUN_INFO)


if __name__ == "__main__":
    run_stage(main)
