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
"""

from dataclasses import dataclass

import keras
import numpy as np
import tensorflow as tf

BATCH_SIZE = 16


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


def _class_scores(output_layer: keras.layers.Dense, head_inputs, target_class: tf.Tensor):
    """The logit of `target_class` (0 NORMAL, 1 PNEUMONIA) for each image."""
    logits = tf.matmul(tf.cast(head_inputs, tf.float32), output_layer.kernel) + output_layer.bias
    if logits.shape[-1] == 1:  # sigmoid: the logit of PNEUMONIA; NORMAL is its negative
        return logits[:, 0] * tf.where(target_class == 1, 1.0, -1.0)
    return tf.gather(logits, target_class, axis=1, batch_dims=1)  # softmax over [NORMAL, PNEUMONIA]


def heatmaps(model: keras.Model, images: np.ndarray, target_class: np.ndarray | None = None) -> np.ndarray:
    """Grad-CAM maps in [0, 1], shape (n, height, width) of `images` ([0, 255], (n, h, w, 3)).

    `target_class` (0 NORMAL / 1 PNEUMONIA per image) is the class explained; PNEUMONIA by default.
    """
    output_layer = model.layers[-1]
    if not isinstance(output_layer, keras.layers.Dense):
        raise ValueError(f"Grad-CAM expects a Dense output layer, model {model.name!r} ends with {output_layer.name!r}")
    features = last_feature_map(model)
    explainer = keras.Model(model.inputs, [features.tensor, output_layer.input])
    images = np.asarray(images, dtype=np.float32)
    targets = np.ones(len(images), int) if target_class is None else np.asarray(target_class, int)

    maps = []
    for start in range(0, len(images), BATCH_SIZE):
        batch = tf.constant(images[start:start + BATCH_SIZE])
        with tf.GradientTape() as tape:
            feature_map, head_inputs = explainer(batch, training=False)
            scores = _class_scores(output_layer, head_inputs, tf.constant(targets[start:start + BATCH_SIZE]))
        gradients = tf.cast(tape.gradient(scores, feature_map), tf.float32)
        feature_map = tf.cast(feature_map, tf.float32)  # mixed precision: float16 maps
        channel_weights = tf.reduce_mean(gradients, axis=(1, 2), keepdims=True)
        cam = tf.nn.relu(tf.reduce_sum(channel_weights * feature_map, axis=-1, keepdims=True))
        cam = tf.image.resize(cam, images.shape[1:3], method="bilinear")[..., 0]
        peak = tf.reduce_max(cam, axis=(1, 2), keepdims=True)
        maps.append((cam / tf.where(peak > 0, peak, 1.0)).numpy())
    return np.concatenate(maps)
