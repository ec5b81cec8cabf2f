"""Grad-CAM: the feature map is found in every model family, and the heat map points at the
evidence (a bright square that alone decides the label of a small trained model)."""

import re

import keras
import numpy as np
import pytest
from keras import layers

from pneumonia.architectures import BACKBONES, CUSTOM_CNN, MODEL_NAMES, min_image_size
from pneumonia.config import ModelConfig
from pneumonia.evaluation import gradcam
from pneumonia.models.backbones import BACKBONE_LAYER
from pneumonia.models.build import build_model

SQUARE = 6  # side of the planted bright square, pixels
SIZE = 32


def random_images(count: int, size: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0, 255, (count, size, size, 3)).astype(np.float32)


def one_per_family(names) -> list[str]:
    """densenet121/169/201 are one family (the same layer structure): test the first of each."""
    families = {}
    for name in names:
        family = re.sub(r"\d+$", "", BACKBONES[name].application) if name in BACKBONES else name
        families.setdefault(family, name)
    return list(families.values())


@pytest.mark.slow
@pytest.mark.parametrize("name", one_per_family(MODEL_NAMES))
def test_feature_map_found_and_heatmaps_shaped_for_every_model_family(name):
    size = max(32, min_image_size(name))
    model = build_model(ModelConfig(crop=0, name=name, weights="none", head_units=8), size)
    feature_map = gradcam.last_feature_map(model)
    assert len(feature_map.tensor.shape) == 4
    if name in BACKBONES:  # inside the nested keras.applications model: its last feature map
        assert feature_map.layer_name.startswith(f"{BACKBONE_LAYER}/")
    maps = gradcam.heatmaps(model, random_images(2, size), target_class=[1, 0])
    assert maps.shape == (2, size, size)
    assert np.isfinite(maps).all() and maps.min() >= 0 and maps.max() <= 1


def test_custom_cnn_feature_map_is_its_last_convolutional_stage():
    model = build_model(ModelConfig(crop=0, name=CUSTOM_CNN), 64)
    feature_map = gradcam.last_feature_map(model)
    assert "/" not in feature_map.layer_name  # a flat network: a layer of the model itself
    assert tuple(feature_map.tensor.shape[1:]) == (2, 2, 256)  # 64 px after five 2x poolings


@pytest.mark.slow
def test_nested_backbone_found_after_saving_and_loading(tmp_path):
    """The evaluate stage explains a model loaded from models/model.keras."""
    model = build_model(ModelConfig(crop=0, name="xception", weights="none", head_units=0), 71)
    model.save(tmp_path / "model.keras")
    loaded = keras.models.load_model(tmp_path / "model.keras")
    feature_map = gradcam.last_feature_map(loaded)
    assert feature_map.layer_name == f"{BACKBONE_LAYER}/block14_sepconv2_act"  # Xception's last conv block
    images = random_images(2, 71)
    np.testing.assert_allclose(gradcam.heatmaps(loaded, images), gradcam.heatmaps(model, images), atol=1e-5)


def test_softmax_head_is_explained_per_class():
    model = build_model(ModelConfig(crop=0, name=CUSTOM_CNN, output="softmax"), 32)
    maps = gradcam.heatmaps(model, random_images(3, 32), target_class=[0, 1, 1])
    assert maps.shape == (3, 32, 32)


def test_model_without_feature_map_is_rejected():
    inputs = keras.Input((8,))
    model = keras.Model(inputs, layers.Dense(1, activation="sigmoid")(inputs))
    with pytest.raises(ValueError, match="4-D"):
        gradcam.last_feature_map(model)


# ------------------------------------------------------------------ planted signal


def square_images(count: int, rng: np.random.Generator, positive: np.ndarray, corners=None) -> np.ndarray:
    """Dim noise; positives carry a bright square at a random (or the given) top-left corner."""
    images = rng.uniform(0, 80, (count, SIZE, SIZE, 3)).astype(np.float32)
    for index in np.flatnonzero(positive):
        row, column = corners[index] if corners is not None else rng.integers(0, SIZE - SQUARE, 2)
        images[index, row:row + SQUARE, column:column + SQUARE] = 255
    return images


@pytest.fixture(scope="module")
def square_detector() -> keras.Model:
    """A small CNN trained until the square alone decides its answer."""
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    labels = np.arange(400) % 2
    images = square_images(400, rng, labels)
    inputs = keras.Input((SIZE, SIZE, 3))
    x = layers.Rescaling(1 / 255)(inputs)
    x = layers.Conv2D(8, 3, padding="same", activation="relu")(x)
    x = layers.Conv2D(8, 3, padding="same", activation="relu")(x)
    x = layers.GlobalMaxPooling2D()(x)
    model = keras.Model(inputs, layers.Dense(1, activation="sigmoid", name="pneumonia")(x))
    model.compile(keras.optimizers.Adam(0.01), "binary_crossentropy", metrics=["accuracy"])
    model.fit(images, labels.astype(np.float32), epochs=8, batch_size=32, verbose=0)
    test = square_images(100, rng, np.arange(100) % 2)
    accuracy = np.mean((model.predict(test, verbose=0)[:, 0] >= 0.5) == np.arange(100) % 2)
    assert accuracy > 0.95, "the detector did not learn the square; the Grad-CAM test below would mean nothing"
    return model


def test_heatmap_peaks_on_the_planted_square_and_follows_it(square_detector):
    corners = [(2, 3), (22, 20), (4, 24), (20, 5)]
    images = square_images(4, np.random.default_rng(1), np.ones(4, bool), corners=corners)
    maps = gradcam.heatmaps(square_detector, images)
    assert maps.shape == (4, SIZE, SIZE)
    for heat, (row, column) in zip(maps, corners):
        assert np.ptp(heat) > 0.5  # not constant
        inside = np.zeros((SIZE, SIZE), bool)
        inside[row:row + SQUARE, column:column + SQUARE] = True
        peak = np.unravel_index(np.argmax(heat), heat.shape)
        # The peak lies on the square (allowing the 3x3 receptive field's margin) ...
        margin = 2
        assert row - margin <= peak[0] < row + SQUARE + margin, (peak, row, column)
        assert column - margin <= peak[1] < column + SQUARE + margin, (peak, row, column)
        # ... and the square is far hotter than the rest of the image.
        assert heat[inside].mean() > 3 * heat[~inside].mean()
