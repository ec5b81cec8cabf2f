"""The train stage as an Amazon SageMaker training job in script mode: what the job's container says
(the SageMaker training toolkit's `SM_*` environment variables and its /opt/ml layout), in the
pipeline's terms, and the metric lines SageMaker's `metric_definitions` read from the job's log.

SageMaker runs `stages/train.py` in its container (docs/accelerators.md has the estimator call). The
job's hyperparameters are params.yaml keys, dotted as `dvc exp run -S` names them
(`{"train.epochs": 20}`), over the params.yaml shipped with the code. The "train" channel is the
pipeline's `data/` as DVC leaves it: `tfrecords/` (meta.json and the shards) and `class_weights.json`;
SageMaker copies it from S3 to the container (`File` mode) or mounts it (`FastFile`), so TensorFlow
reads local files: its own `s3://` filesystem left TensorFlow in 2.6 for tensorflow-io, whose latest
release (0.37.1) is built for TensorFlow 2.16 and does not load into this project's.
"""

import json
import math
import numbers
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import keras

from pneumonia import distribute, paths
from pneumonia.atomic import write_csv, write_json
from pneumonia.config import load_params
from pneumonia.data.class_weights import read_class_weights
from pneumonia.data.tfrecords import read_meta
from pneumonia.errors import PipelineError
from pneumonia.training.fit import train

CHANNEL = "train"
# Hyperparameters the SageMaker SDK adds on its own: the TensorFlow estimator passes `model_dir`, an S3
# URI for TensorFlow's own checkpoints (unused here: the model goes to SM_MODEL_DIR), unless
# `model_dir=False`; `sagemaker_*` ones configure the toolkit.
SDK_HYPERPARAMETERS = ("model_dir",)
# Where the job's model and outputs go ({variable: its value in SageMaker's containers}): uploaded at its end
FOLDERS = {"SM_MODEL_DIR": "/opt/ml/model", "SM_OUTPUT_DATA_DIR": "/opt/ml/output/data"}
# What the estimator's `metric_definitions` read from the log: one line per epoch and one at the end.
# `\b` keeps `auc` from matching inside `val_auc` and `val_auc` inside `best_val_auc`.
LOGGED_METRICS = ("loss", "auc", "accuracy", "val_loss", "val_auc", "val_accuracy", "best_val_auc", "best_epoch")
METRIC_DEFINITIONS = [{"Name": name, "Regex": rf"\b{name}=([-+.0-9eE]+);"} for name in LOGGED_METRICS]


@dataclass(frozen=True)
class TrainingJob:
    """The SageMaker training job this process runs in."""

    hyperparameters: dict[str, Any]  # as the toolkit decoded them (SM_HPS)
    channels: dict[str, Path]  # channel name -> its folder (SM_CHANNEL_<NAME>)
    model_dir: Path  # SM_MODEL_DIR: uploaded as the job's model.tar.gz
    output_data_dir: Path  # SM_OUTPUT_DATA_DIR: uploaded as the job's output.tar.gz

    @classmethod
    def from_environ(cls, environ: Mapping[str, str]) -> "TrainingJob | None":
        """The job the `SM_*` variables describe; None outside a SageMaker training container."""
        if "SM_MODEL_DIR" not in environ:
            return None
        try:
            hyperparameters = json.loads(environ.get("SM_HPS") or "{}")
        except json.JSONDecodeError as exc:
            raise PipelineError(f"SM_HPS is not JSON ({exc}): run the job with the SageMaker Python SDK") from None
        if not isinstance(hyperparameters, dict):
            raise PipelineError(f"SM_HPS is a JSON {type(hyperparameters).__name__}, not an object of "
                                "hyperparameters ({\"train.epochs\": 20}): run the job with the SageMaker Python SDK")
        folders = {name: environ.get(name, default) for name, default in FOLDERS.items()}
        if empty := [name for name, folder in folders.items() if not folder.strip()]:
            raise PipelineError(f"{' and '.join(empty)} is empty: the folder SageMaker uploads from, "
                                f"{FOLDERS[empty[0]]} in its containers; unset it or name a folder")
        channels = {name.removeprefix("SM_CHANNEL_").lower(): Path(folder) for name, folder in environ.items()
                    if name.startswith("SM_CHANNEL_")}
        return cls(hyperparameters, channels, Path(folders["SM_MODEL_DIR"]), Path(folders["SM_OUTPUT_DATA_DIR"]))

    def check_folders(self) -> None:
        """Before training: the folders the model and the outputs go to are (or can be made) writable."""
        for name, folder in (("SM_MODEL_DIR", self.model_dir), ("SM_OUTPUT_DATA_DIR", self.output_data_dir)):
            try:
                folder.mkdir(parents=True, exist_ok=True)
                writable = os.access(folder, os.W_OK | os.X_OK)
            except OSError as exc:
                writable, reason = False, f" ({exc.strerror})"
            else:
                reason = ""
            if not writable:
                raise PipelineError(f"{name} = {folder} is not a folder this job can write to{reason}: nothing was "
                                    "trained; give the job's user that folder, or name another")

    def params_overrides(self) -> dict[str, Any]:
        """The hyperparameters that set params.yaml keys (all but the SDK's own)."""
        return {name: value for name, value in self.hyperparameters.items()
                if name not in SDK_HYPERPARAMETERS and not name.startswith("sagemaker_")}

    def data(self) -> Path:
        """The "train" channel's folder, the pipeline's data/, checked for what training reads."""
        if CHANNEL not in self.channels:
            raise PipelineError(f"the training job has no {CHANNEL!r} channel: call estimator.fit with "
                                f"inputs={{{CHANNEL!r}: 's3://bucket/prefix'}}, the prefix holding data/'s "
                                "tfrecords/ and class_weights.json (docs/accelerators.md)")
        folder = self.channels[CHANNEL]
        missing = [name for name in (paths.TFRECORDS.name + "/meta.json", paths.CLASS_WEIGHTS.name)
                   if not (folder / name).is_file()]
        if missing:
            raise PipelineError(f"the {CHANNEL!r} channel ({folder}) lacks {', '.join(missing)}: upload data/ as "
                                "the pipeline leaves it, e.g. `aws s3 sync data/tfrecords s3://bucket/prefix/"
                                "tfrecords` and `aws s3 cp data/class_weights.json s3://bucket/prefix/`")
        location = read_meta(folder / paths.TFRECORDS.name).get("location", "")
        if location.startswith("s3://"):
            raise PipelineError(f"the shards are at {location}, which TensorFlow cannot read (no s3:// "
                                "filesystem): put them in the channel itself, under tfrecords/")
        return folder

    def tfrecords(self) -> Path:
        return self.data() / paths.TFRECORDS.name

    def class_weight(self) -> dict[int, float]:
        return read_class_weights(self.data() / paths.CLASS_WEIGHTS.name)


def metric_line(values: Mapping[str, float]) -> str:
    """`name=value;` for each finite number, as METRIC_DEFINITIONS read them."""
    return " ".join(f"{name}={value:.6g};" for name, value in values.items()
                    if isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value))


class MetricLines(keras.callbacks.Callback):
    """Prints each epoch's metrics as a metric line (stdout: the job's log, read by metric_definitions)."""

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        print(metric_line({"epoch": epoch + 1, **(logs or {})}), flush=True)


def train_job(job: TrainingJob) -> None:
    """Train as the train stage does, with the job's hyperparameters over params.yaml, on its channel: the
    model into SM_MODEL_DIR, the history and metrics into SM_OUTPUT_DATA_DIR, a metric line per epoch and
    one at the end (stdout). No backup (a job that stops is started again whole) and no MLflow run."""
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
