"""Model construction from the `model` params; the names live in `registry`."""

import keras

from pneumonia.config import ModelConfig
from pneumonia.models import backbones, custom_cnn
from pneumonia.models.registry import BACKBONES, CUSTOM_CNN


def build_model(config: ModelConfig, image_size: int) -> keras.Model:
    if config.name == CUSTOM_CNN:
        return custom_cnn.build(image_size, config.dropout)
    weights = {"none": None, "imagenet": "imagenet"}.get(config.weights) or config.weights_file()
    return backbones.build(BACKBONES[config.name], config.name, image_size, weights, config.head_units, config.dropout)
