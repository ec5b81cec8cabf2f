"""Adapting a trained model to a new site from its unlabelled X-rays.

Two unsupervised corrections a hospital can apply before use, each fitted on images only (no
labels), so the site's labelled images stay free for judging the result:

* `adapt_batch_norm` (AdaBN, Li et al. 2016): batch-norm layers normalise with the statistics of
  the training images; the new site's acquisition shifts them. Re-estimating each layer's mean and
  variance on the site's images, layer by layer in network order, re-centres the features the
  classifier reads.
* `site_prior` and `adjust_to_prior` (Saerens et al. 2002): the share of pneumonia at the site,
  estimated by expectation-maximisation from the model's probabilities, and the probabilities
  re-weighted for it.
"""

from __future__ import annotations

import numpy as np


def adapt_batch_norm(model, images: np.ndarray, batch_size: int = 64):
    """A copy of `model` whose batch-norm moving statistics are those of `images` ([0, 255],
    (n, h, w, 3)): each layer's input computed with the layers before it already adapted. An ensemble
    (train.ensemble_members): each member adapted so, the ensemble of the adapted members."""
    import keras

    from pneumonia.models.build import ensemble_of, members_of

    if members := members_of(model):
        return ensemble_of([adapt_batch_norm(member, images, batch_size) for member in members])
    adapted = keras.models.clone_model(model)
    adapted.set_weights(model.get_weights())
    if any(isinstance(layer, keras.Model) for layer in adapted.layers):
        raise ValueError(f"model {model.name!r} nests a backbone; batch-norm adaptation is implemented for flat "
                         "networks (custom_cnn)")
    norms = [layer for layer in adapted.layers if isinstance(layer, keras.layers.BatchNormalization)]
    if not norms:
        raise ValueError(f"model {model.name!r} has no batch-norm layer to adapt")
    images = np.asarray(images, dtype=np.float32)
    for norm in norms:
        inputs = keras.Model(adapted.inputs[0], norm.input)
        total, squares, count = 0.0, 0.0, 0
        for start in range(0, len(images), batch_size):
            features = np.asarray(inputs(images[start:start + batch_size], training=False), dtype=np.float64)
            axes = tuple(range(features.ndim - 1))  # all but channels
            total = total + features.sum(axis=axes)
            squares = squares + (features ** 2).sum(axis=axes)
            count += int(np.prod([features.shape[axis] for axis in axes]))
        mean = total / count
        norm.moving_mean.assign(mean.astype(np.float32))
        norm.moving_variance.assign(np.maximum(squares / count - mean ** 2, 0).astype(np.float32))
    return adapted


def site_prior(probabilities: np.ndarray, training_prior: float, iterations: int = 200,
               tolerance: float = 1e-8) -> float:
    """The share of pneumonia among the images behind `probabilities`, by EM (Saerens et al. 2002),
    for a model whose probabilities assume `training_prior`."""
    prior = training_prior
    for _ in range(iterations):
        updated = float(np.mean(adjust_to_prior(probabilities, training_prior, prior)))
        if abs(updated - prior) < tolerance:
            return updated
        prior = updated
    return prior


def adjust_to_prior(probabilities: np.ndarray, training_prior: float, prior: float) -> np.ndarray:
    """Probabilities of pneumonia re-weighted from `training_prior` to `prior` (Bayes' rule on the odds)."""
    p = np.clip(np.asarray(probabilities, dtype=np.float64), 1e-12, 1 - 1e-12)
    positive = p * prior / training_prior
    negative = (1 - p) * (1 - prior) / (1 - training_prior)
    return positive / (positive + negative)
