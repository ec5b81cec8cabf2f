"""The separable-conv network of the keras.io "Pneumonia classification on TPU" recipe.

Changed from the recipe: global average pooling instead of Flatten, so the network takes any
image size and has far fewer parameters to overfit with; batch-norm moving statistics that follow
the data within tens of steps (momentum 0.9, Keras' default is 0.99), because at about a hundred
steps per epoch the default left validation predictions constant for the first epochs; and
batch statistics over the global batch when training on several replicas (`synchronized`, no-op on
one device), so every worker normalises alike and the saved moving statistics see all of the data.
Keras allows `synchronized` under TensorFlow only: under its JAX backend (benchmarks/gpu_check_jax.py)
the statistics are the device's batch's.
"""

import math

import keras
from keras import layers, ops

BN_MOMENTUM = 0.9


def batch_norm():
    return layers.BatchNormalization(momentum=BN_MOMENTUM, synchronized=keras.backend.backend() == "tensorflow")


def conv_block(filters: int, inputs, convs: int = 2):
    x = inputs
    for _ in range(convs):
        x = layers.SeparableConv2D(filters, 3, activation="relu", padding="same")(x)
    x = batch_norm()(x)
    return layers.MaxPool2D()(x)


def dense_block(units: int, dropout_rate: float, inputs):
    x = layers.Dense(units, activation="relu")(inputs)
    x = batch_norm()(x)
    return layers.Dropout(dropout_rate)(x)


@keras.saving.register_keras_serializable(package="pneumonia")
class HistogramEqualization(layers.Layer):
    """Each image's gray levels (0-255, the mean of its channels) replaced by their mid-rank among its own
    pixels, the share below plus half the share equal, then centred and scaled to unit variance: one gray
    channel out. Any increasing change of brightness, contrast or gamma between sites is gone, where
    per_image removes only an offset and a scale. A histogram (bincount) per image, which tf2onnx exports."""

    LEVELS = 256

    def call(self, images):
        shape = ops.shape(images)
        gray = ops.cast(ops.clip(ops.round(ops.mean(ops.cast(images, "float32"), axis=-1)), 0, self.LEVELS - 1),
                        "int32")
        flat = ops.reshape(gray, (shape[0], -1))
        share = ops.cast(ops.bincount(flat, minlength=self.LEVELS), "float32")
        share = share / ops.sum(share, axis=1, keepdims=True)
        mid_rank = ops.cumsum(share, axis=1) - share / 2
        uniform = ops.take_along_axis(mid_rank, flat, axis=1)  # in (0, 1)
        return ops.reshape((uniform - 0.5) * math.sqrt(12.0), (shape[0], shape[1], shape[2], 1))

    def compute_output_shape(self, input_shape):
        return (*input_shape[:3], 1)


def stem_block(stem: str, filters: int, inputs):
    """The first block, half the input's resolution out. full_resolution: the recipe's two convolutions at the
    input's resolution, then max pooling. strided: the first convolution at stride 2, the second at half
    resolution, which does a quarter of the arithmetic of those few-channel, memory-bound layers."""
    if stem == "strided":
        x = layers.Conv2D(filters, 3, strides=2, activation="relu", padding="same")(inputs)
        return layers.Conv2D(filters, 3, activation="relu", padding="same")(x)
    x = layers.Conv2D(filters, 3, activation="relu", padding="same")(inputs)
    x = layers.Conv2D(filters, 3, activation="relu", padding="same")(x)
    return layers.MaxPool2D()(x)


def features(inputs, dropout: float, input_norm: str = "scale", width: float = 1.0, stem: str = "full_resolution",
             convs_per_block: int = 2):
    """Plain [0, 255] RGB images in, the features the output layer classifies out; `width` x each convolution's
    filters (model.width), `stem` the first block (model.stem), `convs_per_block` separable convolutions in each
    block after it (model.convs_per_block)."""
    def filters(count: int) -> int:
        return max(1, round(count * width))

    if input_norm == "per_image":  # each image to zero mean and unit variance over all its pixels
        x = layers.LayerNormalization(axis=(1, 2, 3), center=False, scale=False, name="per_image_norm")(inputs)
    elif input_norm == "equalize":
        x = HistogramEqualization(name="histogram_equalization")(inputs)
    else:
        x = layers.Rescaling(1.0 / 255)(inputs)
    x = stem_block(stem, filters(16), x)
    x = conv_block(filters(32), x, convs_per_block)
    x = conv_block(filters(64), x, convs_per_block)
    x = conv_block(filters(128), x, convs_per_block)
    x = layers.Dropout(0.2)(x)
    x = conv_block(filters(256), x, convs_per_block)
    x = layers.Dropout(0.2)(x)
    x = layers.GlobalAveragePooling2D()(x)
    x = dense_block(512, 0.7, x)
    x = dense_block(128, 0.5, x)
    return dense_block(64, dropout, x)
