"""Adapting a trained model to a new site from its unlabelled X-rays.

Three unsupervised corrections a hospital can apply before use, each fitted on images only (no
labels), so the site's labelled images stay free for judging the result:

* `adapt_batch_norm` (AdaBN, Li et al. 2016): batch-norm layers normalise with the statistics of
  the training images; the new site's acquisition shifts them. Re-estimating each layer's mean and
  variance on the site's images, layer by layer in network order, re-centres the features the
  classifier reads.
* `site_prior` and `adjust_to_prior` (Saerens et al. 2002): the share of pneumonia at the site,
  estimated by expectation-maximisation from the model's probabilities, and the probabilities
  re-weighted for it.
* `self_train`: AdaBN, then a short fine-tuning on the site's own images toward the adapted model's
  confident pseudo-labels: the self-training of Noisy Student (Xie et al. 2020): a teacher labels the
  unlabelled images, keeping only its confident, class-balanced labels, and a student learns them from
  noised views (the model's own training augmentation and dropout); the student starts from the
  teacher, so a few epochs at a low learning rate adapt it rather than train it anew. Confidence is
  FixMatch's (Sohn et al. 2020): a probability of at least 0.95 of one class, there at a threshold of
  0.5, i.e. odds of 19:1; here the same odds measured from the run's decision threshold (models are
  asymmetric: the pipeline's threshold is often far from 0.5). For the same reason the loss is the
  cross-entropy of the pseudo-label against the probability re-centred on the threshold (its log-odds
  minus the threshold's): the student's decision boundary stays at the run's threshold instead of
  being pulled to 0.5 (centred at 0.5, on one halving of the external set, it cut the sensitivity of
  both `ema` models at their thresholds of 0.80 and 0.85 to 0.70 and 0.65). Pseudo-labels come once,
  from each image as it is; batch-norm statistics stay those of the site while the other weights train.
"""

from __future__ import annotations

import numpy as np

from pneumonia.errors import PipelineError
from pneumonia.evaluation.predictions import pneumonia_probability


def nests_a_backbone(model) -> bool:
    """Whether `model` (or a member of an ensemble) holds a nested backbone (a keras.applications network):
    batch-norm adaptation, and so self-training, is implemented for flat networks (custom_cnn) only."""
    from pneumonia.models.build import members_of
    from pneumonia.models.fine_tuning import backbone_of

    return any(backbone_of(member) is not None for member in members_of(model) or [model])


def adapt_batch_norm(model, images: np.ndarray, batch_size: int = 64):
    """A copy of `model` whose batch-norm moving statistics are those of `images` ([0, 255],
    (n, h, w, 3)): each layer's input computed with the layers before it already adapted. An ensemble
    (train.ensemble_members): each member adapted so, the ensemble of the adapted members."""
    import keras

    from pneumonia.models.build import ensemble_of, members_of

    if members := members_of(model):
        return ensemble_of([adapt_batch_norm(member, images, batch_size) for member in members])
    if nests_a_backbone(model):
        raise ValueError(f"model {model.name!r} nests a backbone; batch-norm adaptation is implemented for flat "
                         "networks (custom_cnn)")
    adapted = keras.models.clone_model(model)
    adapted.set_weights(model.get_weights())
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


# Self-training's recipe (module doc): fixed, not tuned on any site's labels.
CONFIDENT_ODDS = 19.0  # FixMatch's 0.95 at a 0.5 threshold, measured from the run's threshold
SELF_TRAINING_EPOCHS = 5
SELF_TRAINING_LEARNING_RATE = 1e-4  # about where the default's exponential decay ends (1e-3 x 0.9 per epoch)
MAX_PER_CLASS = 200  # the most confident images of each pseudo-class: bounds the time (< 1 min on 2 cores)
MIN_PER_CLASS = 10


def pseudo_labels(probabilities: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """Per image, (the label at `threshold`: 1 PNEUMONIA, 0 NORMAL; its confidence: the distance in log-odds
    between the probability and the threshold). Confident: at least log(CONFIDENT_ODDS)."""
    probabilities = np.asarray(probabilities, dtype=np.float64)
    distance = np.abs(_log_odds(probabilities) - _log_odds(np.float64(threshold)))
    return (probabilities >= threshold).astype(int), distance


def _log_odds(p: np.ndarray) -> np.ndarray:
    p = np.clip(p, 1e-7, 1 - 1e-7)  # a threshold or probability of 0 or 1 stays finite
    return np.log(p) - np.log1p(-p)


def self_train(model, images: np.ndarray, threshold: float, seed: int = 0, epochs: int = SELF_TRAINING_EPOCHS,
               learning_rate: float = SELF_TRAINING_LEARNING_RATE, max_per_class: int = MAX_PER_CLASS,
               min_per_class: int = MIN_PER_CLASS, batch_size: int = 32):
    """A copy of `model` adapted to `images` ([0, 255], (n, h, w, 3)) by AdaBN and self-training on its own
    confident pseudo-labels at `threshold` (module doc); the same `seed`, the same model. A PipelineError when
    fewer than `min_per_class` images of either pseudo-class are confident, or when the model has no training
    augmentation to make the noised views from."""
    import keras

    from pneumonia.models.augmentation import RandomAffine

    augmentations = (RandomAffine, keras.layers.RandomFlip, keras.layers.RandomContrast)
    if not any(isinstance(layer, augmentations) for layer in _all_layers(model)):
        raise PipelineError(f"model {model.name!r} has no training augmentation (train.augment) to make noised views "
                            "from: self-training would only fit its own labels; use --method batch_norm")
    keras.utils.set_random_seed(seed)  # before cloning: the augmentation layers' seeds are drawn from it
    adapted = adapt_batch_norm(model, images)
    probabilities = pneumonia_probability(adapted.predict(np.asarray(images, dtype=np.float32), verbose=0,
                                                          batch_size=batch_size))
    labels, confidence = pseudo_labels(probabilities, threshold)
    chosen = {}
    for label in (0, 1):
        candidates = np.flatnonzero((labels == label) & (confidence >= np.log(CONFIDENT_ODDS)))
        chosen[label] = candidates[np.argsort(-confidence[candidates], kind="stable")][:max_per_class]
    if min(len(found) for found in chosen.values()) < min_per_class:
        raise PipelineError(
            f"{len(chosen[0])} image(s) confidently NORMAL and {len(chosen[1])} confidently PNEUMONIA (odds of "
            f"{CONFIDENT_ODDS:.0f}:1 or more from the threshold {threshold:.3f}) among {len(images)}: self-training "
            f"needs at least {min_per_class} of each. Give it more of the site's X-rays, normal and pneumonia "
            "studies alike, or use --method batch_norm.")
    kept = np.concatenate([chosen[0], chosen[1]])
    targets = labels[kept].astype(np.float32)
    # Each pseudo-class weighs alike in the loss, however many of each are confident.
    weights = np.where(targets == 1, len(kept) / (2 * len(chosen[1])), len(kept) / (2 * len(chosen[0])))
    # Trained as a copy, its weights then copied back: `adapted` stays uncompiled, as adapt_batch_norm's model,
    # and is saved without the optimizer's state.
    student = keras.models.clone_model(adapted)
    student.set_weights(adapted.get_weights())
    for layer in _all_layers(student):
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.trainable = False  # Keras runs a frozen batch norm in inference mode: the site's statistics stay
    student.compile(optimizer=keras.optimizers.Adam(learning_rate), loss=_centred_cross_entropy(threshold))
    student.fit(np.asarray(images, dtype=np.float32)[kept], targets[:, None], sample_weight=weights,
                batch_size=batch_size, epochs=epochs, shuffle=True, verbose=0)
    adapted.set_weights(student.get_weights())
    return adapted


def _centred_cross_entropy(threshold: float):
    """Binary cross-entropy of (n, 1) labels against the model's probability of pneumonia (a sigmoid's, or a
    softmax's last column) with its log-odds taken from the threshold's: a boundary at `threshold`, not 0.5."""
    import keras
    from keras import ops

    threshold_log_odds = float(_log_odds(np.float64(threshold)))

    def loss(labels, outputs):
        probability = ops.clip(outputs[:, -1:], 1e-7, 1 - 1e-7)
        log_odds = ops.log(probability) - ops.log1p(-probability) - threshold_log_odds
        return keras.losses.binary_crossentropy(labels, log_odds, from_logits=True)

    return loss


def _all_layers(model):
    """The layers of `model` and of the models nested in it."""
    import keras

    for layer in model.layers:
        yield layer
        if isinstance(layer, keras.Model):
            yield from _all_layers(layer)
