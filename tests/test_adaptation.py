"""Unsupervised site adaptation: batch-norm statistics re-estimated on a site's images, and the
class prior estimated by EM."""

import keras
import numpy as np
import pytest

from pneumonia import adaptation
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
    with pytest.raises(ValueError, match="nests a backbone"):
        adaptation.adapt_batch_norm(model, np.zeros((2, 32, 32, 3), np.float32))


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
    build_model(ModelConfig(crop=0), 32).save(tmp_path / "models" / "model.keras")
    (tmp_path / "metrics").mkdir()
    (tmp_path / "metrics" / "evaluation.json").write_text('{"threshold": 0.5}')
    (tmp_path / "params.yaml").write_text("{}")
    site = tmp_path / "site"
    site.mkdir()
    rng = np.random.default_rng(0)
    for index in range(6):
        Image.fromarray(rng.integers(80, 255, (40, 40), dtype=np.uint8)).save(site / f"{index}.png")
    (site / "broken.jpeg").write_bytes(b"not an image")

    with pytest.raises(SystemExit) as refused:
        cli.main(["adapt", str(site), "--out", "adapted.keras", "--min-images", "7"])
    assert refused.value.code == 2 and "6 image(s) found" in capsys.readouterr().err
    assert not (tmp_path / "adapted.keras").exists()

    cli.main(["adapt", str(site), "--out", "adapted.keras", "--min-images", "6"])
    output = capsys.readouterr()
    assert "adapted to 6 images" in output.out and "broken.jpeg" in output.err
    adapted = keras.models.load_model(tmp_path / "adapted.keras")
    [norm, *_] = [layer for layer in adapted.layers if isinstance(layer, keras.layers.BatchNormalization)]
    assert not np.allclose(norm.moving_mean.numpy(), 0)

    cli.main(["predict", str(site / "0.png"), "--model", "adapted.keras"])
    assert "0.png" in capsys.readouterr().out


def test_min_images_below_one_is_refused(tmp_path, capsys):
    """issue 27: `--min-images 0` with no readable image ended in NumPy's "need at least one array to stack"."""
    from pneumonia import cli

    with pytest.raises(SystemExit) as refused:
        cli.main(["adapt", str(tmp_path), "--out", str(tmp_path / "adapted.keras"), "--min-images", "0"])
    assert refused.value.code == 2
    assert "argument --min-images: 0 is below 1" in capsys.readouterr().err
