"""Keras applications as feature extractors under one classification head.

The backbone's own input scaling is part of the model, so every saved model takes plain
[0, 255] images.
"""

from pathlib import Path

import keras
from keras import layers

from pneumonia.errors import PipelineError
from pneumonia.models.registry import Backbone

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def input_scaling(preprocessing: str, inputs):
    if preprocessing == "tf":
        return layers.Rescaling(1.0 / 127.5, offset=-1.0, name="scale_to_pm1")(inputs)
    if preprocessing == "torch":
        x = layers.Rescaling(1.0 / 255, name="scale_to_01")(inputs)
        return layers.Normalization(mean=IMAGENET_MEAN, variance=[s**2 for s in IMAGENET_STD], name="imagenet_norm")(x)
    return inputs


def load_backbone(spec: Backbone, image_size: int, weights: str | Path | None) -> keras.Model:
    application = getattr(keras.applications, spec.application)
    try:
        return application(include_top=False, weights=weights, input_shape=(image_size, image_size, 3))
    except Exception as exc:
        if weights != "imagenet":
            raise
        raise PipelineError(
            f"could not download the ImageNet weights of {spec.application} ({type(exc).__name__}: {exc}).\n"
            f"Without internet access, download the '{spec.application}' no-top weights file "
            "(the URL is in the message above) on another machine and place it in ~/.keras/models/, "
            "or set model.weights to the path of that file, or to 'none' to train from scratch."
        ) from exc


def build(spec: Backbone, name: str, image_size: int, weights: str | Path | None, head_units: int,
          dropout: float) -> keras.Model:
    inputs = keras.Input(shape=(image_size, image_size, 3), name="image")
    x = input_scaling(spec.preprocessing, inputs)
    backbone = load_backbone(spec, image_size, weights)
    # training=False keeps batch-norm statistics of a pretrained backbone fixed even when unfrozen.
    x = backbone(x, training=False if weights is not None else None)
    x = layers.GlobalAveragePooling2D()(x)
    x = layers.Dropout(dropout)(x)
    if head_units:
        x = layers.Dense(head_units, activation="relu")(x)
        x = layers.Dropout(dropout)(x)
    outputs = layers.Dense(1, activation="sigmoid", name="pneumonia", dtype="float32")(x)
    return keras.Model(inputs, outputs, name=name)
