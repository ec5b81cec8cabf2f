"""Grad-CAM (Selvaraju et al., 2017): where in an image the model found evidence for its answer.

The feature map explained is the last 4-D (image-like) output of the model, found automatically:
for a keras.applications backbone (nested as one layer) that is the backbone's output, i.e. its last
convolutional block; for a flat network it is the last convolutional stage. Each map channel is
weighted by the mean gradient of the class score over the map, the weighted sum is rectified,
upsampled to the image and scaled to [0, 1] per image.

The class score is the output layer's pre-activation (logit), not the probability, so confident
predictions (probability ~1, vanishing sigmoid gradient) still give a map. Both output heads of
`pneumonia.models.build` are handled: sigmoid over one unit (score of NORMAL = -logit) and softmax
over [NORMAL, PNEUMONIA].

An ensemble (train.ensemble_members) is explained by the mean of its members' maps, each taken as for
a single model (on the member's own last feature map), the mean scaled to [0, 1] again: the heat the
members agree on, as its probability is the mean of theirs.

The shortcut audit (`border_audit`): how much of a model's evidence lies in the image border. Burned-in
markers, collimation edges and corners differ between acquisitions; a model that learned them scores well
on images like its training set and badly on another site's. Grad-CAM over a seeded sample of a split's
images (explaining the class each is predicted at the chosen threshold) turns that into one number per
split: the mean share of heat-map mass in the outer band.
"""

from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from pneumonia.evaluation.predictions import Predictions, images_at
from pneumonia.models.build import members_of

MAPS_PER_PASS = 16  # images a Grad-CAM pass: its gradients bound memory
BORDER_BAND = 0.12  # the shortcut audit's border: this share of the image on each side
AUDITED_IMAGES = 400  # the shortcut audit's seeded sample: a few seconds on a CPU, whatever the split's size


@dataclass(frozen=True)
class FeatureMap:
    tensor: keras.KerasTensor  # in the model's own graph
    layer_name: str  # "backbone/block14_sepconv2_act" for a nested backbone


def _outer_output(layer: keras.layers.Layer) -> keras.KerasTensor:
    # A nested model's `.output` belongs to its inner graph; the tensor it produced in the outer
    # graph is on the node created when the outer model called it.
    return layer._inbound_nodes[0].output_tensors[0]


def last_feature_map(model: keras.Model) -> FeatureMap:
    """The last layer output of `model` with 4-D shape (batch, height, width, channels)."""
    for layer in reversed(model.layers):
        if isinstance(layer, keras.Model):
            tensor = _outer_output(layer)
            if len(tensor.shape) == 4:
                inner = next(inner for inner in reversed(layer.layers) if inner.output is layer.output)
                return FeatureMap(tensor, f"{layer.name}/{inner.name}")
        elif len(layer.output.shape) == 4:
            return FeatureMap(layer.output, layer.name)
    raise ValueError(f"model {model.name!r} has no layer with a 4-D output: Grad-CAM needs a convolutional network")


def explained_layer(model: keras.Model) -> str:
    """The layer the maps of `heatmaps` are taken on, as the report names it."""
    if members := members_of(model):
        return f"{last_feature_map(members[0]).layer_name} of each of the {len(members)} members, averaged"
    return last_feature_map(model).layer_name


def _class_scores(output_layer: keras.layers.Dense, head_inputs, target_class: tf.Tensor):
    """The logit of `target_class` (0 NORMAL, 1 PNEUMONIA) for each image."""
    logits = tf.matmul(tf.cast(head_inputs, tf.float32), output_layer.kernel) + output_layer.bias
    if logits.shape[-1] == 1:  # sigmoid: the logit of PNEUMONIA; NORMAL is its negative
        return logits[:, 0] * tf.where(target_class == 1, 1.0, -1.0)
    return tf.gather(logits, target_class, axis=1, batch_dims=1)  # softmax over [NORMAL, PNEUMONIA]


def _center_crop(model: keras.Model, size: tuple[int, int]) -> tuple[int, int, int, int]:
    """(top, left, height, width) of the part of the input the network sees: all of it, or the
    centre a CenterCrop layer (model.crop) keeps."""
    crop = next((layer for layer in model.layers if isinstance(layer, keras.layers.CenterCrop)), None)
    if crop is None:
        return 0, 0, *size
    return (size[0] - crop.height) // 2, (size[1] - crop.width) // 2, crop.height, crop.width


def _to_image(cam: tf.Tensor, crop: tuple[int, int, int, int], size: tuple[int, int]) -> tf.Tensor:
    """Feature-map heat upsampled onto the region the network saw, zero on any cropped-off border."""
    top, left, height, width = crop
    cam = tf.image.resize(cam, (height, width), method="bilinear")
    return tf.image.pad_to_bounding_box(cam, top, left, *size)[..., 0]


def heatmaps(model: keras.Model, images: np.ndarray, target_class: np.ndarray | None = None) -> np.ndarray:
    """Grad-CAM maps in [0, 1], shape (n, height, width) of `images` ([0, 255], (n, h, w, 3)).

    `target_class` (0 NORMAL / 1 PNEUMONIA per image) is the class explained; PNEUMONIA by default.
    """
    if members := members_of(model):
        maps = np.mean([heatmaps(member, images, target_class) for member in members], axis=0)
        peak = maps.max(axis=(1, 2), keepdims=True)
        return maps / np.where(peak > 0, peak, 1.0)
    output_layer = model.layers[-1]
    if not isinstance(output_layer, keras.layers.Dense):
        raise ValueError(f"Grad-CAM expects a Dense output layer, model {model.name!r} ends with {output_layer.name!r}")
    features = last_feature_map(model)
    explainer = keras.Model(model.inputs, [features.tensor, output_layer.input])
    images = np.asarray(images, dtype=np.float32)
    targets = np.ones(len(images), int) if target_class is None else np.asarray(target_class, int)

    crop = _center_crop(model, images.shape[1:3])
    maps = []
    for start in range(0, len(images), MAPS_PER_PASS):
        batch = tf.constant(images[start:start + MAPS_PER_PASS])
        with tf.GradientTape() as tape:
            feature_map, head_inputs = explainer(batch, training=False)
            scores = _class_scores(output_layer, head_inputs, tf.constant(targets[start:start + MAPS_PER_PASS]))
        gradients = tf.cast(tape.gradient(scores, feature_map), tf.float32)
        feature_map = tf.cast(feature_map, tf.float32)  # mixed precision: float16 maps
        channel_weights = tf.reduce_mean(gradients, axis=(1, 2), keepdims=True)
        cam = tf.nn.relu(tf.reduce_sum(channel_weights * feature_map, axis=-1, keepdims=True))
        cam = _to_image(cam, crop, images.shape[1:3])
        peak = tf.reduce_max(cam, axis=(1, 2), keepdims=True)
        maps.append((cam / tf.where(peak > 0, peak, 1.0)).numpy())
    return np.concatenate(maps)



def border_share(maps: np.ndarray, band: float = BORDER_BAND) -> np.ndarray:
    """Per map, the share of its heat in the outer `band` of the image on every side (NaN for a map
    with no heat). A map spread evenly would give 1 - (1 - 2 band)^2 (0.42 at 0.12); a model that
    finds its evidence in corners, markers and collimation edges scores higher."""
    maps = np.asarray(maps, dtype=np.float64)
    height, width = maps.shape[1:3]
    rows, columns = round(height * band), round(width * band)
    total = maps.sum(axis=(1, 2))
    inner = maps[:, rows:height - rows, columns:width - columns].sum(axis=(1, 2))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, 1 - inner / total, np.nan)


def border_audit(model: keras.Model, tfrecords: Path, split: str, predictions: Predictions, threshold: float,
                 seed: int) -> dict[str, float | int]:
    """The shortcut audit of a split (module doc): the mean border share of the Grad-CAM maps of a seeded
    sample of its images, each explaining the class it is predicted at `threshold`."""
    rng = np.random.default_rng(seed)
    count = len(predictions.labels)
    chosen = np.sort(rng.choice(count, size=min(count, AUDITED_IMAGES), replace=False)).tolist()
    images = images_at(tfrecords, split, chosen, [predictions.file_names[index] for index in chosen])
    predicted = (predictions.probabilities[chosen] >= threshold).astype(int)
    shares = border_share(heatmaps(model, images, target_class=predicted))
    band = BORDER_BAND
    return {
        "border_share": float(np.nanmean(shares)) if np.isfinite(shares).any() else float("nan"),
        "border_band": band,
        "border_share_if_uniform": round(1 - (1 - 2 * band) ** 2, 4),
        "border_audit_images": int(np.isfinite(shares).sum()),
    }
