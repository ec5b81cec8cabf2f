"""Keras applications as feature extractors: input scaling, the pretrained network, pooling, and
the dense layer of our head.

The backbone's own input scaling is part of the model, so every saved model takes plain
[0, 255] images.
"""

import os
from pathlib import Path

import keras
from keras import layers

from pneumonia.architectures import Backbone
from pneumonia.errors import PipelineError

BACKBONE_LAYER = "backbone"  # the nested application model, found by this name for fine-tuning
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Batch-norm momentum of a backbone trained from scratch: the applications' own (0.99, 0.999 for MobileNetV2) is
# made for ImageNet's hundreds of thousands of steps; on a dataset of a hundred steps an epoch the moving statistics
# stay near their initial values for many epochs, and the model in inference mode (validation, checkpoint, early
# stopping, evaluate) gives every image the same probability. MobileNetV2 from scratch on the compact sample:
# validation ROC AUC 0.5 for all 5 epochs at 0.99, 0.90 from the third at 0.9 (docs/models.md).
FROM_SCRATCH_BN_MOMENTUM = 0.9


def input_scaling(preprocessing: str, inputs):
    if preprocessing == "tf":
        return layers.Rescaling(1.0 / 127.5, offset=-1.0, name="scale_to_pm1")(inputs)
    if preprocessing == "torch":
        x = layers.Rescaling(1.0 / 255, name="scale_to_01")(inputs)
        return layers.Normalization(mean=IMAGENET_MEAN, variance=[s**2 for s in IMAGENET_STD], name="imagenet_norm")(x)
    return inputs


def keras_weights_cache() -> Path:
    """Where keras.utils.get_file looks for (and stores) downloaded weights."""
    return Path(os.environ.get("KERAS_HOME") or "~/.keras") / "models"


def load_backbone(spec: Backbone, image_size: int, weights: str | Path | None) -> keras.Model:
    application = getattr(keras.applications, spec.application)
    try:
        backbone = application(include_top=False, weights=weights, input_shape=(image_size, image_size, 3),
                               name=BACKBONE_LAYER)
    except Exception as exc:
        if weights != "imagenet":
            raise
        file_name = spec.imagenet_file_name(image_size)
        raise PipelineError(
            f"could not download the ImageNet weights of {spec.application} ({type(exc).__name__}: {exc}).\n"
            f"Without internet access, fetch '{file_name}' on another machine (from the Keras "
            f"applications storage, the URL in the message above) and place it as "
            f"{keras_weights_cache() / file_name}; or set model.weights to the path of that file, "
            "or to 'none' to train from scratch."
        ) from exc
    if weights is None:  # from scratch: statistics that follow the training within an epoch
        for layer in backbone.layers:
            if isinstance(layer, layers.BatchNormalization):
                layer.momentum = FROM_SCRATCH_BN_MOMENTUM
    return backbone


def features(spec: Backbone, inputs, weights: str | Path | None, head_units: int, dropout: float):
    """[0, 255] images -> the head's features: scaling, backbone, pooling, [dense], dropout."""
    x = input_scaling(spec.preprocessing, inputs)
    image_size = inputs.shape[1]
    backbone = load_backbone(spec, image_size, weights)
    # Its batch-norm layers keep pretrained statistics by staying frozen (fine_tuning.set_trainable):
    # a training=False here would not hold, Keras 3's fit overrides it (keras-team/keras#20285).
    x = backbone(x)
    x = layers.GlobalAveragePooling2D(name="pool")(x)
    x = layers.Dropout(dropout)(x)
    if head_units:
        x = layers.Dense(head_units, activation="relu", name="head_dense")(x)
        x = layers.Dropout(dropout)(x)
    return x
