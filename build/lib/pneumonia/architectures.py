"""The one registry of model architectures (model.name): adding a model is one entry here.

Bottom layer, like pneumonia.config which validates model.name against it: no TensorFlow and no
other project import, so that params validate before any heavy work (pneumonia.models builds them).
Minimum sizes and input scalings are those of the installed keras.applications (`min_size=` and
`preprocess_input` in keras/src/applications/).
"""

from dataclasses import dataclass
from typing import Literal

# How a backbone expects its [0, 255] input scaled; the scaling is built into the saved model.
#   "tf":    [-1, 1]                       (Xception, ResNetV2, MobileNetV2, InceptionV3)
#   "torch": [0, 1], then ImageNet mean/std (DenseNet)
#   "none":  the application rescales by itself (EfficientNet)
Preprocessing = Literal["tf", "torch", "none"]

# MobileNetV2 ships ImageNet weights for these input sizes and loads the 224 ones for any other.
MOBILENET_V2_WEIGHT_SIZES = (96, 128, 160, 192, 224)


@dataclass(frozen=True)
class Backbone:
    """A keras.applications network used as a feature extractor under our classification head."""

    application: str  # attribute name in keras.applications
    preprocessing: Preprocessing
    min_image_size: int
    imagenet_file: str  # the no-top weights file Keras downloads into its cache ({size}: see below)

    def imagenet_file_name(self, image_size: int) -> str:
        size = image_size if image_size in MOBILENET_V2_WEIGHT_SIZES else 224
        return self.imagenet_file.format(size=size)


CUSTOM_CNN = "custom_cnn"
CUSTOM_CNN_MIN_IMAGE_SIZE = 32  # five 2x poolings must leave at least a 1x1 map

BACKBONES: dict[str, Backbone] = {
    "xception": Backbone("Xception", "tf", 71, "xception_weights_tf_dim_ordering_tf_kernels_notop.h5"),
    "resnet50v2": Backbone("ResNet50V2", "tf", 32, "resnet50v2_weights_tf_dim_ordering_tf_kernels_notop.h5"),
    "densenet121": Backbone("DenseNet121", "torch", 32, "densenet121_weights_tf_dim_ordering_tf_kernels_notop.h5"),
    "densenet169": Backbone("DenseNet169", "torch", 32, "densenet169_weights_tf_dim_ordering_tf_kernels_notop.h5"),
    "densenet201": Backbone("DenseNet201", "torch", 32, "densenet201_weights_tf_dim_ordering_tf_kernels_notop.h5"),
    "efficientnetb0": Backbone("EfficientNetB0", "none", 32, "efficientnetb0_notop.h5"),
    "mobilenetv2": Backbone("MobileNetV2", "tf", 32,
                            "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_{size}_no_top.h5"),
    "inceptionv3": Backbone("InceptionV3", "tf", 75, "inception_v3_weights_tf_dim_ordering_tf_kernels_notop.h5"),
}

MODEL_NAMES: tuple[str, ...] = (CUSTOM_CNN, *BACKBONES)


def min_image_size(name: str) -> int:
    return CUSTOM_CNN_MIN_IMAGE_SIZE if name == CUSTOM_CNN else BACKBONES[name].min_image_size
