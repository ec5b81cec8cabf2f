"""Training: the model from the registry, fitted on the TFRecords with class weights, a learning-rate
schedule, a checkpoint of the best epoch on validation and early stopping.

A run has one stage, or two with a warm-up (train.warmup_epochs): the head on a frozen backbone
at train.learning_rate, then the backbone unfrozen per train.fine_tune at
train.fine_tune_learning_rate. Each stage sets which layers train and compiles the model afresh
(`prepare_stage`); the checkpoint keeps the best epoch over both.

Where it runs comes from pneumonia.distribute (one Keras `fit` path for every strategy). Training
survives preemption: a backup folder holds the state after every epoch (Keras BackupAndRestore,
one per stage), the per-epoch history and the best checkpoint; a new process with the same params
and data resumes after the last finished epoch. Under a multi-worker cluster every worker runs the
same callbacks in a scratch folder of its own; only the chief writes the model and logs to MLflow.
The backup folder is a local path or a URI (train.backup_uri: a bucket outlives a preempted VM's
disk), so every read and write of it goes through tf.io.gfile, and Keras's own through its
file_utils, which hands URIs to tf.io.gfile too.
"""

import hashlib
import json
import logging
import os
import resource
import sys
import tempfile
import time
import uuid
import zipfile
from dataclasses import dataclass, replace
from pathlib import Path

import keras
import mlflow
import tensorflow as tf

from pneumonia import distribute, tracking
from pneumonia.atomic import atomic_path
from pneumonia.config import Params, flatten
from pneumonia.data import dataset
from pneumonia.data.tfrecords import read_meta
from pneumonia.errors import PipelineError
from pneumonia.models.build import build_model
from pneumonia.models.fine_tuning import set_trainable
from pneumonia.paths import join

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Stage:
    name: str
    epochs: int
    learning_rate: float
    fine_tune: str  # the strategy for the backbone during this stage


@dataclass(frozen=True)
class TrainingResult:
    history: dict[str, list[float]]  # per-epoch metrics over all stages, as keras reports them
    best_epoch: int  # 0-based
    seconds: float
    total_params: int
    trainable_params: int  # in the last stage
    peak_memory: dict[str, float]  # "peak_memory_mb" (the process), "gpu_peak_memory_mb" with a GPU

    def best_metrics(self) -> dict[str, float]:
        return {name: values[self.best_epoch] for name, values in self.history.items()}

    def summary(self) -> dict[str, float]:
        """metrics/train.json and the run's MLflow metrics: the best epoch and what training cost."""
        return {
            **{f"best_{name}": value for name, value in self.best_metrics().items()},
            "best_epoch": self.best_epoch + 1,
            "epochs_trained": len(self.history[next(iter(self.history))]),
            "train_seconds": round(self.seconds, 1),
            "total_params": self.total_params,
            "trainable_params": self.trainable_params,
            **self.peak_memory,
        }


class EpochHistory(keras.callbacks.Callback):
    """Every finished epoch's metrics, kept in the backup folder so that a resumed run has them all.

    Runs before the backup of the epoch: an epoch recorded here but not backed up is forgotten when
    the next fit starts again from the backup (`on_epoch_begin`), and trained again.
    """

    def __init__(self, path: str):
        super().__init__()
        self.path = path
        recorded = read_backup_file(path)
        self.epochs: list[dict] = json.loads(recorded) if recorded is not None else []  # {"epoch", "stage", metrics}
        self.stage = ""
        self._fit_started = False

    def start_stage(self, name: str) -> int:
        """Begin a stage; the epochs of the stages before it (fit's initial_epoch)."""
        self.stage, self._fit_started = name, False
        earlier = []
        for record in self.epochs:
            if record["stage"] == name:
                break
            earlier.append(record)
        return len(earlier)

    def on_epoch_begin(self, epoch, logs=None):
        if not self._fit_started:  # the first epoch of this fit: anything from here on is trained again
            self._fit_started = True
            self.epochs = [record for record in self.epochs if record["epoch"] < epoch]

    def on_epoch_end(self, epoch, logs=None):
        metrics = {name: float(value) for name, value in (logs or {}).items()}
        self.epochs.append({"epoch": epoch, "stage": self.stage, **metrics})
        write_backup_file(self.path, json.dumps(self.epochs, indent=2, sort_keys=True) + "\n")

    def as_lists(self) -> dict[str, list[float]]:
        names = dict.fromkeys(name for record in self.epochs for name in record if name not in ("epoch", "stage"))
        return {name: [record.get(name, float("nan")) for record in self.epochs] for name in names}


class MlflowEpochMetrics(keras.callbacks.Callback):
    """Per-epoch metrics into the active MLflow run, step = epoch number (1-based), each epoch once.

    Runs after the epoch's backup and logs every recorded epoch the run does not hold yet: an epoch
    backed up just before the process was killed is logged when training resumes, and an epoch
    that will be trained again was never logged.
    """

    def __init__(self, history: EpochHistory):
        super().__init__()
        self.history = history
        run_id = mlflow.active_run().info.run_id
        self.logged = {point.step for point in
                       tracking.retry_locked(mlflow.MlflowClient().get_metric_history, run_id, "loss")}

    def _log_new_epochs(self):
        for record in self.history.epochs:
            step = record["epoch"] + 1
            if step not in self.logged:
                tracking.log_epoch_metrics({k: v for k, v in record.items() if k not in ("epoch", "stage")}, step)
                self.logged.add(step)

    def on_epoch_end(self, epoch, logs=None):
        self._log_new_epochs()

    def on_train_end(self, logs=None):
        self._log_new_epochs()


class StageBackup(keras.callbacks.BackupAndRestore):
    """Keras BackupAndRestore for one stage, kept until the whole training has finished."""

    def __init__(self, backup_dir: str, end_epoch: int):
        super().__init__(backup_dir, double_checkpoint=True, delete_checkpoint=False)
        self.end_epoch = end_epoch

    def on_train_end(self, logs=None):
        # A finished stage, also one that early stopping ended, is backed up as complete with its
        # final weights: a resumed run goes on with the next stage instead of training this one on.
        self._current_epoch = self.end_epoch
        self._save_model()
        # Keras leaves the restored epoch on the model (model._initial_epoch), where the next
        # stage's fit would take it as its own starting epoch.
        self.model._initial_epoch = None


def stages(params: Params) -> list[Stage]:
    train = params.train
    if not train.warmup_epochs:
        return [Stage("train", train.epochs, train.learning_rate, train.fine_tune)]
    return [
        Stage("warm-up", train.warmup_epochs, train.learning_rate, "frozen"),
        Stage("fine-tune", train.epochs - train.warmup_epochs, train.fine_tune_learning_rate, train.fine_tune),
    ]


def learning_rate(params: Params, stage: Stage, steps_per_epoch: int):
    """The optimizer's learning rate: a schedule over the stage's steps, or a number that
    ReduceLROnPlateau lowers (`make_callbacks`)."""
    schedule = params.train.lr_schedule
    if schedule == "exponential":
        return keras.optimizers.schedules.ExponentialDecay(
            stage.learning_rate, decay_steps=steps_per_epoch, decay_rate=params.train.lr_decay_rate
        )
    if schedule == "cosine":
        return keras.optimizers.schedules.CosineDecay(stage.learning_rate, decay_steps=steps_per_epoch * stage.epochs)
    return stage.learning_rate


def classification_metrics(output: str) -> list[keras.metrics.Metric]:
    """Accuracy, precision, recall and AUC of pneumonia, for either output layer: with softmax the
    labels are one-hot (see `labelled_for`) and the metrics read the PNEUMONIA column."""
    if output == "softmax":
        return [
            keras.metrics.CategoricalAccuracy(name="accuracy"),
            keras.metrics.Precision(name="precision", class_id=1),
            keras.metrics.Recall(name="recall", class_id=1),
            # The mean of both columns' AUCs, which are equal: NORMAL's is PNEUMONIA's with both
            # labels and scores flipped. (label_weights=[0, 1] would say so too, but does not
            # survive saving: the model file could not be loaded.)
            keras.metrics.AUC(name="auc", multi_label=True, num_labels=2),
        ]
    return [
        keras.metrics.BinaryAccuracy(name="accuracy"),
        keras.metrics.Precision(name="precision"),
        keras.metrics.Recall(name="recall"),
        keras.metrics.AUC(name="auc"),
    ]


def compile_model(model: keras.Model, params: Params, rate) -> None:
    model.compile(
        optimizer=keras.optimizers.Adam(rate),
        loss=(keras.losses.CategoricalCrossentropy if params.model.output == "softmax"
              else keras.losses.BinaryCrossentropy)(label_smoothing=params.train.label_smoothing),
        metrics=classification_metrics(params.model.output),
        steps_per_execution=params.train.steps_per_execution,
    )


def prepare_stage(model: keras.Model, params: Params, stage: Stage, steps_per_epoch: int) -> None:
    """Set which layers train in this stage, then compile (trainable flags take effect at compile)."""
    set_trainable(model, stage.fine_tune, params.train.fine_tune_layers, pretrained=params.model.weights != "none")
    compile_model(model, params, learning_rate(params, stage, steps_per_epoch))


class AtomicModelCheckpoint(keras.callbacks.ModelCheckpoint):
    """ModelCheckpoint whose file is replaced whole: saved beside it, then renamed over it (also through
    tf.io.gfile, for a backup under train.backup_uri). Keras saves in place, so a process killed
    mid-save left a truncated best model, which became models/model.keras if no later epoch beat it.
    """

    _saving_to: str | None = None

    def _get_file_path(self, epoch, batch, logs):
        # Keras's one hook for where it saves; _save_model below sets the temporary name.
        return self._saving_to or super()._get_file_path(epoch, batch, logs)

    def _save_model(self, epoch, batch, logs):
        target = super()._get_file_path(epoch, batch, logs)
        folder, name = target.rsplit("/", 1) if "/" in target else (".", target)
        self._saving_to = f"{folder}/.{uuid.uuid4().hex[:12]}.tmp-{name}"  # keeps the .keras suffix Keras needs
        try:
            super()._save_model(epoch, batch, logs)
            if tf.io.gfile.exists(self._saving_to):
                tf.io.gfile.rename(self._saving_to, target, overwrite=True)
        finally:
            if tf.io.gfile.exists(self._saving_to):
                tf.io.gfile.remove(self._saving_to)
            self._saving_to = None


def complete_keras_file(path: str) -> bool:
    """Whether a .keras file (a zip) is whole: every member present and matching its CRC."""
    try:
        with tf.io.gfile.GFile(path, "rb") as file, zipfile.ZipFile(file) as archive:
            return archive.testzip() is None
    except (zipfile.BadZipFile, EOFError, OSError, tf.errors.OpError):
        return False


def promote_checkpoint(checkpoint: str, model_path: Path, backup: str) -> None:
    """Copy the best checkpoint to `model_path` (atomically), once it is known to be whole."""
    if not complete_keras_file(checkpoint):
        raise PipelineError(
            f"the best model {checkpoint} is damaged (truncated: a process was killed while saving it, before "
            f"saves were atomic); nothing was promoted to {model_path}. Remove the backup folder {backup} "
            "and train again."
        )
    with atomic_path(model_path) as saved:
        tf.io.gfile.copy(checkpoint, str(saved), overwrite=True)


def make_callbacks(params: Params, checkpoint: str, best_so_far: float | None = None) -> list[keras.callbacks.Callback]:
    """One set for all stages: the checkpoint remembers the best epoch across them (and across a
    resume: `best_so_far` is the best monitored value before it)."""
    train = params.train
    mode = "min" if train.monitor == "val_loss" else "max"
    callbacks = [
        AtomicModelCheckpoint(checkpoint, monitor=train.monitor, mode=mode, save_best_only=True,
                              initial_value_threshold=best_so_far),
        keras.callbacks.EarlyStopping(monitor=train.monitor, mode=mode, patience=train.early_stopping_patience,
                                      restore_best_weights=True),
    ]
    if train.lr_schedule == "plateau":
        callbacks.append(keras.callbacks.ReduceLROnPlateau(monitor=train.monitor, mode=mode,
                                                           factor=train.lr_plateau_factor,
                                                           patience=train.lr_plateau_patience))
    return callbacks


def labelled_for(params: Params, batches: tf.data.Dataset) -> tf.data.Dataset:
    """(image, label) batches as the output layer needs them: one-hot [NORMAL, PNEUMONIA] for softmax."""
    if params.model.output != "softmax":
        return batches
    return batches.map(lambda images, labels: (images, tf.one_hot(tf.cast(labels[:, 0], tf.int32), 2)))


def peak_memory_mb() -> dict[str, float]:
    """Peak resident memory of this process so far, and the peak on the GPUs when there are any."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    peak_bytes = peak if sys.platform == "darwin" else peak * 1024  # Linux reports KiB, macOS bytes
    usage = {"peak_memory_mb": round(peak_bytes / 2**20, 1)}
    gpus = tf.config.list_logical_devices("GPU")
    if gpus:
        gpu_peak = sum(tf.config.experimental.get_memory_info(gpu.name)["peak"] for gpu in gpus)
        usage["gpu_peak_memory_mb"] = round(gpu_peak / 2**20, 1)
    return usage


def backup_fingerprint(params: Params, tfrecords: Path, tracking_uri: str) -> str:
    """What a backup is valid for: the same model and training params, the same TFRecords and the
    same MLflow store (the run it logs into). A hash: the tracking URI may hold a password, and the
    marker may be in a bucket."""
    trained_on = {key: value for key, value in flatten(params).items() if key.startswith(("model.", "train."))}
    identity = [trained_on, read_meta(tfrecords), tracking_uri]
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()


def backup_folder(local_root: Path, backup_uri: str, worker: str, fingerprint: str) -> str:
    """This worker's backup folder: `local_root`/<worker>, or with train.backup_uri
    <uri>/<fingerprint[:16]>/<worker>. Each experiment gets a folder of its own under a URI: queued
    experiments (each in a temporary copy of the repository, with a local backup of its own) or
    several machines share the bucket, and one must neither remove nor resume another's backup."""
    if not backup_uri:
        return str(local_root / worker)
    return join(join(backup_uri, fingerprint[:16]), worker)


def read_backup_file(path: str) -> str | None:
    """The text of a file in a backup (a local path or a URI), None when there is none."""
    if not tf.io.gfile.exists(path):
        return None
    with tf.io.gfile.GFile(path, "r") as file:
        return file.read()


def write_backup_file(path: str, text: str) -> None:
    """Replace a file in a backup whole: written beside it, then renamed over it, so a process killed
    meanwhile leaves the previous version (a stray `.tmp-*` at worst, removed with the backup)."""
    temporary = f"{path}.tmp-{uuid.uuid4().hex[:12]}"
    with tf.io.gfile.GFile(temporary, "w") as file:
        file.write(text)
    tf.io.gfile.rename(temporary, path, overwrite=True)


def open_backup(folder: str | os.PathLike, fingerprint: str) -> bool:
    """Make `folder` the backup of this training; True when it holds an interrupted run to resume.
    A backup of other params or data is removed: it must not be resumed."""
    folder = os.fspath(folder)
    marker = join(folder, "fingerprint")
    try:
        recorded = read_backup_file(marker)
        if recorded != fingerprint and tf.io.gfile.isdir(folder):
            log.info("removing the backup %s of a training with other params or data", folder)
            tf.io.gfile.rmtree(folder)
        tf.io.gfile.makedirs(folder)
        write_backup_file(marker, fingerprint)
    except tf.errors.OpError as exc:  # before any training, not after its first epoch
        raise PipelineError(
            f"cannot keep the training backup in {folder} ({exc.message}).\nWith train.backup_uri set, check "
            "that the bucket exists and that this machine's credentials may write to it (gs://: `gcloud auth "
            "application-default login` or GOOGLE_APPLICATION_CREDENTIALS), or leave train.backup_uri empty "
            "for a local backup."
        ) from None
    return recorded == fingerprint


def remove_backup(folder: str) -> None:
    """Remove a finished training's backup; under train.backup_uri also its fingerprint's folder once
    no worker's backup is left in it."""
    tf.io.gfile.rmtree(folder)
    if "://" not in folder:
        return  # a local backup/train/<worker>, as it always was
    parent = folder.rsplit("/", 1)[0]
    try:
        if not tf.io.gfile.listdir(parent):
            tf.io.gfile.rmtree(parent)
    except tf.errors.NotFoundError:
        pass  # another worker removed it first


def train(params: Params, tfrecords: Path, class_weight: dict[int, float] | None, model_path: Path,
          placement: distribute.Placement | None = None, backup: str | os.PathLike | None = None) -> TrainingResult:
    """Fit the configured model and save its best epoch (on validation) to `model_path` (the chief only).

    `backup` is this worker's backup folder, a local path or a URI (see `backup_folder`,
    `open_backup`); its state is resumed when present.
    Without one, a temporary folder (no resuming). Per-epoch metrics go to the active MLflow run
    (the chief only). The caller removes the backup once it has written its outputs.
    """
    placement = placement or distribute.place(params.train.accelerator, params.train.precision)
    if backup is None:
        with tempfile.TemporaryDirectory(prefix="pneumonia-train-") as scratch:
            return train(params, tfrecords, class_weight, model_path, placement, scratch)
    backup = os.fspath(backup)
    if placement.is_chief and mlflow.active_run():
        mlflow.set_tags(placement.describe())  # tags: a resumed run may continue on other hardware
    keras.utils.set_random_seed(params.train.seed)  # Python, NumPy, TensorFlow and Keras layers
    if params.train.deterministic:
        tf.config.experimental.enable_op_determinism()
        # Grappler's graph rewrites are not deterministic across processes (tensorflow#51716): with them
        # on, two trainings of custom_cnn with one seed parted after ten steps; off, they match bit for
        # bit, at no measurable cost on a CPU (docs/decisions.md, "Grappler and determinism").
        tf.config.optimizer.set_experimental_options({"disable_meta_optimizer": True})
    global_batch = params.train.batch_size * placement.replicas
    train_images = dataset.split_size(tfrecords, "train")
    steps_per_epoch = train_images // global_batch
    if steps_per_epoch == 0:
        raise PipelineError(
            f"train.batch_size = {params.train.batch_size} per replica x {placement.replicas} replica(s) is larger "
            f"than the training set ({train_images} images); lower train.batch_size."
        )
    training_batches = labelled_for(params, dataset.training_batches(tfrecords, global_batch, params.train.seed))
    validation_batches = labelled_for(params, dataset.evaluation_batches(tfrecords, "val", global_batch))
    rate_scale = placement.replicas if params.train.scale_learning_rate else 1

    history = EpochHistory(join(backup, "history.json"))
    checkpoint = join(backup, "best.keras")
    monitored = [record[params.train.monitor] for record in history.epochs]
    best_so_far = (min(monitored) if params.train.monitor == "val_loss" else max(monitored)) if monitored else None
    if history.epochs:
        log.info("resuming: %d epoch(s) recorded in %s", len(history.epochs), backup)
    with placement.strategy.scope():  # variables of the model, optimizer and metrics live on every replica
        model = build_model(params.model, read_meta(tfrecords)["image_size"], params.train.augment)
        callbacks = [*make_callbacks(params, checkpoint, best_so_far), history]
        progress = [MlflowEpochMetrics(history)] if placement.is_chief and mlflow.active_run() else []
        started = time.perf_counter()
        for number, stage in enumerate(stages(params), start=1):
            stage = replace(stage, learning_rate=stage.learning_rate * rate_scale)
            prepare_stage(model, params, stage, steps_per_epoch)
            epochs_before = history.start_stage(stage.name)
            log.info("stage %s: %d epochs at learning rate %g, backbone %s, global batch %d", stage.name,
                     stage.epochs, stage.learning_rate, stage.fine_tune, global_batch)
            model.fit(
                training_batches,
                validation_data=validation_batches,
                initial_epoch=epochs_before,
                epochs=epochs_before + stage.epochs,
                steps_per_epoch=steps_per_epoch,
                class_weight=class_weight,
                # The backup comes after the history and the checkpoint, MLflow after the backup
                # (see EpochHistory, MlflowEpochMetrics).
                callbacks=[*callbacks, StageBackup(join(backup, f"stage-{number}"), epochs_before + stage.epochs),
                           *progress],
                shuffle=False,  # the dataset shuffles itself, reproducibly
                verbose=2 if placement.is_chief else 0,
            )
        seconds = time.perf_counter() - started
    # No checkpoint, or an empty one: the monitored metric never became finite.
    if not tf.io.gfile.exists(checkpoint) or tf.io.gfile.stat(checkpoint).length == 0:
        raise PipelineError(f"training never produced a finite {params.train.monitor}; "
                            "check the data and learning rate")
    if placement.is_chief:
        promote_checkpoint(checkpoint, model_path, backup)

    result_history = history.as_lists()
    values = result_history[params.train.monitor]
    best_epoch = values.index(min(values) if params.train.monitor == "val_loss" else max(values))
    return TrainingResult(
        history=result_history,
        best_epoch=best_epoch,
        seconds=seconds,
        total_params=model.count_params(),
        trainable_params=sum(int(keras.ops.size(w)) for w in model.trainable_weights),
        peak_memory=peak_memory_mb(),
    )
