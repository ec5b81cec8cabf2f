"""The callbacks of every training stage: the checkpoint of the best epoch on validation (saved
atomically), early stopping, with train.lr_schedule: plateau, the learning-rate reduction, and with
train.weight_averaging: ema, the swaps that make validation, the checkpoint and early stopping see the
averaged weights. The backup's own callbacks (the epoch history, each stage's BackupAndRestore) are in `backup`.
"""

import uuid

import keras

from pneumonia.config import TrainConfig


class AtomicModelCheckpoint(keras.callbacks.ModelCheckpoint):
    """ModelCheckpoint whose file is replaced whole: saved beside it, then renamed over it (also through
    tf.io.gfile, for a backup under train.backup_uri). Keras saves in place, so a process killed
    mid-save left a truncated best model, which became models/model.keras if no later epoch beat it.
    """

    _saving_to: str | None = None

    def __init__(self, *args, first_epoch: int = 0, **kwargs):
        super().__init__(*args, **kwargs)
        self.first_epoch = first_epoch  # 0-based: the epochs before it are never saved (train.min_epochs)

    def _should_save_model(self, epoch, batch, logs, filepath):
        return epoch >= self.first_epoch and super()._should_save_model(epoch, batch, logs, filepath)

    def _get_file_path(self, epoch, batch, logs):
        # Keras's one hook for where it saves; _save_model below sets the temporary name.
        return self._saving_to or super()._get_file_path(epoch, batch, logs)

    def _save_model(self, epoch, batch, logs):
        import tensorflow as tf  # here: the recipe's callbacks also run under Keras's JAX backend, without TensorFlow

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


class SwapAveragedWeightsAtEpochEnd(keras.callbacks.SwapEMAWeights):
    """At the end of each epoch, swaps the optimizer's moving average of the weights with the model's weights.

    One of these before the checkpoint and early stopping and one after them: they see (and save) the
    averaged weights, and training goes on from the live ones, which is also what the backup after them
    holds, so a resumed training continues as an uninterrupted one would. (Keras' own
    `SwapEMAWeights(swap_on_epoch=True)` leaves the averaged weights in the model until the next epoch
    begins, so the backup would hold them in the live weights' place.) Validation is swapped by a plain
    `SwapEMAWeights` (on_test_begin / on_test_end).
    """

    def on_test_begin(self, logs=None):
        pass

    def on_test_end(self, logs=None):
        pass

    def on_predict_begin(self, logs=None):
        pass

    def on_predict_end(self, logs=None):
        pass

    def on_epoch_end(self, epoch, logs=None):
        self._swap_variables()


def make_callbacks(config: TrainConfig, checkpoint: str,
                   best_so_far: float | None = None) -> list[keras.callbacks.Callback]:
    """One set for all stages: the checkpoint remembers the best epoch across them (and across a
    resume: `best_so_far` is the best monitored value before it)."""
    mode = "min" if config.monitor == "val_loss" else "max"
    callbacks = [
        AtomicModelCheckpoint(checkpoint, monitor=config.monitor, mode=mode, save_best_only=True,
                              initial_value_threshold=best_so_far, first_epoch=config.first_kept_epoch),
        keras.callbacks.EarlyStopping(monitor=config.monitor, mode=mode, patience=config.early_stopping_patience,
                                      restore_best_weights=True, start_from_epoch=config.first_kept_epoch),
    ]
    if config.weight_averaging == "ema":
        callbacks = [keras.callbacks.SwapEMAWeights(), SwapAveragedWeightsAtEpochEnd(), *callbacks,
                     SwapAveragedWeightsAtEpochEnd()]
    if config.lr_schedule == "plateau":
        callbacks.append(keras.callbacks.ReduceLROnPlateau(monitor=config.monitor, mode=mode,
                                                           factor=config.lr_plateau_factor,
                                                           patience=config.lr_plateau_patience))
    return callbacks
