"""Every model of the registry, the output layers, augmentation, weights files and the fine-tuning
strategies, at the smallest input each model takes (weights=None: no download, fast)."""

import copy
import itertools
import shlex

import keras
import numpy as np
import pytest
import yaml

from conftest import REPO
from pneumonia.architectures import BACKBONES, MODEL_NAMES, min_image_size
from pneumonia.config import AugmentConfig, ModelConfig, Params, parse_params
from pneumonia.errors import PipelineError
from pneumonia.evaluation.predictions import pneumonia_probability
from pneumonia.models import backbones
from pneumonia.models.build import NO_AUGMENTATION, all_layers, build_model, in_float32, load_model
from pneumonia.models.fine_tuning import backbone_of, set_trainable

AUGMENT_ALL = AugmentConfig(flip="horizontal", zoom=0.1, rotation=0.05, translation=0.1, contrast=0.2)


def tiny_images(size: int, count: int = 4) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    return rng.uniform(0, 255, (count, size, size, 3)).astype("float32"), np.array([[0], [1]] * (count // 2), "float32")


def test_registry_names_the_nine_models_of_the_seed_projects():
    assert set(MODEL_NAMES) == {"custom_cnn", "xception", "resnet50v2", "densenet121", "densenet169",
                                "densenet201", "efficientnetb0", "mobilenetv2", "inceptionv3"}
    # The minimums keras.applications enforces (min_size=...): only these two need more than 32 px.
    assert {name: min_image_size(name) for name in MODEL_NAMES if min_image_size(name) > 32} == {
        "xception": 71, "inceptionv3": 75}


@pytest.mark.slow
@pytest.mark.parametrize("name", MODEL_NAMES)
def test_every_model_trains_a_step_and_reloads_with_the_same_predictions(name, tmp_path):
    size = min_image_size(name)
    # Two variants on the side, without adding builds: softmax on one backbone, augmentation on another.
    config = ModelConfig(crop=0, name=name, output="softmax" if name == "densenet121" else "sigmoid", head_units=8)
    model = build_model(config, size, AUGMENT_ALL if name == "mobilenetv2" else NO_AUGMENTATION)
    images, labels = tiny_images(size)
    if config.output == "softmax":
        labels = keras.utils.to_categorical(labels[:, 0], 2)
    # Eager: tracing (and XLA-compiling) a training step of the big backbones takes ten times longer.
    model.compile(optimizer="adam",
                  loss="categorical_crossentropy" if config.output == "softmax" else "binary_crossentropy",
                  run_eagerly=True)
    before = [w.copy() for w in model.get_weights()]
    model.train_on_batch(images, labels)
    assert any(not np.array_equal(a, b) for a, b in zip(before, model.get_weights())), "the step changed nothing"

    expected = keras.ops.convert_to_numpy(model(images, training=False))
    assert expected.shape == (4, 2 if config.output == "softmax" else 1)
    model.save(tmp_path / "model.keras")
    reloaded = keras.models.load_model(tmp_path / "model.keras")
    # Same outputs after reloading, and augmentation (when present) is off outside training.
    np.testing.assert_allclose(keras.ops.convert_to_numpy(reloaded(images, training=False)), expected,
                               rtol=1e-5, atol=1e-6)
    probabilities = pneumonia_probability(expected)
    assert probabilities.shape == (4,) and ((0 <= probabilities) & (probabilities <= 1)).all()


def test_a_backbone_from_scratch_gets_batch_norm_statistics_that_follow_its_training(tmp_path):
    """weights none: every batch norm of the backbone at momentum 0.9 (the application's 0.999 left MobileNetV2's
    moving statistics at their start for epochs: one probability for every image), kept through a save;
    pretrained weights (here a file of them) keep the application's own."""
    def momenta(model) -> set[float]:
        return {layer.momentum for layer in backbone_of(model).layers
                if isinstance(layer, keras.layers.BatchNormalization)}

    config = ModelConfig(crop=0, name="mobilenetv2", weights="none")
    scratch = build_model(config, 32)
    assert momenta(scratch) == {backbones.FROM_SCRATCH_BN_MOMENTUM}
    scratch.save(tmp_path / "scratch.keras")
    assert momenta(keras.models.load_model(tmp_path / "scratch.keras")) == {backbones.FROM_SCRATCH_BN_MOMENTUM}
    backbone_of(scratch).save_weights(tmp_path / "backbone.weights.h5")
    pretrained = build_model(config.model_copy(update={"weights": str(tmp_path / "backbone.weights.h5")}), 32)
    assert momenta(pretrained) == {0.999}  # keras.applications.MobileNetV2's


def test_images_below_a_models_minimum_are_refused_at_validation():
    with pytest.raises(PipelineError, match=r"data.image_size = 64 is below the 75px minimum of model 'inceptionv3'"):
        parse_params({"data": {"image_size": 64}, "model": {"name": "inceptionv3", "crop": 0}})
    uncropped = {"name": "inceptionv3", "crop": 0}
    assert parse_params({"data": {"image_size": 75}, "model": uncropped}).model.name == "inceptionv3"


@pytest.mark.parametrize("model, train, message", [
    ({"name": "custom_cnn"}, {"fine_tune": "frozen"}, "custom_cnn has no pretrained backbone"),
    ({"name": "custom_cnn"}, {"warmup_epochs": 2}, "custom_cnn has no pretrained backbone"),
    ({"name": "resnet50v2", "weights": "none"}, {"fine_tune": "partial"}, "trains resnet50v2 from scratch"),
    ({"name": "resnet50v2", "weights": "imagenet"}, {"fine_tune": "frozen", "warmup_epochs": 1}, "use 'partial'"),
    ({"name": "resnet50v2", "weights": "imagenet"}, {"fine_tune": "full", "warmup_epochs": 15, "epochs": 15},
     "leaves no fine-tuning"),
    ({"name": "resnet50v2"}, {"lr_schedule": "step"}, "train.lr_schedule = 'step'"),
    ({"name": "resnet50v2"}, {"augment": {"zoom": 1.5}}, "train.augment.zoom = 1.5"),
    ({"name": "resnet50v2", "output": "relu"}, {}, "model.output = 'relu'"),
])
def test_meaningless_strategies_are_refused_with_a_clear_message(model, train, message):
    with pytest.raises(PipelineError, match=message):
        parse_params({"model": model, "train": train})


def test_strategies_of_pretrained_backbones_are_accepted():
    params = parse_params({"model": {"name": "resnet50v2", "weights": "imagenet"},
                           "train": {"fine_tune": "partial", "warmup_epochs": 3, "lr_schedule": "cosine"}})
    assert isinstance(params, Params) and params.train.fine_tune_layers == 30


def trainable_layers(layer_list) -> int:
    return sum(layer.trainable for layer in layer_list)


def test_each_strategy_leaves_exactly_the_expected_layers_trainable():
    model = build_model(ModelConfig(crop=0, name="mobilenetv2", head_units=8), 32)
    backbone = backbone_of(model)
    total = len(backbone.layers)
    batch_norm = [isinstance(layer, keras.layers.BatchNormalization) for layer in backbone.layers]
    assert total == 154 and sum(batch_norm) == 52 and sum(batch_norm[-10:]) == 4  # MobileNetV2's layout
    head_weights = 4  # head_dense and the output layer: kernel and bias each

    set_trainable(model, "frozen", 10, pretrained=True)
    assert trainable_layers(backbone.layers) == 0
    assert len(model.trainable_weights) == head_weights

    set_trainable(model, "partial", 10, pretrained=True)
    assert trainable_layers(backbone.layers) == 10 - 4  # the last ten, less their batch norms
    assert [layer.trainable for layer in backbone.layers[-10:]] == [not bn for bn in batch_norm[-10:]]
    assert len(model.trainable_weights) == head_weights + 3  # kernels of block_16_depthwise, _project, Conv_1

    set_trainable(model, "full", 10, pretrained=True)
    assert trainable_layers(backbone.layers) == total - 52

    set_trainable(model, "full", 10, pretrained=False)  # from scratch: batch norm trains too
    assert trainable_layers(backbone.layers) == total

    set_trainable(model, "partial", 1, pretrained=True)  # from fully trainable back to one layer
    assert trainable_layers(backbone.layers) == 1

    with pytest.raises(PipelineError, match=f"more than the {total} layers"):
        set_trainable(model, "partial", total + 1, pretrained=True)


def test_custom_cnn_has_no_backbone_and_trains_whole():
    model = build_model(ModelConfig(crop=0, name="custom_cnn"), 32)
    assert backbone_of(model) is None
    set_trainable(model, "frozen", 10, pretrained=False)
    assert trainable_layers(model.layers) == len(model.layers)


def test_equalized_input_ignores_increasing_gray_level_changes_and_exports_to_onnx():
    """input_norm equalize: an image and the same image through an increasing gray-level curve (another
    site's contrast and gamma) give one input to the network; each image alone; unit variance; and the
    histogram (bincount) survives the bundle's ONNX export."""
    import onnxruntime

    from pneumonia import engines
    from pneumonia.models.custom_cnn import HistogramEqualization

    rng = np.random.default_rng(0)
    gray = rng.integers(0, 100, (2, 24, 24, 1)).astype("float32")
    curved = np.round(gray + gray**2 / 100)  # increasing, and no two of 0..99 land on one level
    equalize = HistogramEqualization()
    equalized = np.asarray(equalize(np.repeat(gray, 3, axis=-1)))
    assert equalized.shape == (2, 24, 24, 1)
    np.testing.assert_allclose(np.asarray(equalize(np.repeat(curved, 3, axis=-1))), equalized, atol=1e-6)
    np.testing.assert_allclose(np.asarray(equalize(np.repeat(gray[:1], 3, axis=-1))), equalized[:1], atol=1e-6)
    assert abs(equalized.mean()) < 0.05 and abs(equalized.std() - 1) < 0.05
    assert not np.allclose(equalized, (gray - gray.mean()) / gray.std(), atol=0.05)  # not per_image's

    model = build_model(ModelConfig(crop=0, input_norm="equalize"), 32)
    session = onnxruntime.InferenceSession(engines.onnx_model(model))
    images = rng.integers(0, 256, (3, 32, 32, 3)).astype("float32")
    [exported, _] = session.run(None, {engines.INPUT_NAME: images})
    np.testing.assert_allclose(exported, model.predict(images, verbose=0), atol=1e-5)


def test_a_model_trained_in_mixed_precision_is_predicted_in_float32_and_exports_to_onnx(tmp_path):
    """train.precision mixed_bfloat16 (what `auto` gives a backbone on a CPU with native bfloat16): tf2onnx
    exported such a network as a graph ONNX Runtime refused to load (a Mul of float16 and bfloat16), so
    `pneumonia predict` failed on it. Loaded to predict, the model computes in float32 with the same weights,
    and its ONNX graph loads and agrees with it."""
    import onnxruntime

    from pneumonia import engines

    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    trained = build_model(ModelConfig(crop=0, name="mobilenetv2", weights="none", head_units=8), 32)
    keras.mixed_precision.set_global_policy("float32")
    trained.save(tmp_path / "model.keras")

    loaded = load_model(tmp_path / "model.keras", compile=False)
    assert {layer.dtype_policy.name for layer in all_layers(loaded)} == {"float32"}
    assert all(np.array_equal(a, b) for a, b in zip(loaded.get_weights(), trained.get_weights()))
    images = np.random.default_rng(0).integers(0, 256, (3, 32, 32, 3)).astype("float32")
    expected = loaded.predict(images, verbose=0)
    np.testing.assert_allclose(expected, trained.predict(images, verbose=0), atol=0.02)  # bfloat16's rounding
    [exported, _] = onnxruntime.InferenceSession(engines.onnx_model(loaded)).run(None, {engines.INPUT_NAME: images})
    np.testing.assert_allclose(exported, expected, atol=1e-5)
    assert in_float32(loaded) is loaded  # a float32 model is kept as it is: its file, bit for bit
    # loaded to train on (compile=True: a resumed training), it keeps its precision
    assert load_model(tmp_path / "model.keras").layers[-2].dtype_policy.name == "mixed_bfloat16"


def write_backbone_weights(path, name: str = "mobilenetv2", size: int = 32):
    """A backbone's weights as a file, as an ImageNet no-top download would be (here: random)."""
    spec = BACKBONES[name]
    backbone = backbones.load_backbone(spec, size, None)
    backbone.save_weights(path)
    return backbone


def test_a_weights_file_loads_by_path(tmp_path):
    saved = write_backbone_weights(tmp_path / "backbone.weights.h5")
    model = build_model(ModelConfig(crop=0, name="mobilenetv2", weights=str(tmp_path / "backbone.weights.h5")), 32)
    loaded = backbone_of(model).get_weights()
    assert len(loaded) == len(saved.get_weights()) > 0
    for mine, theirs in zip(loaded, saved.get_weights()):
        np.testing.assert_array_equal(mine, theirs)

    with pytest.raises(PipelineError, match="neither 'imagenet', 'none' nor an existing weights file"):
        build_model(ModelConfig(crop=0, name="mobilenetv2", weights=str(tmp_path / "missing.h5")), 32)


def moving_means(model) -> list[np.ndarray]:
    return [layer.moving_mean.numpy().copy() for layer in backbone_of(model).layers
            if isinstance(layer, keras.layers.BatchNormalization)]


@pytest.mark.parametrize("pretrained", [True, False])
def test_batch_norm_of_a_pretrained_backbone_stays_in_inference_mode_when_unfrozen(pretrained, tmp_path):
    if pretrained:
        write_backbone_weights(tmp_path / "backbone.weights.h5")
    config = ModelConfig(crop=0, name="mobilenetv2",
                         weights=str(tmp_path / "backbone.weights.h5") if pretrained else "none")
    model = build_model(config, 32)
    set_trainable(model, "full", 10, pretrained=pretrained)
    model.compile(optimizer="adam", loss="binary_crossentropy", run_eagerly=True)
    before = moving_means(model)
    kernel_before = backbone_of(model).trainable_weights[0].numpy().copy()
    model.train_on_batch(*tiny_images(32))

    assert not np.array_equal(backbone_of(model).trainable_weights[0].numpy(), kernel_before)  # it did train
    statistics_changed = any(not np.array_equal(a, b) for a, b in zip(before, moving_means(model)))
    # Pretrained: ImageNet statistics kept. From scratch: batch norm learns its statistics as usual.
    assert statistics_changed is not pretrained


def test_imagenet_weights_that_cannot_be_downloaded_say_which_file_goes_where(monkeypatch, tmp_path):
    from keras.src.utils import file_utils

    def offline(*args, **kwargs):
        raise Exception("URL fetch failure: [Errno -3] Temporary failure in name resolution")  # noqa: TRY002 - as Keras

    monkeypatch.setattr(file_utils, "get_file", offline)
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras"))
    with pytest.raises(PipelineError) as error:
        build_model(ModelConfig(crop=0, name="densenet121", weights="imagenet"), 32)
    expected = tmp_path / "keras" / "models" / "densenet121_weights_tf_dim_ordering_tf_kernels_notop.h5"
    assert str(expected) in str(error.value)
    assert "model.weights" in str(error.value)


def test_mobilenetv2_imagenet_file_depends_on_the_image_size():
    assert BACKBONES["mobilenetv2"].imagenet_file_name(160).endswith("_1.0_160_no_top.h5")
    assert BACKBONES["mobilenetv2"].imagenet_file_name(100).endswith("_1.0_224_no_top.h5")


def test_pneumonia_probability_reads_either_output_layer():
    np.testing.assert_allclose(pneumonia_probability(np.array([[0.2], [0.9]])), [0.2, 0.9])
    np.testing.assert_allclose(pneumonia_probability(np.array([[0.8, 0.2], [0.1, 0.9]])), [0.2, 0.9])


def overridden(raw: dict, overrides: dict) -> dict:
    raw = copy.deepcopy(raw)
    for key, value in overrides.items():
        *parents, last = key.split(".")
        section = raw
        for parent in parents:
            section = section[parent]
        assert last in section, f"-S {key}: no such key in params.yaml"
        section[last] = value
    return raw


def recipe_runs(command: str) -> list[dict]:
    """The params overrides of each experiment a `dvc exp run ... -S k=v ...` line queues or runs:
    comma-separated values are DVC's grid (one experiment per combination)."""
    runs = []
    for part in command.split("&&"):
        words = shlex.split(part)
        assert words[:3] == ["dvc", "exp", "run"], part
        axes = [(w.split("=", 1)[0], [yaml.safe_load(v) for v in w.split("=", 1)[1].split(",")])
                for flag, w in zip(words, words[1:]) if flag == "-S"]
        runs += [dict(zip([key for key, _ in axes], values))
                 for values in itertools.product(*[values for _, values in axes])]
    return runs


def test_a_backbone_name_alone_resolves_to_the_pretrained_recipe():
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    assert parse_params(raw).model.weights == "none"  # the default custom_cnn: from scratch
    params = parse_params(overridden(raw, {"model.name": "xception"}))
    assert (params.model.weights, params.train.warmup_epochs, params.train.fine_tune) == ("imagenet", 3, "partial")
    explicit = parse_params(overridden(raw, {"model.name": "xception", "model.weights": "none"}))
    assert (explicit.model.weights, explicit.train.warmup_epochs, explicit.train.fine_tune) == ("none", 0, "full")


def test_each_documented_seed_recipe_validates_and_resolves_as_described():
    readme = (REPO / "docs" / "models.md").read_text()
    block = readme.split("<!-- seed recipes -->")[1].split("<!-- /seed recipes -->")[0]
    commands = [line for line in block.splitlines() if line.startswith("dvc exp run")]
    assert len(commands) == 4
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    resolved = {}
    for number, command in zip(("001", "002", "003", "004"), commands):
        resolved[number] = [parse_params(overridden(raw, overrides)) for overrides in recipe_runs(command)]
    [r001] = resolved["001"]
    assert (r001.model.name, r001.model.weights, r001.train.fine_tune, r001.train.warmup_epochs) == \
        ("resnet50v2", "imagenet", "frozen", 0)
    [r002] = resolved["002"]
    assert (r002.model.name, r002.train.warmup_epochs, r002.train.fine_tune) == ("densenet169", 3, "full")
    assert [(p.model.name, p.model.weights, p.train.fine_tune) for p in resolved["003"]] == [
        ("custom_cnn", "none", "full"), ("mobilenetv2", "imagenet", "frozen"),
        ("mobilenetv2", "imagenet", "partial"), ("mobilenetv2", "imagenet", "full")]
    [r004] = resolved["004"]
    assert (r004.model.name, r004.data.image_size, r004.model.weights, r004.train.fine_tune) == \
        ("xception", 299, "imagenet", "partial")


def test_width_scales_custom_cnns_convolutions_and_is_refused_for_a_backbone():
    """model.width: every convolution's filters x width (16 to 256 at 1), the dense head as it was."""
    def filters(width: float) -> list[int]:
        model = build_model(ModelConfig(crop=0, width=width), 32)
        return [layer.filters for layer in model.layers if isinstance(layer, (keras.layers.Conv2D,
                                                                             keras.layers.SeparableConv2D))]

    assert filters(1) == [16, 16, 32, 32, 64, 64, 128, 128, 256, 256]
    assert filters(1.5) == [24, 24, 48, 48, 96, 96, 192, 192, 384, 384]
    with pytest.raises(PipelineError, match="model.width = 2.0 is for custom_cnn"):
        parse_params({"model": {"name": "xception", "weights": "none", "input_norm": "scale", "width": 2}})


def test_convs_per_block_deepens_custom_cnns_blocks_and_is_refused_for_a_backbone():
    """model.convs_per_block: each of the four blocks after the stem holds that many separable convolutions."""
    def filters(convs: int) -> list[int]:
        model = build_model(ModelConfig(crop=0, convs_per_block=convs), 32)
        return [layer.filters for layer in model.layers if isinstance(layer, keras.layers.SeparableConv2D)]

    assert filters(2) == [32, 32, 64, 64, 128, 128, 256, 256]
    assert filters(3) == [32] * 3 + [64] * 3 + [128] * 3 + [256] * 3
    with pytest.raises(PipelineError, match="model.convs_per_block = 3 is for custom_cnn"):
        parse_params({"model": {"name": "xception", "weights": "none", "input_norm": "scale", "convs_per_block": 3}})


def test_strided_stem_halves_the_resolution_in_its_first_convolution_and_is_refused_for_a_backbone():
    """model.stem: strided gives the next block the input the full-resolution stem gives it (half the resolution,
    16 channels), its first convolution already at stride 2 and no pooling; the rest of the network as it was."""
    def layers_of(stem: str) -> list[tuple[str, tuple]]:
        model = build_model(ModelConfig(crop=0, stem=stem), 64)
        return [(type(layer).__name__, getattr(layer, "strides", None), tuple(layer.output.shape[1:]))
                for layer in model.layers if isinstance(layer, (keras.layers.Conv2D, keras.layers.MaxPool2D))]

    full, strided = layers_of("full_resolution"), layers_of("strided")
    assert full[:3] == [("Conv2D", (1, 1), (64, 64, 16)), ("Conv2D", (1, 1), (64, 64, 16)),
                        ("MaxPooling2D", (2, 2), (32, 32, 16))]
    assert strided[:2] == [("Conv2D", (2, 2), (32, 32, 16)), ("Conv2D", (1, 1), (32, 32, 16))]
    assert strided[2:] == full[3:]
    with pytest.raises(PipelineError, match="model.stem = 'strided' is for custom_cnn"):
        parse_params({"model": {"name": "xception", "weights": "none", "input_norm": "scale", "stem": "strided"}})
