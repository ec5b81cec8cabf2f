"""The training recipe, free of TensorFlow: the stages of a run, the learning rate, the optimizer with its
weight averaging, the loss and the metrics a model is compiled with (`prepare_stage`). `fit` trains with it
on the TFRecords under TensorFlow; benchmarks/gpu_check_jax.py trains the same recipe under Keras's JAX
backend, where TensorFlow is not installed.
"""

from dataclasses import dataclass

import keras

from pneumonia.config import ModelConfig, TrainConfig
from pneumonia.models.fine_tuning import set_trainable


@dataclass(frozen=True)
class Stage:
    name: str
    epochs: int
    learning_rate: float
    fine_tune: str  # the strategy for the backbone during this stage


def stages(config: TrainConfig) -> list[Stage]:
    if not config.warmup_epochs:
        return [Stage("train", config.epochs, config.learning_rate, config.fine_tune)]
    return [
        Stage("warm-up", config.warmup_epochs, config.learning_rate, "frozen"),
        Stage("fine-tune", config.epochs - config.warmup_epochs, config.fine_tune_learning_rate, config.fine_tune),
    ]


def learning_rate(config: TrainConfig, stage: Stage, steps_per_epoch: int):
    """The optimizer's learning rate: a schedule over the stage's steps, or a number that
    ReduceLROnPlateau lowers (`callbacks.make_callbacks`)."""
    if config.lr_schedule == "exponential":
        return keras.optimizers.schedules.ExponentialDecay(
            stage.learning_rate, decay_steps=steps_per_epoch, decay_rate=config.lr_decay_rate
        )
    if config.lr_schedule == "cosine":
        return keras.optimizers.schedules.CosineDecay(stage.learning_rate, decay_steps=steps_per_epoch * stage.epochs)
    if config.lr_schedule == "cosine_restarts":  # SGDR (Loshchilov and Hutter 2017) with cycles 1, 2, 4, ... long
        cycles = 2 ** (config.lr_restarts + 1) - 1  # the stage's length in first cycles
        return keras.optimizers.schedules.CosineDecayRestarts(
            stage.learning_rate, first_decay_steps=max(1, round(steps_per_epoch * stage.epochs / cycles)), t_mul=2.0)
    return stage.learning_rate


def keras_metrics(output: str) -> list[keras.metrics.Metric]:
    """The Keras metric objects reported per epoch: accuracy, precision, recall and AUC of pneumonia, for
    either output layer: with softmax the labels are one-hot (see `labelled_for`) and the metrics read the
    PNEUMONIA column. (The evaluation's numbers are pneumonia.evaluation.metrics.)"""
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


def averaging_momentum(config: TrainConfig, steps_per_epoch: int) -> float:
    """train.ema_momentum, `auto` resolved: 0.99, an average over about the last 100 steps, or over about
    the last epoch when an epoch is shorter. Batch-norm statistics follow the current weights, not the
    averaged ones; an average that still holds the weights of epochs long past (the compact sample's
    23-step epochs at 0.99) validates a network its statistics do not fit: the threshold chosen on it
    came out at 0.02."""
    if config.ema_momentum != "auto":
        return config.ema_momentum
    return min(0.99, 1 - 1 / steps_per_epoch)


def optimizer(config: TrainConfig, rate, steps_per_epoch: int) -> keras.optimizers.Optimizer:
    """Adam, with train.weight_decay decoupled (AdamW) on the kernels only, as is usual: decaying biases and
    batch-norm scales and offsets only shifts what the next normalisation undoes."""
    adam = keras.optimizers.Adam(rate, weight_decay=config.weight_decay or None,
                                 use_ema=config.weight_averaging == "ema",
                                 ema_momentum=averaging_momentum(config, steps_per_epoch))
    if config.weight_decay:
        adam.exclude_from_weight_decay(var_names=["bias", "gamma", "beta"])
    return adam


def compile_model(model: keras.Model, output: str, config: TrainConfig, rate, steps_per_epoch: int) -> None:
    model.compile(
        optimizer=optimizer(config, rate, steps_per_epoch),
        loss=(keras.losses.CategoricalCrossentropy if output == "softmax"
              else keras.losses.BinaryCrossentropy)(label_smoothing=config.label_smoothing),
        metrics=keras_metrics(output),
        steps_per_execution=config.steps_per_execution,
    )
    # Its variables made now, not in the first step: a step function that creates variables is traced
    # twice (tf.function), which cost every training of custom_cnn 2.4 s; the weights come out the same.
    model.optimizer.build(model.trainable_variables)


def prepare_stage(model: keras.Model, model_config: ModelConfig, config: TrainConfig, stage: Stage,
                  steps_per_epoch: int) -> None:
    """Set which layers train in this stage, then compile (trainable flags take effect at compile)."""
    set_trainable(model, stage.fine_tune, config.fine_tune_layers, pretrained=model_config.weights != "none")
    compile_model(model, model_config.output, config, learning_rate(config, stage, steps_per_epoch), steps_per_epoch)
