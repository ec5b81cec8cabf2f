"""RandomAffine: zoom, rotation and translation in one resampling, each within its range."""

import subprocess
import sys

import keras
import numpy as np
import pytest

from pneumonia.models.augmentation import RandomAffine


def dot_image(size: int = 33, at: tuple[int, int] | None = None) -> np.ndarray:
    image = np.zeros((1, size, size, 1), "float32")
    row, column = at or (size // 2, size // 2)
    image[0, row - 1:row + 2, column - 1:column + 2] = 255
    return image


def centre_of_mass(image: np.ndarray) -> np.ndarray:
    weights = image[0, :, :, 0]
    rows, columns = np.indices(weights.shape)
    return np.array([(rows * weights).sum(), (columns * weights).sum()]) / weights.sum()


def test_identity_outside_training_and_with_zero_ranges():
    image = np.random.default_rng(0).uniform(0, 255, (2, 16, 16, 3)).astype("float32")
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(RandomAffine(0.3, 0.1, 0.1)(image, training=False)),
                                  image)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(RandomAffine(0, 0, 0)(image, training=True)), image,
                               atol=1e-3)


def test_zoom_and_rotation_turn_about_the_centre_and_change_the_image():
    layer = RandomAffine(zoom=0.25, rotation=0.25, seed=1)
    centre = dot_image()
    off_centre = dot_image(at=(8, 16))
    for _ in range(5):
        kept = keras.ops.convert_to_numpy(layer(centre, training=True))
        np.testing.assert_allclose(centre_of_mass(kept), [16, 16], atol=0.05)
    moved = [centre_of_mass(keras.ops.convert_to_numpy(layer(off_centre, training=True))) for _ in range(5)]
    distances = [np.linalg.norm(point - [16, 16]) for point in moved]
    assert max(distances) <= 8 * 1.25 + 0.5 and min(distances) >= 8 * 0.75 - 0.5  # zoom by at most 25%
    assert np.ptp([point[1] for point in moved]) > 1  # turned by different angles


def test_translation_stays_within_its_share_of_the_size():
    layer = RandomAffine(translation=0.1, seed=2)
    shifts = np.array([centre_of_mass(keras.ops.convert_to_numpy(layer(dot_image(), training=True))) - 16
                       for _ in range(20)])
    assert np.abs(shifts).max() <= 0.1 * 33 + 0.05
    assert np.abs(shifts).max() > 1  # it does move


def test_same_seed_same_transforms():
    image = np.random.default_rng(0).uniform(0, 255, (4, 24, 24, 3)).astype("float32")
    first, second = (keras.ops.convert_to_numpy(RandomAffine(0.2, 0.05, 0.1, seed=7)(image, training=True))
                     for _ in range(2))
    np.testing.assert_array_equal(first, second)
    assert not np.allclose(first, image)


def test_a_saved_model_reloads_where_only_the_prediction_code_is_imported(tmp_path):
    inputs = keras.Input((24, 24, 3))
    model = keras.Model(inputs, keras.layers.GlobalAveragePooling2D()(RandomAffine(0.2, 0.05, 0.1)(inputs)))
    model.save(tmp_path / "model.keras")
    # A new process that loads it as `pneumonia predict` and the served model do on Keras (a bundle without its
    # .onnx, test-time views, Grad-CAM: pneumonia.classifier), importing nothing of training.
    code = ("import sys; from pneumonia.models.build import load_model; "
            f"m = load_model({str(tmp_path / 'model.keras')!r}, compile=False); "
            "print(type(m.layers[1]).__name__, m.layers[1].get_config()['zoom'], "
            "any(name.startswith('pneumonia.training') for name in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["RandomAffine", "0.2", "False"]


@pytest.mark.parametrize("policy", ["float32", "mixed_bfloat16"])
def test_works_under_mixed_precision(policy):
    keras.mixed_precision.set_global_policy(policy)
    try:
        layer = RandomAffine(0.2, 0.05, 0.1, seed=3)
        output = layer(np.full((2, 16, 16, 3), 100, "float32"), training=True)
        assert output.shape == (2, 16, 16, 3)
    finally:
        keras.mixed_precision.set_global_policy("float32")


def test_keras_does_not_xla_compile_a_model_with_it():
    """On a GPU Keras compiles with XLA when every layer allows it; the transform's op has no XLA kernel."""
    from keras.src.trainers.trainer import model_supports_jit

    inputs = keras.Input((24, 24, 3))
    assert model_supports_jit(keras.Model(inputs, keras.layers.Conv2D(2, 3)(inputs)))
    assert not model_supports_jit(keras.Model(inputs, keras.layers.Conv2D(2, 3)(RandomAffine(0.1)(inputs))))


def test_test_time_augmentation_averages_fixed_views_and_is_the_model_for_one_view():
    """evaluate.tta_views: the mean of the model's outputs over fixed views of each image, the same at every
    call; one view is the model itself."""
    from pneumonia.models.augmentation import TEST_TIME_VIEWS, FixedAffine, with_test_time_augmentation

    inputs = keras.Input((32, 32, 3))
    model = keras.Model(inputs, keras.layers.Dense(1, activation="sigmoid")(keras.layers.Flatten()(inputs / 255)))
    images = np.random.default_rng(0).integers(0, 256, (5, 32, 32, 3)).astype("uint8")
    assert with_test_time_augmentation(model, 1) is model
    for views in (3, 9):
        predictor = with_test_time_augmentation(model, views)
        found = predictor.predict_on_batch(images)
        assert found.shape == (5, 1)
        np.testing.assert_array_equal(predictor.predict_on_batch(images), found)
        expected = np.mean([model.predict_on_batch(FixedAffine(*view)(images.astype("float32")))
                            for view in TEST_TIME_VIEWS[views]], axis=0)
        np.testing.assert_allclose(found, expected, rtol=1e-6)
        assert not np.allclose(found, model.predict_on_batch(images))  # the views are not the image
    np.testing.assert_array_equal(np.asarray(FixedAffine()(images.astype("float32"))), images)  # the identity


def mixup_batches(seed: int, labels: list, class_weight=None, cut: bool = False,
                  size: int = 8) -> tuple[list[tuple[np.ndarray, ...]], np.ndarray]:
    import tensorflow as tf

    from pneumonia.data.dataset import mixed_up

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (3, 4, size, size, 3), dtype=np.uint8)  # three batches of four
    label_batches = np.tile(np.array(labels, "float32")[None], (3, 1, 1))
    batches = tf.data.Dataset.from_tensor_slices((images, label_batches))
    return [tuple(map(np.asarray, batch)) for batch in mixed_up(batches, 0.4, seed, class_weight, cut)], images


@pytest.mark.parametrize("labels", [[[0.0], [1.0], [1.0], [1.0]],  # sigmoid
                                    [[1.0, 0.0], [0.0, 1.0], [0.0, 1.0], [0.0, 1.0]]])  # softmax, one-hot
def test_mixup_blends_each_image_its_label_and_its_class_weight_by_one_share(labels):
    mixed, images = mixup_batches(7, labels, {0: 2.0, 1: 0.5})
    pneumonia, weights = np.array(labels)[:, -1], np.array([2.0, 0.5, 0.5, 0.5])
    shares = []
    for (image, label, weight), original in zip(mixed, images, strict=True):
        # label = s y + (1 - s) y_mirrored: the NORMAL image's pair (0 and 3) gives its share directly
        share = 1 - label[[0, 3], -1] if label.shape[-1] == 1 else label[[0, 3], 0]
        share = np.array([share[0], 0.0, 0.0, 1 - share[1]])  # pairs 1 and 2 are both PNEUMONIA: no share to read
        for i in (0, 3):
            expected = share[i] * original[i] + (1 - share[i]) * original[3 - i].astype("float32")
            np.testing.assert_allclose(image[i], expected, rtol=1e-5, atol=1e-3)
            np.testing.assert_allclose(weight[i], share[i] * weights[i] + (1 - share[i]) * weights[3 - i], rtol=1e-5)
            np.testing.assert_allclose(label[i, -1], share[i] * pneumonia[i] + (1 - share[i]) * pneumonia[3 - i],
                                       rtol=1e-5)
        np.testing.assert_allclose(weight[1:3], 0.5)  # PNEUMONIA with PNEUMONIA: its weight
        assert ((0 <= image) & (image <= 255)).all() and image.dtype == np.float32
        shares.append(share[0])
    assert len(set(np.round(shares, 6))) == 3 and all(0 < s < 1 for s in shares)  # a new draw each batch


def test_cutmix_pastes_a_box_of_the_mirrored_image_and_mixes_labels_and_weights_by_its_area():
    labels = [[0.0], [1.0], [1.0], [1.0]]
    mixed, images = mixup_batches(7, labels, {0: 2.0, 1: 0.5}, cut=True, size=16)
    weights, boxes = np.array([2.0, 0.5, 0.5, 0.5]), set()
    for (image, label, weight), original in zip(mixed, images, strict=True):
        assert image.dtype == np.float32
        for i in range(4):
            pasted = np.all(image[i] == original[3 - i], axis=-1) & np.any(original[i] != original[3 - i], axis=-1)
            rows, columns = np.nonzero(pasted)
            # one rectangle: every pixel inside it from the mirrored image, every pixel outside from its own
            inside = np.zeros((16, 16), bool)
            if rows.size:
                inside[rows.min():rows.max() + 1, columns.min():columns.max() + 1] = True
                boxes.add((rows.min(), rows.max(), columns.min(), columns.max()))
            np.testing.assert_array_equal(image[i][inside], original[3 - i][inside])
            np.testing.assert_array_equal(image[i][~inside], original[i][~inside])
            share = 1 - inside.mean()  # of its own image left: its label's and weight's share
            np.testing.assert_allclose(label[i, 0], share * labels[i][0] + (1 - share) * labels[3 - i][0], atol=1e-6)
            np.testing.assert_allclose(weight[i], share * weights[i] + (1 - share) * weights[3 - i], rtol=1e-5)
    assert len(boxes) > 3  # boxes of other sizes and places, image by image and batch by batch


def test_mixup_and_cutmix_together_are_refused_naming_both():
    from pneumonia.config import parse_params
    from pneumonia.errors import PipelineError

    with pytest.raises(PipelineError, match="train.augment.mixup = 0.2 with train.augment.cutmix = 1.0"):
        parse_params({"train": {"augment": {"mixup": 0.2, "cutmix": 1.0}}})


def test_mixup_draws_depend_on_the_seed_only():
    labels = [[0.0], [1.0], [0.0], [1.0]]
    first, _ = mixup_batches(7, labels)
    again, _ = mixup_batches(7, labels)
    other, _ = mixup_batches(8, labels)
    for a, b in zip(first, again, strict=True):
        np.testing.assert_array_equal(a[0], b[0])
    assert not np.allclose(first[0][0], other[0][0])
    np.testing.assert_allclose(first[0][2], 1.0)  # no class weights: every weight 1


def test_gamma_bends_each_images_gray_levels_within_its_range_and_keeps_their_order():
    from pneumonia.models.augmentation import RandomGamma

    levels = np.tile(np.linspace(1, 254, 64, dtype="float32").reshape(1, 8, 8, 1), (16, 1, 1, 1))
    np.testing.assert_array_equal(np.asarray(RandomGamma(0.3)(levels, training=False)), levels)
    bent = keras.ops.convert_to_numpy(RandomGamma(0.3, seed=4)(levels, training=True))
    exponents = np.log(bent / 255) / np.log(levels / 255)  # one exponent per image, the same for all its pixels
    np.testing.assert_allclose(exponents, np.broadcast_to(exponents[:, :1, :1, :], exponents.shape), rtol=1e-3)
    assert exponents.min() >= 1 / 1.3 - 1e-3 and exponents.max() <= 1.3 + 1e-3
    assert np.ptp(exponents[:, 0, 0, 0]) > 0.1  # drawn per image
    assert (np.diff(bent.reshape(16, -1), axis=1) > 0).all()  # darker stays darker


def test_acquisition_augmentations_change_images_only_while_training_and_reload(tmp_path):
    """train.augment.gamma, sharpness, noise and rand_augment: layers of the saved model, the identity when
    predicting."""
    from pneumonia.config import AugmentConfig
    from pneumonia.models.augmentation import augment
    from pneumonia.models.build import load_model

    config = AugmentConfig(zoom=0, rotation=0, translation=0, contrast=0, gamma=0.3, sharpness=0.3, noise=0.02,
                           rand_augment=2)
    inputs = keras.Input((24, 24, 3))
    model = keras.Model(inputs, augment(config, inputs))
    assert [layer.name for layer in model.layers[1:]] == ["random_gamma", "random_sharpness", "random_noise",
                                                          "rand_augment"]
    images = np.random.default_rng(0).uniform(0, 255, (4, 24, 24, 3)).astype("float32")
    np.testing.assert_array_equal(model.predict_on_batch(images), images)
    changed = keras.ops.convert_to_numpy(model(images, training=True))
    assert np.abs(changed - images).mean() > 2
    model.save(tmp_path / "augmented.keras")
    np.testing.assert_array_equal(load_model(tmp_path / "augmented.keras", compile=False).predict_on_batch(images),
                                  images)

    # and the bundle's ONNX export (engines.onnx_model) of a model with them predicts as the model
    import onnxruntime

    from pneumonia import engines
    from pneumonia.config import ModelConfig
    from pneumonia.models.build import build_model

    network = build_model(ModelConfig(crop=0), 32, config)
    images = np.random.default_rng(1).uniform(0, 255, (4, 32, 32, 3)).astype("float32")
    [exported, _] = onnxruntime.InferenceSession(engines.onnx_model(network)).run(None, {engines.INPUT_NAME: images})
    np.testing.assert_allclose(exported, network.predict_on_batch(images), atol=1e-5)
