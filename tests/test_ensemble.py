"""train.ensemble_members: N members trained with seeds train.seed + k, saved as one model whose output is the
mean of theirs; its member 0 is the single model of the same params; a resumed ensemble keeps the members it
finished; Grad-CAM and batch-norm adaptation handle it. (evaluate, predict and serving alike:
tests/test_serving.py::test_test_time_augmentation_gives_evaluate_predict_and_the_served_model_the_same_probabilities.)"""

import json

import keras
import numpy as np
import pytest

from pneumonia import adaptation
from pneumonia.config import parse_params
from pneumonia.errors import PipelineError
from pneumonia.evaluation import gradcam
from pneumonia.evaluation.predictions import images_at
from pneumonia.models.build import NO_AUGMENTATION, ensemble_of, load_model, members_of
from pneumonia.training import fit
from pneumonia.training.backup import TrainingBackup

SIZE = 48  # the synthetic TFRecords' image size


def params_with(members: int, **train):
    return parse_params({"data": {"image_size": SIZE}, "model": {"crop": 0.08},
                         "train": {"epochs": 1, "batch_size": 8, "augment": NO_AUGMENTATION.model_dump(),
                                   "ensemble_members": members, **train}})


def trained(params, tfrecords, model_path, backup: TrainingBackup | None = None) -> fit.TrainingResult:
    return fit.train(params.model, params.train, tfrecords, {0: 1.0, 1: 1.0}, model_path, backup=backup)


@pytest.fixture(scope="module")
def ensemble(synthetic_data, tmp_path_factory) -> dict:
    """A 2-member ensemble and the single model of the same params, each trained for one epoch."""
    folder = tmp_path_factory.mktemp("ensemble")
    tfrecords = synthetic_data / "data/tfrecords"
    result = trained(params_with(2), tfrecords, folder / "ensemble.keras")
    single = trained(params_with(1), tfrecords, folder / "single.keras")
    return {"result": result, "single_result": single, "model": load_model(folder / "ensemble.keras"),
            "single": load_model(folder / "single.keras"),
            "images": images_at(tfrecords, "val", list(range(12))).astype(np.float32)}


def weights_equal(first: keras.Model, second: keras.Model) -> bool:
    return all(np.array_equal(a, b) for a, b in zip(first.get_weights(), second.get_weights(), strict=True))


@pytest.mark.slow
def test_an_ensemble_is_one_model_file_predicting_the_mean_of_its_members(ensemble, tmp_path):
    model, images = ensemble["model"], ensemble["images"]
    members = members_of(model)
    assert [member.name for member in members] == ["member_0", "member_1"]
    assert model.input_shape == (None, SIZE, SIZE, 3) and model.output_shape == (None, 1)
    predicted = model.predict(images, verbose=0)
    by_member = [member.predict(images, verbose=0) for member in members]
    np.testing.assert_allclose(predicted, np.mean(by_member, axis=0), rtol=1e-6)
    assert not np.allclose(by_member[0], by_member[1])  # two seeds, two models
    # Member 0 is the single model of the same params, bit for bit; member 1 another (seed train.seed + 1).
    assert weights_equal(members[0], ensemble["single"]) and not weights_equal(members[1], ensemble["single"])
    # It saves and loads again as it was.
    model.save(tmp_path / "again.keras")
    np.testing.assert_array_equal(load_model(tmp_path / "again.keras").predict(images, verbose=0), predicted)
    assert members_of(ensemble["single"]) == []


@pytest.mark.slow
def test_an_ensembles_metrics_are_its_members_and_its_cost_theirs_summed(ensemble):
    result, single = ensemble["result"], ensemble["single_result"]
    metrics = result.metrics()
    assert len(result.members) == 2 and result.members[0].history == single.history
    assert result.history == single.history and metrics["best_epoch"] == single.metrics()["best_epoch"]
    assert metrics["train_seconds"] == pytest.approx(sum(member.seconds for member in result.members), abs=0.1)
    assert metrics["total_params"] == ensemble["model"].count_params() == 2 * single.total_params
    for number, member in enumerate(result.members):
        assert metrics[f"member_{number}_best_epoch"] == member.best_epoch + 1
        assert metrics[f"member_{number}_best_val_auc"] == member.best_metrics()["val_auc"]
    assert result.headline().keys() == single.headline().keys()  # metrics/train.json: the same columns
    assert result.history_table() == single.history_table()  # plots/train_history.csv: member 0's epochs


@pytest.mark.slow
def test_a_stopped_ensemble_resumes_with_the_members_it_finished_and_ends_as_an_uninterrupted_one(
        ensemble, synthetic_data, tmp_path, monkeypatch):
    """A training stopped while member 1 trains keeps member 0 (its backup and result); started again, it
    trains member 1 alone and saves the ensemble an uninterrupted training saved: same params, same weights."""
    params, tfrecords = params_with(2), synthetic_data / "data/tfrecords"
    fit_model, seeds_fitted = fit.fit_model, []

    def stopped_at_member_1(model_config, config, *args, **kwargs):
        seeds_fitted.append(config.seed)
        if config.seed == params.train.seed + 1:
            raise KeyboardInterrupt  # as a kill: nothing after it runs
        return fit_model(model_config, config, *args, **kwargs)

    backup = TrainingBackup(tmp_path / "backup", "fingerprint")
    assert not backup.open()
    monkeypatch.setattr(fit, "fit_model", stopped_at_member_1)
    with pytest.raises(KeyboardInterrupt):
        trained(params, tfrecords, tmp_path / "model.keras", backup)
    assert seeds_fitted == [42, 43] and not (tmp_path / "model.keras").exists()
    assert json.loads((tmp_path / "backup/member-0/result.json").read_text())["best_epoch"] == 0

    seeds_fitted.clear()
    monkeypatch.setattr(fit, "fit_model", lambda model_config, config, *args, **kwargs: (
        seeds_fitted.append(config.seed), fit_model(model_config, config, *args, **kwargs))[1])
    backup = TrainingBackup(tmp_path / "backup", "fingerprint")
    assert backup.open()
    result = trained(params, tfrecords, tmp_path / "model.keras", backup)
    assert seeds_fitted == [43]  # member 0 kept, not trained again
    kept, uninterrupted = result.members[0], ensemble["result"].members[0]
    assert (kept.history, kept.best_epoch, kept.members) == (uninterrupted.history, uninterrupted.best_epoch, ())
    resumed = load_model(tmp_path / "model.keras")
    # The same weights. (Not the same bytes: Keras numbers layer names in the order a process builds
    # layers, and this process built member 1's after others; an uninterrupted stage's file is stable.)
    assert weights_equal(resumed, ensemble["model"])


def random_members(count: int) -> list[keras.Model]:
    """Small random convolutional networks with a batch norm, whose outputs follow the image (an untrained
    custom_cnn scores every image alike, and its Grad-CAM of pneumonia is zero)."""
    members = []
    for seed in range(count):
        inputs = keras.Input((SIZE, SIZE, 3), name="image")
        features = keras.layers.Conv2D(4, 5, kernel_initializer=keras.initializers.RandomNormal(seed=seed))(
            inputs / 255)
        features = keras.layers.Activation("relu")(keras.layers.BatchNormalization()(features))
        outputs = keras.layers.Dense(1, "sigmoid", kernel_initializer=keras.initializers.RandomNormal(
            stddev=5, seed=seed + 100))(keras.layers.GlobalAveragePooling2D()(features))
        members.append(keras.Model(inputs, outputs))
    return members


def site_images(count: int = 6) -> np.ndarray:
    return np.random.default_rng(9).uniform(60, 255, (count, SIZE, SIZE, 3)).astype(np.float32)


def test_grad_cam_of_an_ensemble_is_the_mean_of_its_members_maps():
    members = random_members(2)
    model = ensemble_of(members)
    images, targets = site_images(), np.array([1, 0, 1, 0, 1, 1])
    maps = gradcam.heatmaps(model, images, targets)
    mean = np.mean([gradcam.heatmaps(member, images, targets) for member in members], axis=0)
    assert maps.shape == (len(images), SIZE, SIZE)
    np.testing.assert_allclose(maps, mean / mean.max(axis=(1, 2), keepdims=True), rtol=1e-5, atol=1e-6)
    assert maps.max(axis=(1, 2)) == pytest.approx(1)  # scaled to [0, 1] per image, as a single model's
    single_layer = gradcam.explained_layer(members[0])
    assert gradcam.explained_layer(model) == f"{single_layer} of each of the 2 members, averaged"


def test_batch_norm_adaptation_of_an_ensemble_adapts_each_member(tmp_path):
    members = random_members(2)
    model, site = ensemble_of(members), site_images(16)
    before = [weights.copy() for weights in model.get_weights()]
    adapted = adaptation.adapt_batch_norm(model, site, batch_size=8)
    assert len(members_of(adapted)) == 2
    for found, member in zip(members_of(adapted), members, strict=True):
        assert weights_equal(found, adaptation.adapt_batch_norm(member, site, batch_size=8))
    assert all(np.array_equal(a, b) for a, b in zip(model.get_weights(), before, strict=True))  # left as it was
    np.testing.assert_allclose(adapted.predict(site, verbose=0),
                               np.mean([member.predict(site, verbose=0) for member in members_of(adapted)], axis=0),
                               rtol=1e-6)
    adapted.save(tmp_path / "adapted.keras")  # as `pneumonia adapt` writes it, for `pneumonia predict --model`
    np.testing.assert_array_equal(load_model(tmp_path / "adapted.keras").predict(site, verbose=0),
                                  adapted.predict(site, verbose=0))


@pytest.mark.parametrize(("train", "message"), [
    ({"ensemble_members": 0}, "train.ensemble_members = 0: Input should be greater than or equal to 1"),
    ({"ensemble_members": 11}, "train.ensemble_members = 11: Input should be less than or equal to 10"),
    ({"ensemble_members": 2.5}, "train.ensemble_members = 2.5: Input should be a valid integer"),
    ({"ensemble_members": True}, "train.ensemble_members = True: Input should be a valid integer"),
    ({"ensemble_members": 3, "seed": 2**32 - 2},
     "train.ensemble_members = 3 with train.seed = 4294967294: member k trains with seed train.seed + k"),
], ids=["zero", "above-10", "fraction", "boolean", "seeds-past-numpys"])
def test_bad_ensemble_sizes_are_refused_naming_the_key(train, message):
    with pytest.raises(PipelineError, match="invalid params") as error:
        parse_params({"train": train})
    assert message in str(error.value)
    assert parse_params({"train": {"ensemble_members": 10, "seed": 2**32 - 10}}).train.ensemble_members == 10


def test_an_ensembles_probabilities_stay_float32_under_mixed_precision():
    """As a single model's output layer: training and the ensemble's saving run under train.precision's policy,
    where a float16 or bfloat16 mean would keep 3 significant digits of each probability."""
    keras.mixed_precision.set_global_policy("mixed_bfloat16")  # conftest restores float32 after the test
    model = ensemble_of(random_members(2))
    assert model.output.dtype == "float32"
    assert model.predict(site_images(2), verbose=0).dtype == np.float32


def test_pneumonia_compare_tells_an_ensemble_from_one_model():
    from pneumonia.comparison import PARAM_COLUMNS, label

    row = {"model.name": "custom_cnn", "train.fine_tune": "full", "dvc_experiment": "exp", "run_id": "0123456789"}
    assert "train.ensemble_members" in PARAM_COLUMNS  # a column of runs.csv and runs.md
    assert [label({**row, "train.ensemble_members": members}) for members in ("3", "1", "")] == [
        "custom_cnn x3 exp", "custom_cnn exp", "custom_cnn exp"]


def test_an_ensemble_needs_two_members():
    with pytest.raises(ValueError, match="at least 2 members, got 1"):
        ensemble_of(random_members(1))
