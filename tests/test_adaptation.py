"""Unsupervised site adaptation: batch-norm statistics re-estimated on a site's images, and the
class prior estimated by EM."""

import json
import os

import keras
import numpy as np
import pytest

from bundles import write_settings
from dicoms import dataset, file_bytes, png_bytes, sample_xrays
from pneumonia import adaptation
from pneumonia.classifier import model_input
from pneumonia.config import ModelConfig
from pneumonia.models.build import build_model


def test_adapted_batch_norm_holds_the_statistics_of_the_sites_images():
    keras.utils.set_random_seed(0)
    model = build_model(ModelConfig(crop=0), 32)
    site = np.random.default_rng(1).uniform(100, 255, (20, 32, 32, 3)).astype(np.float32)  # a brighter site
    adapted = adaptation.adapt_batch_norm(model, site, batch_size=8)

    norms = [layer for layer in adapted.layers if isinstance(layer, keras.layers.BatchNormalization)]
    originals = [layer for layer in model.layers if isinstance(layer, keras.layers.BatchNormalization)]
    for norm in (norms[0], norms[-1]):  # the first, and the last (which sees the adapted layers before it)
        features = keras.ops.convert_to_numpy(keras.Model(adapted.inputs[0], norm.input)(site, training=False))
        axes = tuple(range(features.ndim - 1))
        np.testing.assert_allclose(norm.moving_mean.numpy(), features.mean(axis=axes), rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(norm.moving_variance.numpy(), features.var(axis=axes), rtol=1e-3, atol=1e-5)
    # The model given is left as it was: a hospital keeps the original.
    assert np.all(originals[0].moving_mean.numpy() == 0) and np.all(originals[0].moving_variance.numpy() == 1)
    assert not np.allclose(adapted.predict(site, verbose=0), model.predict(site, verbose=0))


def test_a_nested_backbone_is_refused_with_a_reason():
    model = build_model(ModelConfig(crop=0, name="mobilenetv2", weights="none"), 32)
    assert adaptation.nests_a_backbone(model)
    with pytest.raises(ValueError, match="nests a backbone"):
        adaptation.adapt_batch_norm(model, np.zeros((2, 32, 32, 3), np.float32))


def test_an_ensemble_of_flat_networks_is_flat_and_one_with_a_backbone_is_not():
    from pneumonia.models.build import ensemble_of

    flat = [build_model(ModelConfig(crop=0), 32) for _ in range(2)]
    backbone = build_model(ModelConfig(crop=0, name="mobilenetv2", weights="none"), 32)
    assert not adaptation.nests_a_backbone(flat[0]) and not adaptation.nests_a_backbone(ensemble_of(flat))
    assert adaptation.nests_a_backbone(ensemble_of([flat[0], backbone]))


def test_em_recovers_the_share_of_pneumonia_at_a_site():
    """Calibrated probabilities for a 50/50 training prior, on a site with 80% pneumonia."""
    rng = np.random.default_rng(0)
    labels = rng.random(4000) < 0.8
    evidence = rng.normal(np.where(labels, 1.5, -1.5), 1.0)
    likelihood_ratio = np.exp(3.0 * evidence)  # N(1.5, 1) over N(-1.5, 1)
    probabilities = likelihood_ratio / (1 + likelihood_ratio)  # posterior under a 50/50 prior
    assert adaptation.site_prior(probabilities, training_prior=0.5) == pytest.approx(0.8, abs=0.02)
    np.testing.assert_allclose(adaptation.adjust_to_prior(probabilities, 0.5, 0.5), probabilities)
    assert np.all(adaptation.adjust_to_prior(probabilities, 0.5, 0.8) >= probabilities - 1e-12)


@pytest.mark.slow
def test_pneumonia_adapt_writes_an_adapted_model_predict_can_use(tmp_path, monkeypatch, capsys):
    from PIL import Image

    from pneumonia import cli

    monkeypatch.chdir(tmp_path)
    keras.utils.set_random_seed(0)
    (tmp_path / "models").mkdir()
    model = build_model(ModelConfig(crop=0), 32)
    model.save(tmp_path / "models" / "model.keras")
    # the bundle's checks fitted on real X-rays as predict reads them; the site: six X-rays of other patients
    xrays = [grey for _, grey in sample_xrays(120, width=40)]
    fitted_on = np.stack([model_input(png_bytes(grey), 32, 95) for index, grey in enumerate(xrays) if index % 20])
    write_settings(tmp_path / "models" / "model.keras", 0.5, images=fitted_on, model=model)
    site = tmp_path / "site"
    site.mkdir()
    for index, grey in enumerate(xrays[::20]):
        Image.fromarray(grey).save(site / f"{index}.png")
    (site / "broken.jpeg").write_bytes(b"not an image")
    # Outside the intended use, left out: a lateral view (its DICOM header) and a thumbnail under the model's 32 px
    [(_, grey)] = sample_xrays(1, width=64)
    (site / "lateral.dcm").write_bytes(file_bytes(dataset(grey, 8, ViewPosition="LL")))
    Image.fromarray(grey[::4, ::4]).save(site / "thumbnail.png")
    # Flagged by the model's checks as predict flags it, left out too: an X-ray under heavy noise
    noisy = xrays[0] + np.random.default_rng(0).normal(0, 40, xrays[0].shape)
    Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)).save(site / "noise.png")

    with pytest.raises(SystemExit) as refused:
        cli.main(["adapt", str(site), "--out", "adapted.keras", "--min-images", "7"])
    refusal = capsys.readouterr().err
    assert refused.value.code == 2 and "6 image(s) found" in refusal, refusal
    assert not (tmp_path / "adapted.keras").exists()

    cli.main(["adapt", str(site), "--out", "adapted.keras", "--min-images", "6"])
    output = capsys.readouterr()
    assert "adapted to 6 images" in output.out and "broken.jpeg" in output.err
    assert "2 file(s) left out, outside the model's intended use" in output.err
    assert "lateral.dcm: not a frontal view" in output.err and "thumbnail.png: smaller than the model's" in output.err
    assert "LL" not in output.err  # the reason, not the header's value
    assert "1 file(s) left out, flagged by the model's checks" in output.err and "noise.png: noisy" in output.err
    cli.main(["adapt", str(site), "--out", "everything.keras", "--min-images", "6", "--input-checks", "ignore"])
    assert "adapted to 9 images" in capsys.readouterr().out
    adapted = keras.models.load_model(tmp_path / "adapted.keras")
    [norm, *_] = [layer for layer in adapted.layers if isinstance(layer, keras.layers.BatchNormalization)]
    assert not np.allclose(norm.moving_mean.numpy(), 0)

    cli.main(["predict", str(site / "0.png"), "--model", "adapted.keras"])
    assert "0.png" in capsys.readouterr().out


def test_an_out_that_could_not_be_written_or_would_overwrite_the_model_is_refused_before_adapting(tmp_path,
                                                                                                 monkeypatch, capsys):
    """Before: `--out models/model.keras` overwrote the input model, the pipeline's DVC output; a path under a
    file, an unwritable folder, out.h5 or no suffix failed only after adapting, as tracebacks."""
    from pneumonia import adaptation, cli

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(adaptation, "adapt_batch_norm", lambda *args: pytest.fail("adapted before checking --out"))
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "model.keras").write_bytes(b"the run's model")
    (tmp_path / "mine.keras").write_bytes(b"another model")
    (tmp_path / "a-file").write_text("")
    (tmp_path / "locked").mkdir(mode=0o500)
    (tmp_path / "dvc.yaml").write_text("stages:\n  train:\n    cmd: x\n    outs:\n      - models/model.keras\n"
                                       "      - plots/train_history.csv:\n          cache: false\n")
    cases = {
        ("--out", "models/model.keras"): "is the model it adapts",
        ("--out", "./models/../models/model.keras"): "is the model it adapts",
        ("--model", "mine.keras", "--out", "mine.keras"): "is the model it adapts",
        ("--model", "mine.keras", "--out", "models/model.keras"): "is an output of the DVC pipeline",
        ("--out", "out.h5"): "name a .keras file",
        ("--out", "adapted"): "name a .keras file",
        ("--out", "a-file/adapted.keras"): "a-file is not a folder this user can write to",
        ("--out", "missing/adapted.keras"): "missing is not a folder this user can write to",
    }
    if os.geteuid() != 0:  # root writes anywhere
        cases[("--out", "locked/adapted.keras")] = "locked is not a folder this user can write to"
    for arguments, message in cases.items():
        with pytest.raises(SystemExit) as refused:
            cli.main(["adapt", "site", *arguments])
        err = capsys.readouterr().err
        assert refused.value.code == 2 and message in err, (arguments, err)
    assert (tmp_path / "models" / "model.keras").read_bytes() == b"the run's model"
    assert (tmp_path / "mine.keras").read_bytes() == b"another model"


def test_min_images_below_one_is_refused(tmp_path, capsys):
    """issue 27: `--min-images 0` with no readable image ended in NumPy's "need at least one array to stack"."""
    from pneumonia import cli

    with pytest.raises(SystemExit) as refused:
        cli.main(["adapt", str(tmp_path), "--out", str(tmp_path / "adapted.keras"), "--min-images", "0"])
    assert refused.value.code == 2
    assert "argument --min-images: 0 is below 1" in capsys.readouterr().err


def site_model(size: int = 32, output: str = "sigmoid") -> keras.Model:
    """A small model with the training augmentation at its input whose probability follows the image's
    brightness once batch norm holds the site's statistics: bright PNEUMONIA, dark NORMAL, both confident."""
    from pneumonia.models.augmentation import RandomAffine

    keras.utils.set_random_seed(0)
    inputs = keras.Input((size, size, 3), name="image")
    x = RandomAffine(zoom=0.1, translation=0.05, name="random_affine")(inputs)
    x = keras.layers.Conv2D(4, 3, kernel_initializer=keras.initializers.RandomNormal(1.0, 0.1, seed=0))(x / 255)
    x = keras.layers.BatchNormalization()(keras.layers.GlobalAveragePooling2D()(x))
    head = keras.layers.Dense(2 if output == "softmax" else 1, activation=output)
    model = keras.Model(inputs, head(x))
    per_feature = np.full((4, 1), 1.5, np.float32)
    head.set_weights([np.hstack([-per_feature, per_feature]) / 2 if output == "softmax" else per_feature,
                      np.zeros(head.units, np.float32)])
    return model


def bright_and_dark(count: int, size: int = 32, seed: int = 0) -> np.ndarray:
    """`count` noisy images, the first half dark, the second bright."""
    rng = np.random.default_rng(seed)
    low = np.where(np.arange(count) < count // 2, 0, 150)[:, None, None, None]
    return (low + rng.uniform(0, 100, (count, size, size, 3))).astype(np.float32)


def test_pseudo_labels_are_confident_by_their_distance_from_the_runs_threshold():
    """Odds of 19:1 from the threshold: at 0.9, 0.3 is a confident NORMAL and 0.99 not a confident PNEUMONIA;
    at 0.5 the reverse."""
    probabilities = np.array([0.3, 0.5, 0.9, 0.99, 0.999])
    labels, confidence = adaptation.pseudo_labels(probabilities, 0.9)
    assert labels.tolist() == [0, 0, 1, 1, 1]
    assert (confidence >= np.log(adaptation.CONFIDENT_ODDS)).tolist() == [True, False, False, False, True]
    _, at_half = adaptation.pseudo_labels(probabilities, 0.5)
    assert (at_half >= np.log(adaptation.CONFIDENT_ODDS)).tolist() == [False, False, False, True, True]
    assert np.all(np.isfinite(adaptation.pseudo_labels(np.array([0.0, 1.0]), 1.0)[1]))


def test_self_training_loss_is_centred_on_the_runs_threshold():
    """The student learns a boundary at the run's threshold: a probability at it costs log 2 either way, and
    odds k times the threshold's cost a PNEUMONIA label what odds k times lower cost a NORMAL one."""
    loss = adaptation._centred_cross_entropy(0.8)
    odds = lambda ratio: 4 * ratio / (1 + 4 * ratio)  # noqa: E731 - the probability at `ratio` x 0.8's odds (4)
    sigmoid = np.array([[0.8], [0.8], [odds(5)], [odds(1 / 5)]], np.float32)
    found = keras.ops.convert_to_numpy(loss(np.array([[1], [0], [1], [0]], np.float32), sigmoid))
    np.testing.assert_allclose(found[:2], np.log(2), rtol=1e-5)
    np.testing.assert_allclose(found[2], found[3], rtol=1e-4)
    assert found[2] < np.log(2)
    softmax = np.hstack([1 - sigmoid, sigmoid])  # the same probabilities from a [NORMAL, PNEUMONIA] head
    np.testing.assert_allclose(keras.ops.convert_to_numpy(loss(np.array([[1], [0], [1], [0]], np.float32),
                                                               softmax)), found, rtol=1e-5)


@pytest.mark.parametrize("output", ["sigmoid", "softmax"])
def test_self_training_is_deterministic_for_a_seed_and_keeps_the_sites_batch_norm_statistics(output):
    model, site = site_model(output=output), bright_and_dark(40)
    before = [weights.copy() for weights in model.get_weights()]
    first, again, other = (adaptation.self_train(model, site, 0.3, seed=seed, epochs=2, min_per_class=5)
                           for seed in (0, 0, 1))

    probabilities = first.predict(site, verbose=0)
    assert probabilities.shape == (40, 2 if output == "softmax" else 1)
    assert all(np.array_equal(a, b) for a, b in zip(first.get_weights(), again.get_weights(), strict=True))
    assert not all(np.array_equal(a, b) for a, b in zip(first.get_weights(), other.get_weights(), strict=True))
    assert all(np.array_equal(a, b) for a, b in zip(model.get_weights(), before, strict=True))  # original kept
    # The batch-norm statistics are AdaBN's (frozen while the rest trained); the other weights moved.
    batch_norm_only = adaptation.adapt_batch_norm(model, site)
    [norm] = [layer for layer in first.layers if isinstance(layer, keras.layers.BatchNormalization)]
    [reference] = [layer for layer in batch_norm_only.layers if isinstance(layer, keras.layers.BatchNormalization)]
    np.testing.assert_array_equal(norm.moving_mean.numpy(), reference.moving_mean.numpy())
    assert not np.allclose(probabilities, batch_norm_only.predict(site, verbose=0))
    assert not first.compiled  # saved like adapt_batch_norm's model, without training state


def test_self_training_refuses_too_few_confident_images_of_a_class_and_a_model_without_augmentation():
    from pneumonia.errors import PipelineError

    bright_only = bright_and_dark(40)[20:] + np.random.default_rng(1).uniform(-5, 5, (20, 32, 32, 3))
    with pytest.raises(PipelineError, match=r"confidently NORMAL and .* confidently PNEUMONIA .* at least 5 of each"):
        adaptation.self_train(site_model(), bright_only, 0.3, min_per_class=5)
    # A threshold the model's probabilities cannot reach by 19:1 on one side: no confident PNEUMONIA.
    with pytest.raises(PipelineError, match="0 confidently PNEUMONIA"):
        adaptation.self_train(site_model(), bright_and_dark(40), 1 - 1e-4, min_per_class=5)
    with pytest.raises(PipelineError, match="no training augmentation"):
        adaptation.self_train(build_model(ModelConfig(crop=0), 32), bright_and_dark(4), 0.5)


@pytest.mark.slow  # two self-trainings of a small model: 10 s
def test_pneumonia_adapt_self_training_writes_the_model_it_trained_and_predict_reads_it(tmp_path, monkeypatch,
                                                                                        capsys):
    from PIL import Image

    from pneumonia import cli
    from pneumonia.classifier import load_classifier
    from pneumonia.evaluation.predictions import pneumonia_probability

    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()
    site_model().save(tmp_path / "models" / "model.keras")
    write_settings(tmp_path / "models" / "model.keras", 0.3)
    # every drawn image used: the bundle's checks, fitted on other random images, would flag these (the first test)
    ignore = ("--input-checks", "ignore")
    site, few = tmp_path / "site", tmp_path / "few"
    site.mkdir(), few.mkdir()
    for index, image in enumerate(bright_and_dark(24, size=40)):
        Image.fromarray(image[..., 0].astype(np.uint8)).save(site / f"{index:02d}.png")
        if 4 <= index < 20:  # 8 dark, 8 bright
            Image.fromarray(image[..., 0].astype(np.uint8)).save(few / f"{index:02d}.png")

    with pytest.raises(SystemExit) as refused:
        cli.main(["adapt", str(few), "--out", "adapted.keras", "--method", "self_training", "--min-images", "6",
                  *ignore])
    assert refused.value.code == 2
    assert "8 image(s) confidently NORMAL and 8 confidently PNEUMONIA" in capsys.readouterr().err
    assert not (tmp_path / "adapted.keras").exists()
    for bad, message in ((["--method", "fixmatch"], "invalid choice: 'fixmatch'"),
                         (["--method", "self_training", "--seed", "-1"], "a seed is an integer from 0")):
        with pytest.raises(SystemExit) as refused:
            cli.main(["adapt", str(site), "--out", "adapted.keras", *bad])
        assert refused.value.code == 2 and message in capsys.readouterr().err

    cli.main(["adapt", str(site), "--out", "adapted.keras", "--method", "self_training", "--min-images", "20",
              "--seed", "3", *ignore])
    assert "adapted to 24 images" in capsys.readouterr().out
    # The file holds the model self_train makes in memory from the same images and seed.
    classifier = load_classifier(tmp_path / "adapted.keras")
    assert classifier.threshold == 0.3
    images = [classifier.preprocess(path) for path in sorted(site.iterdir())]
    in_memory = adaptation.self_train(site_model(), np.stack(images), 0.3, seed=3)
    expected = pneumonia_probability(in_memory.predict(np.stack(images).astype(np.float32), verbose=0))
    # predicted with adapted.onnx, exported with it: ONNX Runtime's float rounding is not Keras's (~1e-7 apart)
    np.testing.assert_allclose(classifier.probabilities(images), expected, rtol=1e-6, atol=1e-6)
    # `pneumonia predict --model` reads it as any model.
    cli.main(["predict", str(site), "--model", "adapted.keras", "--json", "predictions.json"])
    predicted = json.loads((tmp_path / "predictions.json").read_text())
    np.testing.assert_allclose([row["probability"] for row in sorted(predicted, key=lambda row: row["file"])],
                               expected, rtol=1e-5, atol=1e-6)


def test_self_training_pseudo_labels_the_models_output_at_the_threshold_before_calibration(tmp_path, monkeypatch):
    """With evaluate.calibration, the run's threshold is on the calibrated probability; self-training labels the
    model's own output, so `pneumonia adapt` maps the threshold back (Calibration.uncalibrated)."""
    from PIL import Image

    from pneumonia import cli
    from pneumonia.evaluation.calibration import Calibration

    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()
    model = build_model(ModelConfig(crop=0), 32)
    model.save(tmp_path / "models" / "model.keras")
    calibration = Calibration("platt", scale=0.5, shift=1.0)
    write_settings(tmp_path / "models" / "model.keras", 0.6, model=model, calibration=calibration)
    site = tmp_path / "site"
    site.mkdir()
    for index in range(6):
        Image.fromarray(np.random.default_rng(index).integers(0, 255, (40, 40), dtype=np.uint8)).save(
            site / f"{index}.png")
    thresholds = []
    monkeypatch.setattr(adaptation, "self_train",
                        lambda model, images, threshold, seed: thresholds.append(threshold) or model)
    cli.main(["adapt", str(site), "--out", "adapted.keras", "--method", "self_training", "--min-images", "6",
              "--input-checks", "ignore"])  # noise images, which the bundle's checks flag
    assert thresholds == [pytest.approx(calibration.uncalibrated(0.6))]
    assert calibration.apply([thresholds[0]])[0] == pytest.approx(0.6) and thresholds[0] < 0.3
