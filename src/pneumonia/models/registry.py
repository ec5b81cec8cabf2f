"""The one registry of models: adding a model is one entry here.

Kept free of TensorFlow imports so that params can be validated before any heavy work.
"""

from dataclasses import dataclass
from typing import Literal

# How a backbone expects its [0, 255] input scaled; the scaling is built into the saved model.
#   "tf":    [-1, 1]                       (Xception, ResNetV2, MobileNetV2, InceptionV3)
#   "torch": [0, 1], then ImageNet mean/std (DenseNet)
#   "none":  the application rescales by itself (EfficientNet)
Preprocessing = Literal["tf", "torch", "none"]


@dataclass(frozen=True)
class Backbone:
    """A keras.applications network used as a feature extractor under our classification head."""

    application: str  # attribute name in keras.applications
    preprocessing: Preprocessing
    min_image_size: int


CUSTOM_CNN = "custom_cnn"
CUSTOM_CNN_MIN_IMAGE_SIZE = 32  # five 2x poolings must leave at least a 1x1 map

BACKBONES: dict[str, Backbone] = {
    "xception": Backbone("Xception", "tf", 71),
}

MODEL_NAMES: tuple[str, ...] = (CUSTOM_CNN, *BACKBONES)


def min_image_size(name: str) -> int:
    return CUSTOM_CNN_MIN_IMAGE_SIZE if name == CUSTOM_CNN else BACKBONES[name].min_image_size
