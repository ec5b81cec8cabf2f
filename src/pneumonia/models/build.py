"""Model construction from the params: augmentation, the named network, the output layer.

Every model takes plain [0, 255] RGB images (cropped by model.crop before anything else) and outputs either
the probability of pneumonia (model.output: sigmoid, shape [batch, 1]) or of [NORMAL, PNEUMONIA] (softmax,
shape [batch, 2]);
`evaluation.predictions.pneumonia_probability` turns either into one probability per image.
An ensemble (train.ensemble_members) is one such model too: `ensemble_of` its members.
"""

import zipfile
from collections.abc import Sequence
from pathlib import Path

import keras
from keras import layers

from pneumonia import paths
from pneumonia.architectures import BACKBONES, CUSTOM_CNN
from pneumonia.config import AugmentConfig, ModelConfig
from pneumonia.errors import NOT_A_ZIP, PipelineError, damaged_model
from pneumonia.models import backbones, custom_cnn
from pneumonia.models.augmentation import augment


def output_layer(kind: str, features):
    # float32 output even under mixed precision: the loss and metrics need full-precision probabilities.
    if kind == "softmax":
        return layers.Dense(2, activation="softmax", name="normal_pneumonia", dtype="float32")(features)
    return layers.Dense(1, activation="sigmoid", name="pneumonia", dtype="float32")(features)


NO_AUGMENTATION = AugmentConfig(flip="none", zoom=0, rotation=0, translation=0, contrast=0)


def weights_file(config: ModelConfig) -> Path | None:
    """The weights file named by model.weights, when it names one; a PipelineError when it is missing."""
    if config.weights in ("none", "imagenet"):
        return None
    path = paths.resolve_user_path(config.weights)
    if not path.is_file():
        raise PipelineError(
            f"params.yaml: model.weights = {config.weights!r} is neither 'imagenet', 'none' nor an "
            f"existing weights file (looked at {path})."
        )
    return path


def build_model(config: ModelConfig, image_size: int, augmentation: AugmentConfig = NO_AUGMENTATION) -> keras.Model:
    inputs = keras.Input(shape=(image_size, image_size, 3), name="image")
    x = inputs
    if config.crop:
        kept = config.cropped_size(image_size)
        x = layers.CenterCrop(kept, kept, name="border_crop")(x)
    x = augment(augmentation, x)
    if config.name == CUSTOM_CNN:
        x = custom_cnn.features(x, config.dropout, config.input_norm, config.width, config.stem,
                                config.convs_per_block)
    else:
        weights = {"none": None, "imagenet": "imagenet"}.get(config.weights) or weights_file(config)
        x = backbones.features(BACKBONES[config.name], x, weights, config.head_units, config.dropout)
    return keras.Model(inputs, output_layer(config.output, x), name=config.name)


ENSEMBLE_OUTPUT = "mean_over_members"  # the layer that marks a model of `ensemble_of`


def ensemble_of(members: Sequence[keras.Model]) -> keras.Model:
    """One model over one input whose output is the mean of the `members`' outputs (models of
    `build_model` for the same input, each nested as a layer `member_<k>`): the mean of their
    probabilities, as benchmarks/prediction_levers measures it. It saves, loads (`load_model`), predicts
    and serves like a single model; `members_of` gives the members back. The members are not copied:
    the ensemble shares their weights."""
    if len(members) < 2:
        raise ValueError(f"an ensemble needs at least 2 members, got {len(members)}")
    inputs = keras.Input(members[0].input_shape[1:], name="image")
    # Each member under a name of its own (a model's layer names must differ), over the same layers and weights
    named = [keras.Model(member.input, member.output, name=f"member_{number}")
             for number, member in enumerate(members)]
    outputs = [member(inputs) for member in named]
    # float32 as the members' outputs (`output_layer`): under a mixed policy the mean would be float16 or bfloat16
    return keras.Model(inputs, layers.Average(name=ENSEMBLE_OUTPUT, dtype="float32")(outputs),
                       name=f"{members[0].name}_ensemble{len(members)}")


def members_of(model: keras.Model) -> list[keras.Model]:
    """The members of an ensemble of `ensemble_of` (also one loaded from a file), in order; [] for a single model."""
    if model.layers[-1].name != ENSEMBLE_OUTPUT:
        return []
    return [layer for layer in model.layers if isinstance(layer, keras.Model)]


def load_model(path, compile: bool = True) -> keras.Model:
    """A saved model of `build_model`: Keras' loader, with this package's layers (RandomAffine) known to it;
    `compile=False` for predicting only (no optimizer, loss and metrics rebuilt: faster to load), computing in
    float32 (`in_float32`). A truncated or corrupt file is a PipelineError (Keras says "File not found" of a
    truncated zip)."""
    try:
        model = keras.models.load_model(path, compile=compile)
    except (ValueError, zipfile.BadZipFile, EOFError, KeyError) as exc:
        why = f"{type(exc).__name__}: {exc}" if zipfile.is_zipfile(path) else NOT_A_ZIP
        raise damaged_model(path, why) from None
    return model if compile else in_float32(model)


def all_layers(model: keras.Model):
    """Every layer of `model`, and of the models inside it (a backbone, an ensemble's members)."""
    for layer in model.layers:
        yield layer
        if isinstance(layer, keras.Model):
            yield from all_layers(layer)


def in_float32(model: keras.Model) -> keras.Model:
    """`model` computing in float32: itself when every layer does; else (trained in mixed precision,
    train.precision) a copy with its weights, every layer's dtype policy float32. Mixed precision is for
    training speed, and its weights are float32 already. Predicting in bfloat16 or float16 is not what the
    model's users get: tf2onnx exports such a network as a graph ONNX Runtime refuses to load (a Mul of float16
    and bfloat16 in a backbone's input scaling), so `pneumonia predict` failed on a backbone trained with
    train.precision auto on a CPU with native bfloat16. The train stage saves the copy; evaluate, predict,
    serving and the ONNX export read float32 whatever file they are given."""
    if all(layer.dtype_policy.compute_dtype == "float32" for layer in all_layers(model)):
        return model

    def as_float32(layer: keras.layers.Layer) -> keras.layers.Layer:
        return layer.__class__.from_config({**layer.get_config(), "dtype": "float32"})

    copy = keras.models.clone_model(model, clone_function=as_float32, recursive=True)
    copy.set_weights(model.get_weights())
    return copy
