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
    model = build_model(ModelConfig(), 32)
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
    model = build_model(ModelConfig(name="mobilenetv2", weights="none"), 32)
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
