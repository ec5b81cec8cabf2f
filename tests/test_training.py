"""The library training on the tiny synthetic TFRecords: stages, strategies, schedules, output
layers, and what a run records for the comparison."""

import json
import sys
from pathlib import Path

import keras
import mlflow
import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from conftest import REPO, prepare_synthetic, run
from pneumonia.architectures import BACKBONES
from pneumonia.config import parse_params
from pneumonia.errors import PipelineError
from pneumonia.evaluation.predictions import predict_split
from pneumonia.models import backbones
from pneumonia.models.build import NO_AUGMENTATION, build_model
from pneumonia.models.fine_tuning import backbone_of, set_trainable
from pneumonia.training import fit, recipe
from pneumonia.training.callbacks import AtomicModelCheckpoint, make_callbacks


@pytest.fixture(scope="module")
def tracking_store(tmp_path_factory) -> str:
    uri = f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    yield uri
    mlflow.set_tracking_uri(None)


def params_for(tmp_path, model: dict, train: dict):
    return parse_params({"data": {"image_size": 48}, "model": {"crop": 0, **model},
                         "train": {"epochs": 1, "batch_size": 8, "augment": NO_AUGMENTATION.model_dump(), **train}})


def fitted(params, synthetic_data, tmp_path) -> tuple[fit.TrainingResult, str]:
    with mlflow.start_run() as run:
        result = fit.train(params.model, params.train, synthetic_data / "data/tfrecords", {0: 1.0, 1: 1.0},
                                tmp_path / "model.keras")
    return result, run.info.run_id


@pytest.mark.slow
def test_softmax_head_with_cosine_schedule_and_augmentation(tracking_store, synthetic_data, tmp_path, capsys):
    params = params_for(tmp_path, {"name": "custom_cnn", "output": "softmax"}, {
        "lr_schedule": "cosine",
        "augment": {"flip": "horizontal", "zoom": 0.1, "rotation": 0.05, "translation": 0.1, "contrast": 0.2,
                    "mixup": 0.2}})
    result, run_id = fitted(params, synthetic_data, tmp_path)

    assert {"loss", "accuracy", "auc", "precision", "recall", "val_auc", "val_loss"} <= result.history.keys()
    metrics = result.metrics()
    assert metrics["epochs_trained"] == 1 and metrics["trainable_params"] <= metrics["total_params"]
    assert metrics["peak_memory_mb"] > 100  # TensorFlow alone takes more than this
    assert "gpu_peak_memory_mb" not in metrics  # the test machines have no GPU
    model = keras.models.load_model(tmp_path / "model.keras")
    assert model.output_shape == (None, 2)
    assert {"random_flip", "random_affine", "random_contrast"} <= {
        layer.name for layer in model.layers}
    test = predict_split(model, synthetic_data / "data/tfrecords", "test", 8)
    assert (test.probabilities.shape == test.labels.shape
            and ((0 <= test.probabilities) & (test.probabilities <= 1)).all())
    assert "predicting test: 100%" in capsys.readouterr().err  # evaluate's predictions show progress
    assert [p.step for p in MlflowClient(tracking_store).get_metric_history(run_id, "val_auc")] == [1]


@pytest.mark.slow
def test_warmup_then_partial_fine_tuning_keeps_pretrained_batch_norm_statistics(tracking_store, synthetic_data,
                                                                                 tmp_path):
    weights = tmp_path / "backbone.weights.h5"
    pretrained = backbones.load_backbone(BACKBONES["mobilenetv2"], 48, None)
    pretrained.save_weights(weights)
    params = params_for(tmp_path, {"name": "mobilenetv2", "weights": str(weights), "head_units": 8}, {
        "epochs": 2, "warmup_epochs": 1, "fine_tune": "partial", "fine_tune_layers": 6,
        "fine_tune_learning_rate": 1e-4, "lr_schedule": "plateau", "early_stopping_patience": 3})
    assert [(s.name, s.epochs, s.learning_rate, s.fine_tune) for s in recipe.stages(params.train)] == [
        ("warm-up", 1, 1e-3, "frozen"), ("fine-tune", 1, 1e-4, "partial")]
    result, run_id = fitted(params, synthetic_data, tmp_path)

    assert len(result.history["val_auc"]) == 2  # one epoch per stage, numbered on
    assert [p.step for p in MlflowClient(tracking_store).get_metric_history(run_id, "val_auc")] == [1, 2]
    assert result.history["learning_rate"][1] == pytest.approx(1e-4)  # the second stage's rate
    # The last stage trained the head and the last 6 layers of the backbone (less its batch norms).
    expected = build_model(params.model, 48)
    set_trainable(expected, "partial", 6, pretrained=True)
    assert result.trainable_params == sum(int(np.prod(w.shape)) for w in expected.trainable_weights)
    assert 0 < result.trainable_params < result.total_params
    # Batch norm ran in inference mode throughout: the pretrained statistics are untouched.
    saved = keras.models.load_model(tmp_path / "model.keras")
    for layer in backbone_of(saved).layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            np.testing.assert_array_equal(layer.moving_mean.numpy(),
                                          pretrained.get_layer(layer.name).moving_mean.numpy())


def test_learning_rate_schedules_and_callbacks(tmp_path):
    def made(schedule: str, epochs: int = 4):
        params = params_for(tmp_path, {"name": "custom_cnn"}, {"lr_schedule": schedule, "epochs": epochs})
        [stage] = recipe.stages(params.train)
        rate = recipe.learning_rate(params.train, stage, steps_per_epoch=10)
        callbacks = {type(c).__name__ for c in make_callbacks(params.train, str(tmp_path / "m.keras"))}
        return rate, callbacks

    rate, callbacks = made("exponential")
    assert float(rate(10)) == pytest.approx(1e-3 * 0.9) and "ReduceLROnPlateau" not in callbacks
    rate, callbacks = made("cosine")
    assert float(rate(0)) == pytest.approx(1e-3) and float(rate(40)) == pytest.approx(0, abs=1e-9)
    rate, callbacks = made("cosine_restarts", epochs=6)  # one restart: 20 steps, then 40 from the top again
    assert [float(rate(step)) for step in (0, 20)] == pytest.approx([1e-3, 1e-3])
    assert float(rate(19)) < 1e-5 and float(rate(59)) < 1e-5  # each cycle ends near 0 ...
    assert float(rate(10)) == pytest.approx(0.5e-3) and float(rate(40)) == pytest.approx(0.5e-3)  # ... halfway at half
    rate, callbacks = made("plateau")
    assert rate == 1e-3 and "ReduceLROnPlateau" in callbacks


def test_softmax_metrics_equal_the_sigmoid_ones_on_the_same_probabilities():
    labels = np.array([0, 1, 1, 0, 1, 0, 1, 1], "float32")
    probability = np.array([0.1, 0.8, 0.4, 0.6, 0.9, 0.3, 0.7, 0.2], "float32")

    def results(output: str, y_true, y_pred) -> dict[str, float]:
        found = {}
        for metric in recipe.keras_metrics(output):
            metric.update_state(y_true, y_pred)
            found[metric.name] = float(metric.result())
        return found

    sigmoid = results("sigmoid", labels[:, None], probability[:, None])
    softmax = results("softmax", keras.utils.to_categorical(labels, 2), np.stack([1 - probability, probability], 1))
    assert sigmoid.keys() == softmax.keys() == {"accuracy", "precision", "recall", "auc"}
    for name in sigmoid:
        assert softmax[name] == pytest.approx(sigmoid[name], abs=1e-3), name
    assert sigmoid["auc"] == pytest.approx(0.8, abs=1e-2)  # 15 (positive, negative) pairs, 12 ranked right


def test_metrics_are_what_the_train_stage_logs_and_its_headline_what_it_writes(tmp_path):
    result = fit.TrainingResult(history={"val_auc": [0.5, 0.7], "loss": [0.9, 0.8]}, best_epoch=1,
                                      seconds=12.34, total_params=100, trainable_params=40,
                                      peak_memory={"peak_memory_mb": 812.5})
    assert json.loads(json.dumps(result.metrics())) == {  # the MLflow run's metrics
        "best_val_auc": 0.7, "best_loss": 0.8, "best_epoch": 2, "epochs_trained": 2, "train_seconds": 12.3,
        "total_params": 100, "trainable_params": 40, "peak_memory_mb": 812.5}
    assert json.loads(json.dumps(result.headline())) == {  # metrics/train.json: columns of `dvc exp show`
        "best_epoch": 2, "epochs_trained": 2, "train_seconds": 12.3}
    assert result.history_table() == (["epoch", "loss", "val_auc"], [[1, 0.9, 0.5], [2, 0.8, 0.7]])


# Trainings, each of its seeds in turn, in a process of its own: what makes two processes part (thread
# scheduling, graph rewrites) does not show within one process, so the runs compared for equality are each
# the first of their process.
TRAIN_IN_A_PROCESS = """
import json, sys
from pathlib import Path
import keras
from pneumonia.training import fit
from pneumonia.config import parse_params
from pneumonia.errors import PipelineError
from pneumonia.evaluation.predictions import predict_split

data, out = Path(sys.argv[1]) / "data/tfrecords", Path(sys.argv[2])
for seed in map(int, sys.argv[3:]):
    params = parse_params({"model": {"name": "custom_cnn", "crop": 0},
                           "train": {"epochs": 2, "batch_size": 32, "seed": seed}})
    result = fit.train(params.model, params.train, data, {0: 1.0, 1: 1.0}, out / f"{seed}.keras")
    probabilities = predict_split(keras.models.load_model(out / f"{seed}.keras"), data, "val", 8)
    json.dump({"history": result.history, "val": probabilities.probabilities.tolist()},
              (out / f"{seed}.json").open("w"))
"""


@pytest.fixture(scope="module")
def synthetic_data_default_size(tmp_path_factory) -> Path:
    """Synthetic TFRecords at the default image size (128 px) and batch 32: there two processes part when
    Grappler is left on (seen: history and predictions differ), while at 48 px they agreed even when
    Grappler's rewrites made trainings on the real data part (see pneumonia.training.fit.seed_everything)."""
    size = parse_params({}).data.image_size
    return prepare_synthetic(tmp_path_factory.mktemp("synthetic"), patients_per_class=80, images_per_patient=2,
                             raw_size=size, image_size=size, images_per_shard=32)


@pytest.mark.e2e
def test_same_seed_gives_the_same_model_and_another_seed_does_not(synthetic_data_default_size, tmp_path):
    """train.seed + train.deterministic: shuffling, augmentation, dropout and initialisation repeat exactly,
    from one process to the next (on CPU; docs/results.md "Reproducibility" says what holds on accelerators)."""
    def trained(name: str, *seeds: int) -> list[dict]:
        (tmp_path / name).mkdir()
        run([sys.executable, "-c", TRAIN_IN_A_PROCESS, str(synthetic_data_default_size), str(tmp_path / name),
             *map(str, seeds)], REPO)
        return [json.loads((tmp_path / name / f"{seed}.json").read_text()) for seed in seeds]

    [first], [again, other] = trained("first", 7), trained("again", 7, 8)
    assert again["history"] == first["history"]
    assert again["val"] == first["val"]  # bit for bit: JSON keeps every float exactly
    assert other["val"] != first["val"]


def test_the_averaging_momentum_spans_at_most_about_an_epoch():
    """ema_momentum auto: 0.99 on the full sample's 113-step epochs (as measured on the external set), over
    about one epoch on the compact sample's 23; a number is used as given; out of (0, 1) is refused."""
    config = parse_params({}).train
    assert (config.weight_averaging, config.ema_momentum) == ("ema", "auto")
    assert recipe.averaging_momentum(config, 113) == 0.99
    assert recipe.averaging_momentum(config, 23) == pytest.approx(1 - 1 / 23)
    assert recipe.averaging_momentum(config.model_copy(update={"ema_momentum": 0.999}), 23) == 0.999
    for wrong in (1.0, 0, "fast"):
        with pytest.raises(PipelineError, match="train.ema_momentum"):
            parse_params({"train": {"ema_momentum": wrong}})


def test_weight_decay_shrinks_the_kernels_and_leaves_biases_and_batch_norm_alone():
    """train.weight_decay: one step with zero gradients multiplies each kernel by 1 - rate x decay (decoupled,
    AdamW), and leaves biases, batch-norm scales and offsets as they were; 0 (the default) decays nothing."""
    model = build_model(parse_params({}).model.model_copy(update={"crop": 0}), 32)
    for decay, kernel_factor in ((0.05, 1 - 0.01 * 0.05), (0, 1.0)):
        config = parse_params({"train": {"weight_decay": decay, "weight_averaging": "none"}}).train
        optimizer = recipe.optimizer(config, 0.01, steps_per_epoch=10)
        before = [np.array(variable) for variable in model.trainable_variables]
        optimizer.apply([keras.ops.zeros_like(variable) for variable in model.trainable_variables],
                        model.trainable_variables)
        after = {variable.path: (np.array(variable), old) for variable, old in zip(model.trainable_variables, before)}
        kernels = [path for path in after if path.endswith("kernel")]
        others = [path for path in after if not path.endswith("kernel")]
        assert kernels and {path.rsplit("/", 1)[1] for path in others} >= {"bias", "gamma", "beta"}
        for path, (new, old) in after.items():
            factor = kernel_factor if path in kernels else 1.0
            np.testing.assert_allclose(new, old * factor, rtol=1e-6, atol=1e-9, err_msg=path)


def test_min_epochs_keeps_no_earlier_epoch_and_stops_no_earlier(tmp_path, monkeypatch):
    """train.min_epochs: an early epoch that wins by chance on a small validation split (the compact sample's
    seed 42 kept its epoch 7 of 15) is neither checkpointed nor counted by early stopping. The callbacks of a
    training, driven with a scripted validation history: the first epoch scores best."""
    history = [0.97, 0.90, 0.91, 0.93, 0.92, 0.92, 0.92, 0.92]
    saved = []
    should_save = AtomicModelCheckpoint._should_save_model

    def spied(self, epoch, batch, logs, filepath) -> bool:
        if decided := should_save(self, epoch, batch, logs, filepath):
            saved.append(epoch + 1)
        return decided

    monkeypatch.setattr(AtomicModelCheckpoint, "_should_save_model", spied)

    def run(min_epochs: int) -> tuple[list[int], int, int]:
        config = parse_params({"train": {"epochs": 8, "early_stopping_patience": 2, "weight_averaging": "none",
                                         "min_epochs": min_epochs}}).train
        model = keras.Sequential([keras.Input((1,)), keras.layers.Dense(1)])
        callbacks = keras.callbacks.CallbackList(make_callbacks(config, str(tmp_path / f"{min_epochs}.keras")),
                                                 model=model)
        saved.clear()
        model.stop_training = False  # as fit sets it
        callbacks.on_train_begin()
        for epoch, value in enumerate(history, start=1):
            callbacks.on_epoch_end(epoch - 1, {"val_auc": value})
            if model.stop_training:
                break
        return list(saved), epoch, fit.kept_epoch(history[:epoch], config) + 1

    assert run(1) == ([1], 3, 1)  # epoch 1 kept; stopped after 2 epochs without a better one
    # epochs 1 and 2 ignored: 0.91 saved, then 0.93, kept; stopped after the 2 epochs of patience that follow it
    assert run(3) == ([3, 4], 6, 4)
    assert run(20) == ([8], 8, 8)  # more than train.epochs: the last epoch is kept


@pytest.mark.slow
def test_weight_averaging_validates_checkpoints_and_stops_on_the_averaged_weights(synthetic_data, tmp_path,
                                                                                 monkeypatch):
    """train.weight_averaging: ema. The averaged weights are what validation scores, the checkpoint saves and
    the model file holds; with a momentum of 0 the average is the live weights, and the run is the plain one."""
    def trained(name: str, **train) -> tuple[fit.TrainingResult, keras.Model]:
        momentum = train.pop("ema_momentum", None)
        params = params_for(tmp_path, {"name": "custom_cnn"}, {"epochs": 3, "monitor": "val_loss", **train})
        config = params.train if momentum is None else params.train.model_copy(update={"ema_momentum": momentum})
        result = fit.train(params.model, config, synthetic_data / "data/tfrecords", {0: 1.0, 1: 1.0},
                           tmp_path / f"{name}.keras")
        return result, keras.models.load_model(tmp_path / f"{name}.keras")

    built, make = [], recipe.optimizer  # each training's optimizer: the model file holds none (predicting only)

    def recorded(*args):
        built.append(make(*args))
        return built[-1]

    monkeypatch.setattr(recipe, "optimizer", recorded)
    plain, plain_model = trained("plain", weight_averaging="none")
    averaged, averaged_model = trained("ema", weight_averaging="ema", ema_momentum=0.9)
    _, unaveraged_model = trained("ema-0", weight_averaging="ema", ema_momentum=0.0)

    assert [optimizer.use_ema for optimizer in built] == [False, True, True]
    for found, expected in zip(unaveraged_model.get_weights(), plain_model.get_weights()):
        np.testing.assert_array_equal(found, expected)  # the swaps change nothing but which weights are seen
    assert any(not np.array_equal(found, expected)
               for found, expected in zip(averaged_model.get_weights(), plain_model.get_weights()))
    # The recorded validation loss of the best epoch is the saved (averaged) model's on the validation split.
    validation = fit.labelled_for("sigmoid", fit.dataset.evaluation_batches(synthetic_data / "data/tfrecords",
                                                                           "val", 8))
    averaged_model.compile(loss="binary_crossentropy")  # the model file holds no optimizer and no loss: predicting only
    saved_loss = averaged_model.evaluate(validation, verbose=0, return_dict=True)["loss"]
    assert saved_loss == pytest.approx(averaged.history["val_loss"][averaged.best_epoch], rel=1e-4)
    assert averaged.history["val_loss"] != plain.history["val_loss"]


def test_oversampling_draws_both_classes_alike_from_an_imbalanced_training_split(synthetic_data, tmp_path,
                                                                                 monkeypatch):
    """train.class_balance: oversample. A training split with one NORMAL image in four: its batches hold
    both classes about alike, each NORMAL image comes round more often, and the same seed repeats them."""
    from pneumonia.config import TFRecordsConfig
    from pneumonia.data import dataset
    from pneumonia.data.manifest import read_manifest
    from pneumonia.data.tfrecords import write_records

    monkeypatch.chdir(synthetic_data)  # manifest paths are relative to the project
    records = read_manifest(synthetic_data / "data/manifests/train.csv")
    normal = [record for record in records if record.label == 0]
    pneumonia = [record for record in records if record.label == 1]
    kept = normal[: len(pneumonia) // 3] + pneumonia
    write_records({"train": kept}, tmp_path, 48, TFRecordsConfig(images_per_shard=8, workers=1))

    def labels(oversample: bool, seed: int = 3) -> np.ndarray:
        batches = dataset.training_batches(tmp_path, 8, seed, oversample).take(60)
        return np.concatenate([batch_labels.ravel() for _, batch_labels in batches.as_numpy_iterator()])

    plain, balanced = labels(False), labels(True)
    assert abs(plain.mean() - len(pneumonia) / len(kept)) < 0.05  # as in the data: 3 of 4 pneumonia
    assert abs(balanced.mean() - 0.5) < 0.07  # 480 draws at 1 in 2: sd 0.023
    np.testing.assert_array_equal(labels(True), balanced)
    assert not np.array_equal(labels(True, seed=4), balanced)
