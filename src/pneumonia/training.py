"""Training: the model from the registry, fitted on the TFRecords with class weights, exponential
learning-rate decay, a checkpoint of the best epoch on validation and early stopping."""

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import keras
import mlflow

from pneumonia.atomic import atomic_path
from pneumonia.config import Params
from pneumonia.data import dataset
from pneumonia.data.tfrecords import read_meta
from pneumonia.errors import PipelineError
from pneumonia.models.build import build_model

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainingResult:
    history: dict[str, list[float]]  # per-epoch metrics, as keras reports them
    best_epoch: int  # 0-based
    seconds: float
    total_params: int
    trainable_params: int

    def best_metrics(self) -> dict[str, float]:
        return {name: values[self.best_epoch] for name, values in self.history.items()}


class MlflowEpochMetrics(keras.callbacks.Callback):
    """Per-epoch metrics into the active MLflow run, step = epoch number (1-based)."""

    def on_epoch_end(self, epoch, logs=None):
        mlflow.log_metrics({name: float(value) for name, value in (logs or {}).items()}, step=epoch + 1)


def compile_model(model: keras.Model, params: Params, steps_per_epoch: int) -> None:
    schedule = keras.optimizers.schedules.ExponentialDecay(
        params.train.learning_rate, decay_steps=steps_per_epoch, decay_rate=params.train.lr_decay_rate
    )
    model.compile(
        optimizer=keras.optimizers.Adam(schedule),
        loss="binary_crossentropy",
        metrics=[
            keras.metrics.BinaryAccuracy(name="accuracy"),
            keras.metrics.Precision(name="precision"),
            keras.metrics.Recall(name="recall"),
            keras.metrics.AUC(name="auc"),
        ],
    )


def train(params: Params, tfrecords: Path, class_weight: dict[int, float] | None, model_path: Path) -> TrainingResult:
    """Fit the configured model and save its best epoch (on validation) to `model_path`."""
    keras.utils.set_random_seed(params.train.seed)
    train_images = dataset.split_size(tfrecords, "train")
    steps_per_epoch = train_images // params.train.batch_size
    if steps_per_epoch == 0:
        raise PipelineError(
            f"train.batch_size = {params.train.batch_size} is larger than the training set "
            f"({train_images} images); lower train.batch_size."
        )
    model = build_model(params.model, read_meta(tfrecords)["image_size"])
    compile_model(model, params, steps_per_epoch)
    mode = "min" if params.train.monitor == "val_loss" else "max"

    with atomic_path(model_path) as checkpoint:
        callbacks = [
            keras.callbacks.ModelCheckpoint(checkpoint, monitor=params.train.monitor, mode=mode, save_best_only=True),
            keras.callbacks.EarlyStopping(monitor=params.train.monitor, mode=mode,
                                          patience=params.train.early_stopping_patience, restore_best_weights=True),
            MlflowEpochMetrics(),
        ]
        started = time.perf_counter()
        history = model.fit(
            dataset.training_batches(tfrecords, params.train.batch_size, params.train.seed),
            validation_data=dataset.evaluation_batches(tfrecords, "val", params.train.batch_size),
            epochs=params.train.epochs,
            steps_per_epoch=steps_per_epoch,
            class_weight=class_weight,
            callbacks=callbacks,
            shuffle=False,  # the dataset shuffles itself, reproducibly
            verbose=2,
        )
        seconds = time.perf_counter() - started
        if checkpoint.stat().st_size == 0:  # the monitored metric never became finite
            raise PipelineError(f"training never produced a finite {params.train.monitor}; check the data and learning rate")

    values = history.history[params.train.monitor]
    best_epoch = values.index(min(values) if mode == "min" else max(values))
    trainable = sum(int(keras.ops.size(w)) for w in model.trainable_weights)
    return TrainingResult(
        history={name: [float(v) for v in series] for name, series in history.history.items()},
        best_epoch=best_epoch,
        seconds=seconds,
        total_params=model.count_params(),
        trainable_params=trainable,
    )
