"""Fitting: the model of pneumonia.models trained on the TFRecords with class weights, a learning-rate
schedule, a checkpoint of the best epoch on validation and early stopping (`callbacks`).

A run has one stage, or two with a warm-up (train.warmup_epochs): the head on a frozen backbone
at train.learning_rate, then the backbone unfrozen per train.fine_tune at
train.fine_tune_learning_rate. Each stage sets which layers train and compiles the model afresh
(`recipe.prepare_stage`); the checkpoint keeps the best epoch over both.

Where it runs comes from pneumonia.distribute (one Keras `fit` path for every strategy). Training
survives preemption: its backup (`backup.TrainingBackup`) holds the state after every epoch, and a
new process with the same params and data resumes after the last finished epoch. Under a
multi-worker cluster every worker runs the same callbacks in a backup of its own; only the chief
writes the model and logs to MLflow.
"""

import json
import logging
import resource
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import keras
import tensorflow as tf

from pneumonia import distribute, tracking
from pneumonia.config import ModelConfig, TrainConfig
from pneumonia.data import dataset
from pneumonia.data.tfrecords import read_meta
from pneumonia.errors import PipelineError
from pneumonia.evaluation.predictions import predict_split
from pneumonia.models.build import build_model, ensemble_of, load_model
from pneumonia.training.backup import TrainingBackup, save_stable
from pneumonia.training.callbacks import make_callbacks
from pneumonia.training.recipe import prepare_stage, stages

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainingResult:
    history: dict[str, list[float]]  # per-epoch metrics over all stages, as keras reports them
    best_epoch: int  # 0-based
    seconds: float
    total_params: int
    trainable_params: int  # in the last stage
    peak_memory: dict[str, float]  # "peak_memory_mb" (the process), "gpu_peak_memory_mb" with a GPU
    # An ensemble's (train.ensemble_members > 1): each member's own result. The history and best epoch
    # above are then member 0's, the seconds, parameters and memory the whole ensemble's.
    members: tuple["TrainingResult", ...] = ()

    def best_metrics(self) -> dict[str, float]:
        return {name: values[self.best_epoch] for name, values in self.history.items()}

    def metrics(self) -> dict[str, float]:
        """The run's MLflow metrics: the best epoch's metrics and what training cost; an ensemble's also
        each member's best epoch, its metrics, its epochs and seconds (member_<k>_best_epoch, ...)."""
        per_member = {f"member_{number}_{name}": value for number, member in enumerate(self.members)
                      for name, value in member.metrics().items()
                      if name.startswith("best_") or name in ("epochs_trained", "train_seconds")}
        return {
            **{f"best_{name}": value for name, value in self.best_metrics().items()},
            "best_epoch": self.best_epoch + 1,
            "epochs_trained": len(self.history[next(iter(self.history))]),
            "train_seconds": round(self.seconds, 1),
            "total_params": self.total_params,
            "trainable_params": self.trainable_params,
            **self.peak_memory,
            **per_member,
        }

    def headline(self) -> dict[str, float]:
        """metrics/train.json, columns of `dvc exp show`: the best epoch, the epochs trained and the seconds.
        The rest of metrics() (the best epoch's metrics, memory, parameters) is in the MLflow run, where
        `pneumonia compare` sets it against the test metrics."""
        metrics = self.metrics()
        return {key: metrics[key] for key in ("best_epoch", "epochs_trained", "train_seconds")}

    def history_table(self) -> tuple[list[str], list[list]]:
        """plots/train_history.csv as (header, rows): the epoch (1-based), then the metrics by name."""
        names = sorted(self.history)
        epochs = range(1, len(self.history[names[0]]) + 1)
        return ["epoch", *names], [[epoch, *(self.history[name][epoch - 1] for name in names)] for epoch in epochs]


def labelled_for(output: str, batches: tf.data.Dataset) -> tf.data.Dataset:
    """(image, label[, sample weight]) batches as the output layer needs them: for softmax the columns
    [NORMAL, PNEUMONIA], 1 - label and label (one-hot for hard labels; distillation's are soft)."""
    if output != "softmax":
        return batches
    return batches.map(lambda images, labels, *weights: (images, tf.concat([1 - labels, labels], axis=-1), *weights))


def seed_everything(config: TrainConfig) -> None:
    """train.seed for Python, NumPy, TensorFlow and Keras layers; with train.deterministic, TensorFlow's
    deterministic ops and no Grappler, whose graph rewrites are not deterministic across processes
    (tensorflow#51716): with them on, two trainings of custom_cnn with one seed parted after ten steps;
    off, they match bit for bit, at 9% of the default's speed on a CPU (docs/decisions.md)."""
    keras.utils.set_random_seed(config.seed)
    if config.deterministic:
        tf.config.experimental.enable_op_determinism()
        tf.config.optimizer.set_experimental_options({"disable_meta_optimizer": True})


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


def kept_epoch(monitored: list[float], config: TrainConfig) -> int:
    """The 0-based epoch whose model the checkpoint kept: the best `monitored` value (train.monitor) from epoch
    train.min_epochs (or the last) on, the first of equals (the checkpoint saves only on an improvement)."""
    first = config.first_kept_epoch
    candidates = monitored[first:]
    return first + candidates.index(min(candidates) if config.monitor == "val_loss" else max(candidates))


def train(model_config: ModelConfig, config: TrainConfig, tfrecords: Path, class_weight: dict[int, float] | None,
          model_path: Path, placement: distribute.Placement | None = None,
          backup: TrainingBackup | None = None,
          extra_callbacks: Sequence[keras.callbacks.Callback] = ()) -> TrainingResult:
    """Fit the configured model and save its best epoch (on validation) to `model_path` (the chief only);
    with train.ensemble_members > 1, the ensemble of its members (`train_ensemble`).

    `backup` is this worker's (opened: `TrainingBackup.open`); its state is resumed when present.
    Without one, a temporary folder (no resuming). Per-epoch metrics go to the active MLflow run
    (the chief only). The caller removes the backup once it has written its outputs. `extra_callbacks`
    run on the chief after the pipeline's own: SageMaker's metric lines, the model benchmarks.gpu_check keeps.
    """
    placement = placement or distribute.place(config.accelerator, config.precision, model_config.backbone)
    if backup is None:
        with tempfile.TemporaryDirectory(prefix="pneumonia-train-") as scratch:
            return train(model_config, config, tfrecords, class_weight, model_path, placement, TrainingBackup(scratch),
                         extra_callbacks)
    if config.ensemble_members > 1:
        return train_ensemble(model_config, config, tfrecords, class_weight, model_path, placement, backup,
                              extra_callbacks)
    if config.distillation_teachers:
        return train_distilled(model_config, config, tfrecords, class_weight, model_path, placement, backup,
                               extra_callbacks)
    result = fit_model(model_config, config, tfrecords, class_weight, placement, backup, extra_callbacks)
    if placement.is_chief:
        backup.promote(model_path)
    return result


def member_config(config: TrainConfig, number: int) -> TrainConfig:
    """The training of ensemble member (or distillation teacher) `number`: the whole training with seed
    train.seed + number. Member 0 is the single model of the same params."""
    return config.model_copy(update={"seed": config.seed + number, "ensemble_members": 1, "distillation_teachers": 0})


def train_member(model_config: ModelConfig, config: TrainConfig, number: int, tfrecords: Path,
                 class_weight: dict[int, float] | None, placement: distribute.Placement, backup: TrainingBackup,
                 extra_callbacks: Sequence[keras.callbacks.Callback] = (),
                 teacher_probabilities: dict[str, float] | None = None) -> TrainingResult:
    """Member `number` of an ensemble (or of a distillation) trained with `config` in a backup of its own
    (`TrainingBackup.member`), its best epoch in that backup's checkpoint; a member that finished before, in
    a resumed training, is kept. Member 0's epochs are the run's (MLflow's epoch metrics, `extra_callbacks`)."""
    member_backup = backup.member(number)
    if finished := member_backup.finished_result():
        log.info("member %d (seed %d): finished before, kept", number, config.seed)
        return TrainingResult(**{**json.loads(finished), "members": ()})
    log.info("member %d: seed %d", number, config.seed)
    result = fit_model(model_config, config, tfrecords, class_weight, placement, member_backup,
                       extra_callbacks if number == 0 else (), log_epochs=number == 0,
                       teacher_probabilities=teacher_probabilities)
    member_backup.keep_finished_result(json.dumps(asdict(result)))
    return result


def trained_members(backup: TrainingBackup, numbers: Sequence[int], model_path: Path) -> list[keras.Model]:
    """The best models of the members `numbers`, each checked whole first (it is to become part of `model_path`)."""
    members = []
    for number in numbers:
        member_backup = backup.member(number)
        member_backup.check_checkpoint(model_path)
        members.append(load_model(member_backup.checkpoint, compile=False))
    return members


def with_members(results: Sequence[TrainingResult]) -> TrainingResult:
    """Member 0's result (history, best epoch) with the whole training's seconds, parameters and memory."""
    return replace(results[0], seconds=sum(result.seconds for result in results),
                   total_params=sum(result.total_params for result in results),
                   trainable_params=sum(result.trainable_params for result in results),
                   peak_memory=peak_memory_mb(), members=tuple(results))


def train_ensemble(model_config: ModelConfig, config: TrainConfig, tfrecords: Path,
                   class_weight: dict[int, float] | None, model_path: Path, placement: distribute.Placement,
                   backup: TrainingBackup, extra_callbacks: Sequence[keras.callbacks.Callback] = ()) -> TrainingResult:
    """train.ensemble_members members, each trained as `train` trains one model (its own checkpoint of the
    best epoch on validation, its own early stopping) with seed train.seed + k, one after the other
    (`train_member`). The chief saves the mean of their outputs (models.build.ensemble_of) to `model_path`:
    one model file. The per-epoch records are member 0's: its epochs are numbered as a single model's, and
    member k's are in its backup and result (member_<k>_* metrics)."""
    results = [train_member(model_config, member_config(config, number), number, tfrecords, class_weight, placement,
                            backup, extra_callbacks) for number in range(config.ensemble_members)]
    if placement.is_chief:
        save_stable(ensemble_of(trained_members(backup, range(config.ensemble_members), model_path)), model_path)
    return with_members(results)


def check_distinct_image_keys(tfrecords: Path) -> None:
    """A PipelineError, before any teacher trains, when two training images share a `dataset.image_key`:
    distillation pairs each image with its teachers' probability by that key."""
    labels, names = dataset.labels_and_names(tfrecords, "train")
    if len({dataset.image_key(label, name) for label, name in zip(labels, names)}) < len(names):
        raise PipelineError("two training images of one class share a file name; distillation pairs each image "
                            "with its teachers' probability by class and name: rename them, or set "
                            "train.distillation_teachers to 0")


def teacher_probabilities(teacher: keras.Model, tfrecords: Path, batch_size: int) -> dict[str, float]:
    """The teacher's probability of pneumonia for each training image, un-augmented (the model's augmentation
    is off in inference), by `dataset.image_key`."""
    predictions = predict_split(teacher, tfrecords, "train", batch_size)
    keys = (dataset.image_key(label, name) for label, name in zip(predictions.labels, predictions.file_names))
    return dict(zip(keys, predictions.probabilities.tolist()))


def train_distilled(model_config: ModelConfig, config: TrainConfig, tfrecords: Path,
                    class_weight: dict[int, float] | None, model_path: Path, placement: distribute.Placement,
                    backup: TrainingBackup, extra_callbacks: Sequence[keras.callbacks.Callback] = ()) -> TrainingResult:
    """Knowledge distillation of an ensemble into one model of the configured size (Hinton et al. 2015): the
    train.distillation_teachers teachers trained as ensemble members 1 to N (seeds train.seed + k, `train_member`),
    their mean probability of each training image (`teacher_probabilities`), then member 0, the model, with seed
    train.seed on targets that mix label and teachers (`dataset.distilled_targets`). Every worker scores the
    training images (each trains on them); the chief saves member 0 alone to `model_path`. The per-epoch records
    are the model's; the teachers' are member_<k>_* metrics, and the seconds are all of them together."""
    check_distinct_image_keys(tfrecords)
    teachers = [train_member(model_config, member_config(config, number), number, tfrecords, class_weight,
                             placement, backup) for number in range(1, config.distillation_teachers + 1)]
    teacher_models = trained_members(backup, range(1, config.distillation_teachers + 1), model_path)
    teacher = ensemble_of(teacher_models) if len(teacher_models) > 1 else teacher_models[0]
    probabilities = teacher_probabilities(teacher, tfrecords, config.batch_size)
    log.info("distilling %d teacher(s) into the model: targets %g x label + %g x theirs",
             config.distillation_teachers, 1 - config.distillation_weight, config.distillation_weight)
    model = train_member(model_config, config, 0, tfrecords, class_weight, placement, backup, extra_callbacks,
                         teacher_probabilities=probabilities)
    if placement.is_chief:
        backup.member(0).promote(model_path)
    return with_members([model, *teachers])


def fit_model(model_config: ModelConfig, config: TrainConfig, tfrecords: Path,
              class_weight: dict[int, float] | None, placement: distribute.Placement, backup: TrainingBackup,
              extra_callbacks: Sequence[keras.callbacks.Callback] = (), log_epochs: bool = True,
              teacher_probabilities: dict[str, float] | None = None) -> TrainingResult:
    """One model trained (or resumed) in `backup`, its best epoch in the backup's checkpoint; per-epoch
    metrics to the active MLflow run when `log_epochs` (the chief only). With `teacher_probabilities`
    (`train_distilled`), on targets mixed from the labels and them by train.distillation_weight."""
    logging_run = placement.is_chief and tracking.active_run_id() is not None
    seed_everything(config)
    global_batch = config.batch_size * placement.replicas
    train_images = dataset.split_size(tfrecords, "train")
    steps_per_epoch = train_images // global_batch
    if steps_per_epoch == 0:
        raise PipelineError(
            f"train.batch_size = {config.batch_size} per replica x {placement.replicas} replica(s) is larger "
            f"than the training set ({train_images} images); lower train.batch_size."
        )
    output = model_config.output
    targets = None
    if teacher_probabilities:  # the class weights go into each image's sample weight
        targets = dataset.distilled_targets(teacher_probabilities, config.distillation_weight, class_weight)
        class_weight = None
    training_batches = labelled_for(output, dataset.training_batches(
        tfrecords, global_batch, config.seed, config.class_balance == "oversample", targets))
    if config.augment.mixup or config.augment.cutmix:  # the class weights go into each mixed pair's weight
        training_batches = dataset.mixed_up(training_batches, config.augment.mixup or config.augment.cutmix,
                                            config.seed, class_weight, cut=bool(config.augment.cutmix))
        class_weight = None
    validation_batches = labelled_for(output, dataset.evaluation_batches(tfrecords, "val", global_batch))
    rate_scale = placement.replicas if config.scale_learning_rate else 1

    history = backup.history
    # the best monitored value of the epochs a resumed training already ran that may be kept (train.min_epochs)
    monitored = [record[config.monitor] for record in history.epochs[config.first_kept_epoch:]]
    best_so_far = (min(monitored) if config.monitor == "val_loss" else max(monitored)) if monitored else None
    if history.epochs:
        log.info("resuming: %d epoch(s) recorded in %s", len(history.epochs), backup.folder)
    with placement.strategy.scope():  # variables of the model, optimizer and metrics live on every replica
        model = build_model(model_config, read_meta(tfrecords)["image_size"], config.augment)
        callbacks = [*make_callbacks(config, backup.checkpoint, best_so_far), history]
        progress = [tracking.epoch_metrics_callback(history)] if logging_run and log_epochs else []
        progress += list(extra_callbacks) if placement.is_chief else []
        started = time.perf_counter()
        for number, stage in enumerate(stages(config), start=1):
            stage = replace(stage, learning_rate=stage.learning_rate * rate_scale)
            prepare_stage(model, model_config, config, stage, steps_per_epoch)
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
                # (see backup.EpochHistory, tracking.epoch_metrics_callback).
                callbacks=[*callbacks, backup.stage(number, epochs_before + stage.epochs), *progress],
                shuffle=False,  # the dataset shuffles itself, reproducibly
                verbose=2 if placement.is_chief else 0,
            )
        seconds = time.perf_counter() - started
    # No checkpoint, or an empty one: the monitored metric never became finite.
    if not tf.io.gfile.exists(backup.checkpoint) or tf.io.gfile.stat(backup.checkpoint).length == 0:
        raise PipelineError(f"training never produced a finite {config.monitor}; "
                            "check the data and learning rate")

    result_history = history.as_lists()
    return TrainingResult(
        history=result_history,
        best_epoch=kept_epoch(result_history[config.monitor], config),
        seconds=seconds,
        total_params=model.count_params(),
        trainable_params=sum(int(keras.ops.size(w)) for w in model.trainable_weights),
        peak_memory=peak_memory_mb(),
    )
