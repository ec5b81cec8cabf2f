"""Random image augmentation as Keras preprocessing layers at the model's input.

Keras applies them only when training (fit); predict and evaluate pass images through unchanged,
so the saved model needs no switch. They work on the [0, 255] images, before any input scaling.
"""

from keras import layers

from pneumonia.config import AugmentConfig


def augment(config: AugmentConfig, inputs):
    x = inputs
    if config.flip != "none":
        x = layers.RandomFlip(config.flip, name="random_flip")(x)
    if config.zoom:
        x = layers.RandomZoom(config.zoom, fill_mode="constant", name="random_zoom")(x)
    if config.rotation:
        x = layers.RandomRotation(config.rotation, fill_mode="constant", name="random_rotation")(x)
    if config.translation:
        x = layers.RandomTranslation(config.translation, config.translation, fill_mode="constant",
                                     name="random_translation")(x)
    if config.contrast:
        x = layers.RandomContrast(config.contrast, value_range=(0, 255), name="random_contrast")(x)
    return x
