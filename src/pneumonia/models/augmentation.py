"""Random image augmentation as layers at the model's input.

Keras applies them only when training (fit); predict and evaluate pass images through unchanged,
so the saved model needs no switch. They work on the [0, 255] images, before any input scaling.

Zoom, rotation and translation are one affine transform per image (`RandomAffine`), not Keras'
three layers in a row: one resampling instead of three, about 10% of a custom_cnn training step at
128 px (benchmarks/results.md), and one interpolation blurs less than three.
"""

import math

import keras
from keras import layers, ops

from pneumonia.config import AugmentConfig


class SeededAugmentation(layers.Layer):
    """A random augmentation drawn from its own seed generator (`transform`, while training; the identity
    otherwise), shape-preserving."""

    def __init__(self, seed: int | None = None, **kwargs):
        super().__init__(**kwargs)
        self.seed = seed
        self.seed_generator = keras.random.SeedGenerator(seed)

    def call(self, images, training=None):
        return self.transform(images) if training else images

    def transform(self, images):
        raise NotImplementedError

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "seed": self.seed}


@keras.saving.register_keras_serializable(package="pneumonia")
class RandomAffine(SeededAugmentation):
    """Zoom in or out by up to `zoom`, rotate by up to `rotation` of a full turn and shift by up to
    `translation` of the size, each drawn per image, about the image centre; the corners that come
    from outside the image are 0, as with Keras' `fill_mode="constant"`. The same ranges as Keras'
    RandomZoom(zoom), RandomRotation(rotation) and RandomTranslation(translation, translation)."""

    def __init__(self, zoom: float = 0.0, rotation: float = 0.0, translation: float = 0.0, seed: int | None = None,
                 **kwargs):
        super().__init__(seed, **kwargs)
        self.zoom, self.rotation, self.translation = zoom, rotation, translation
        # TensorFlow's ImageProjectiveTransformV3 has no XLA kernel; under JAX the whole step compiles (without
        # it Keras would run JAX's training step op by op)
        self.supports_jit = keras.backend.backend() != "tensorflow"

    def transform(self, images):
        batch = ops.shape(images)[0]

        def uniform(limit):
            return keras.random.uniform((batch,), -limit, limit, seed=self.seed_generator)

        # Drawn in this order (scale, angle, x, y): the same seed gives the same augmentation as before.
        scale, angle = 1.0 + uniform(self.zoom), uniform(self.rotation * 2 * math.pi)
        shift = ops.stack([uniform(self.translation), uniform(self.translation)], axis=1)
        return affine(images, scale, angle, shift)

    def get_config(self):
        return {**super().get_config(), "zoom": self.zoom, "rotation": self.rotation, "translation": self.translation}


def affine(images, scale, angle, shift):
    """`images` (batch, height, width, channels) each scaled by `scale` (> 1 samples a larger area: zooms
    out), rotated by `angle` (radians) about the centre, then shifted by `shift` (batch, 2: x and y, in
    fractions of the size); the corners that come from outside the image are 0."""
    height, width = ops.cast(ops.shape(images)[1], "float32"), ops.cast(ops.shape(images)[2], "float32")
    shift_x, shift_y = shift[:, 0] * width, shift[:, 1] * height
    # Output pixel (x, y) samples input (a0 x + a1 y + a2, b0 x + b1 y + b2): rotate and scale about
    # the centre, then shift.
    cos, sin = scale * ops.cos(angle), scale * ops.sin(angle)
    centre_x, centre_y = (width - 1) / 2, (height - 1) / 2
    zeros = ops.zeros_like(cos)
    transform = ops.stack([cos, -sin, centre_x - cos * centre_x + sin * centre_y - shift_x,
                           sin, cos, centre_y - sin * centre_x - cos * centre_y - shift_y, zeros, zeros], axis=1)
    return ops.image.affine_transform(images, transform, fill_mode="constant")


# Test-time augmentation (evaluate.tta_views): the mean probability over fixed views of each image, each
# (scale, rotation in fractions of a turn, shift x, shift y); small moves inside the training augmentation's
# range. Measured on the external set: docs/results.md.
TEST_TIME_VIEWS = {
    1: [(1.0, 0.0, 0.0, 0.0)],
    3: [(1.0, 0.0, 0.0, 0.0), (0.9, 0.0, 0.0, 0.0), (1.1, 0.0, 0.0, 0.0)],
    9: [(1.0, 0.0, 0.0, 0.0), (0.9, 0.0, 0.0, 0.0), (1.1, 0.0, 0.0, 0.0),
        (1.0, 0.0, 0.04, 0.0), (1.0, 0.0, -0.04, 0.0), (1.0, 0.0, 0.0, 0.04), (1.0, 0.0, 0.0, -0.04),
        (1.0, 0.015, 0.0, 0.0), (1.0, -0.015, 0.0, 0.0)],
}


@keras.saving.register_keras_serializable(package="pneumonia")
class FixedAffine(layers.Layer):
    """One view of test-time augmentation: every image scaled, rotated and shifted alike (see `affine`)."""

    def __init__(self, scale: float = 1.0, turn: float = 0.0, shift_x: float = 0.0, shift_y: float = 0.0, **kwargs):
        super().__init__(**kwargs)
        self.scale, self.turn, self.shift_x, self.shift_y = scale, turn, shift_x, shift_y

    def call(self, images):
        if (self.scale, self.turn, self.shift_x, self.shift_y) == (1.0, 0.0, 0.0, 0.0):
            return images
        batch = ops.shape(images)[0]
        shift = ops.tile(ops.convert_to_tensor([[self.shift_x, self.shift_y]], "float32"), (batch, 1))
        return affine(ops.cast(images, "float32"), ops.full((batch,), self.scale),
                      ops.full((batch,), self.turn * 2 * math.pi), shift)

    def get_config(self):
        return {**super().get_config(), "scale": self.scale, "turn": self.turn, "shift_x": self.shift_x,
                "shift_y": self.shift_y}


def with_test_time_augmentation(model: keras.Model, views: int) -> keras.Model:
    """`model` predicting the mean of its outputs over TEST_TIME_VIEWS[views] of each image (the model
    itself for 1 view). Only for predicting: its weights are the model's."""
    if views == 1:
        return model
    inputs = keras.Input(model.input_shape[1:], name="image")
    outputs = [model(FixedAffine(*view, name=f"view_{number}")(inputs))
               for number, view in enumerate(TEST_TIME_VIEWS[views])]
    return keras.Model(inputs, layers.Average(name="mean_over_views")(outputs), name=f"{model.name}_tta{views}")


@keras.saving.register_keras_serializable(package="pneumonia")
class RandomGamma(SeededAugmentation):
    """Each [0, 255] image's gray levels through a gamma curve, 255 (x / 255) ** g, with g drawn per image
    log-uniformly in [1 / (1 + gamma), 1 + gamma]: a film or detector response another site may have, which
    standardising each image (model.input_norm: per_image) cannot undo as it undoes contrast and brightness."""

    def __init__(self, gamma: float = 0.0, seed: int | None = None, **kwargs):
        super().__init__(seed, **kwargs)
        self.gamma = gamma

    def transform(self, images):
        limit = math.log1p(self.gamma)
        exponent = ops.exp(keras.random.uniform((ops.shape(images)[0], 1, 1, 1), -limit, limit,
                                                seed=self.seed_generator))
        return 255.0 * ops.power(ops.clip(ops.cast(images, "float32") / 255.0, 0.0, 1.0), exponent)

    def get_config(self):
        return {**super().get_config(), "gamma": self.gamma}


@keras.saving.register_keras_serializable(package="pneumonia")
class RandomNoise(SeededAugmentation):
    """Gaussian noise on [0, 255] images, its standard deviation `share` of 255 (Keras' GaussianNoise takes at
    most 1, for inputs scaled to [0, 1]); the identity when predicting."""

    def __init__(self, share: float = 0.0, seed: int | None = None, **kwargs):
        super().__init__(seed, **kwargs)
        self.share = share

    def transform(self, images):
        images = ops.cast(images, "float32")
        return images + keras.random.normal(ops.shape(images), stddev=255.0 * self.share, seed=self.seed_generator)

    def get_config(self):
        return {**super().get_config(), "share": self.share}


def augment(config: AugmentConfig, inputs):
    x = inputs
    if config.flip != "none":
        x = layers.RandomFlip(config.flip, name="random_flip")(x)
    if config.zoom or config.rotation or config.translation:
        x = RandomAffine(config.zoom, config.rotation, config.translation, name="random_affine")(x)
    if config.contrast:
        x = layers.RandomContrast(config.contrast, value_range=(0, 255), name="random_contrast")(x)
    if config.gamma:
        x = RandomGamma(config.gamma, name="random_gamma")(x)
    if config.sharpness:
        x = layers.RandomSharpness((0.5 - config.sharpness, 0.5 + config.sharpness), value_range=(0, 255),
                                   name="random_sharpness")(x)
    if config.noise:
        x = RandomNoise(config.noise, name="random_noise")(x)
    if config.rand_augment:
        x = layers.RandAugment(value_range=(0, 255), num_ops=config.rand_augment, name="rand_augment")(x)
    return x
