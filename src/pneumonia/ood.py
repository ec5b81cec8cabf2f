"""How unlike the training X-rays an image is: the out-of-distribution (OOD) score and its flag.

The score adds two Mahalanobis distances (Lee et al., NeurIPS 2018), each to a Gaussian fitted on the
training split with a Ledoit-Wolf shrunk covariance (scikit-learn):

* layout: the model's input image as a 16 x 16 greyscale thumbnail, standardised per image. Frontal chest
  X-rays share one layout (two dark lungs, the mediastinum between them, the diaphragm below); other body
  parts, CT and MR slices, documents, photographs, rotated, inverted, cropped or padded images do not.
* features: the model's last convolutional feature map, globally average-pooled (the pooling layer's
  output; each member's, side by side, for an ensemble): textures and contents the network never saw.

Each distance is divided by its median on validation images and the score is the sum of their squares,
so neither term dominates by its dimension. The flag is set above the score's quantile on validation
images (evaluate.ood_flagged: the share of them flagged). Why these two and not the penultimate layer
alone, and what each catches: docs/decisions.md "Out-of-distribution score", measured in
benchmarks/ood.md.

Ledoit-Wolf, not the sample covariance: 256 dimensions from a few hundred images is singular
without shrinkage (Anthony & Kamnitsas 2023 found shrunk Mahalanobis on pooled features the most
reliable OOD score for medical images among those that need no outlier data).

A mirrored X-ray (left and right swapped: a flipped export, a film scanned from the back, or dextrocardia)
has the layout of one and is not flagged by the score, yet a model trained without flips reads it worse
(docs/reliability.md). The mirror check (MirrorCheck) flags it: a linear discriminant on the layout
thumbnail's left-right asymmetry, fitted on the training images against their own mirror images.

A blurred X-ray (enlarged from a smaller image, out of focus) or a noisy one also keeps the layout and the
features of one, yet the model reads blur as opacity: blurred, another site's normal X-rays were called
pneumonia (docs/reliability.md). The detail check (DetailCheck) flags an image whose fine detail, relative to
its contrast, lies outside the training images'.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import keras

THUMBNAIL = 16  # pixels a side of the layout thumbnail
METHOD = "mahalanobis: layout thumbnail 16x16 + pooled features (Ledoit-Wolf), validation-normalised sum of squares"


def area_weights(size: int) -> np.ndarray:
    """(THUMBNAIL, size): the share of each of `size` pixels in each thumbnail pixel along one axis, as TensorFlow's
    area resize (tf.image.resize(method="area")) weighs them: the length of their spans' overlap over a thumbnail
    pixel's span."""
    span = size / THUMBNAIL
    starts = np.arange(THUMBNAIL)[:, None] * span
    pixels = np.arange(size)[None, :]
    return np.clip(np.minimum(starts + span, pixels + 1) - np.maximum(starts, pixels), 0, None) / span


def layout(images: np.ndarray) -> np.ndarray:
    """(n, THUMBNAIL**2): each model input image (uint8 or float, (n, h, w, 3)) as a greyscale thumbnail
    (box-averaged), standardised to zero mean and unit variance; a blank image is all zeros."""
    images = np.asarray(images)
    count, height, width, channels = images.shape
    if height % THUMBNAIL or width % THUMBNAIL:  # thumbnail pixels straddle image pixels: weighed by their overlap
        grey = images.astype(np.float64).mean(axis=-1)
        thumbnails = area_weights(height) @ grey @ area_weights(width).T
    else:  # the same box average, summed in integers: ten times faster than float means, beside each prediction
        blocks = images.reshape(count, THUMBNAIL, height // THUMBNAIL, THUMBNAIL, width // THUMBNAIL, channels)
        summed = blocks.sum(axis=(2, 4, 5), dtype=np.uint64 if images.dtype.kind in "ui" else np.float64)
        thumbnails = summed.astype(np.float32) / (height * width * channels / THUMBNAIL**2)
    thumbnails = thumbnails.reshape(count, -1)
    centred = thumbnails - thumbnails.mean(axis=1, keepdims=True)
    # 1% of the grey range: a near-constant image stays near zero instead of amplifying its noise
    return centred / (centred.std(axis=1, keepdims=True) + 2.55)


def pooled_features_model(model: keras.Model) -> keras.Model:
    """The model with two outputs: its own output and its pooled last feature map (each member's, side by
    side, for an ensemble of models.build.ensemble_of), in one forward pass."""
    import keras

    from pneumonia.models.build import members_of

    def tapped(single: keras.Model) -> keras.Model:
        pooling = [layer for layer in single.layers if isinstance(layer, keras.layers.GlobalAveragePooling2D)]
        if len(pooling) != 1:
            raise ValueError(f"model {single.name!r} has {len(pooling)} global pooling layers, not 1: the "
                             "out-of-distribution score needs the pooled feature map of models.build")
        return keras.Model(single.input, [single.output, pooling[0].output], name=f"{single.name}_features")

    members = members_of(model)
    if not members:
        return tapped(model)
    inputs = keras.Input(model.input_shape[1:], name="image")
    outputs = [tapped(member)(inputs) for member in members]
    return keras.Model(inputs, [keras.layers.Average(dtype="float32")([output for output, _ in outputs]),
                                keras.layers.Concatenate(dtype="float32")([pooled for _, pooled in outputs])],
                       name=f"{model.name}_features")


@dataclass(frozen=True)
class Gaussian:
    """A Gaussian fitted on training vectors; distances are divided by `scale` (their median on validation)."""

    mean: np.ndarray
    precision: np.ndarray
    scale: float = 1.0

    @classmethod
    def fit(cls, vectors: np.ndarray) -> Gaussian:
        from sklearn.covariance import LedoitWolf

        fitted = LedoitWolf().fit(np.asarray(vectors, dtype=np.float64))
        return cls(fitted.location_, fitted.precision_)

    def distance(self, vectors: np.ndarray) -> np.ndarray:
        centred = np.asarray(vectors, dtype=np.float64) - self.mean
        # einsum's own loop, not BLAS: a 32 x 256 by 256 x 256 product is ~1 ms either way, but multi-threaded
        # BLAS beside TensorFlow's threads on a busy CPU took 30-70 ms, more than the forward pass
        squared = np.einsum("ij,ij->i", np.einsum("ij,jk->ik", centred, self.precision, optimize=False), centred)
        return np.sqrt(np.maximum(squared, 0)) / self.scale


def asymmetry(thumbnails: np.ndarray) -> np.ndarray:
    """(n, THUMBNAIL**2 / 2): each layout thumbnail minus its mirror image, left half (the right half is its
    negative). Mirroring an image negates it."""
    grids = np.asarray(thumbnails, dtype=np.float64).reshape(-1, THUMBNAIL, THUMBNAIL)
    return (grids - grids[:, :, ::-1])[:, :, :THUMBNAIL // 2].reshape(len(grids), -1)


@dataclass(frozen=True)
class MirrorCheck:
    """Is an X-ray mirrored left to right? Linear discriminant analysis between the training images'
    asymmetries (Gaussian, mean m, Ledoit-Wolf covariance S) and their mirror images' (mean -m, the same S):
    the log-odds of "as the training X-rays" against "mirrored" is x' 2 S^-1 m, with no intercept, and is
    exactly negated by mirroring the image. An image is flagged below 0, where mirrored is the likelier."""

    direction: np.ndarray  # 2 S^-1 m

    @classmethod
    def fit(cls, thumbnails: np.ndarray) -> MirrorCheck:
        from sklearn.covariance import LedoitWolf

        fitted = LedoitWolf().fit(asymmetry(thumbnails))
        return cls(2 * fitted.precision_ @ fitted.location_)

    def log_odds(self, thumbnails: np.ndarray) -> np.ndarray:
        """Of each image being as the training X-rays rather than mirrored: negative for a mirrored-looking one."""
        return asymmetry(thumbnails) @ self.direction

    def mirrored(self, thumbnails: np.ndarray) -> np.ndarray:
        return self.log_odds(thumbnails) < 0


def fine_detail(images: np.ndarray) -> np.ndarray:
    """(n,): each model input image's fine detail, as a natural log: the mean absolute response of Immerkaer's
    noise-estimation mask (a difference of two Laplacians, 3 x 3: blind to flat areas and linear gradients; Immerkaer,
    CVIU 1996) over the grey image, divided by the image's standard deviation, so that brightness and contrast
    do not move it. Blur and enlargement lower it, noise raises it."""
    return np.array([_fine_detail(image) for image in np.asarray(images)], dtype=np.float64).reshape(-1)


def _fine_detail(image: np.ndarray) -> float:
    # An image at a time, its channels added one by one: on a batch at once the large temporaries took a few
    # times as long to allocate as to compute (measured beside each prediction).
    grey = image[..., 0].astype(np.float32)
    for channel in range(1, image.shape[-1]):
        grey += image[..., channel]
    grey /= image.shape[-1]
    # the mask is the outer product of [1, -2, 1] with itself: a second difference down, then across
    down = grey[:-2] - 2 * grey[1:-1] + grey[2:]
    response = float(np.abs(down[:, :-2] - 2 * down[:, 1:-1] + down[:, 2:]).mean())
    # 1% of the grey range, as in layout: a blank image has no detail to speak of, not a division by zero
    return np.log(response + 1e-3) - np.log(float(grey.std()) + 2.55)


DETAIL_SPREAD = 3.0  # the detail check's band: the training images' median, plus or minus this many robust sds


@dataclass(frozen=True)
class DetailCheck:
    """Is an image blurred or noisy beyond the training X-rays? fine_detail outside the band of the training images'
    median plus or minus DETAIL_SPREAD robust standard deviations (1.4826 median absolute deviations: the extreme
    quantiles of a few hundred images moved with the few softest of them). Measured on the model's input image, so
    it is what the model sees: a large X-ray blurred by a few of its own pixels is not flagged, an enlarged
    thumbnail is. What it catches, and at what cost: docs/decisions.md "Detail check"."""

    low: float
    high: float

    @classmethod
    def fit(cls, detail: np.ndarray) -> DetailCheck:
        median = float(np.median(detail))
        spread = DETAIL_SPREAD * 1.4826 * float(np.median(np.abs(np.asarray(detail) - median)))
        return cls(median - spread, median + spread)

    def blurred(self, detail: np.ndarray) -> np.ndarray:
        return np.asarray(detail) < self.low

    def noisy(self, detail: np.ndarray) -> np.ndarray:
        return np.asarray(detail) > self.high


@dataclass(frozen=True)
class OodReference:
    """What the score needs of the training and validation images: the Gaussians are stored with the model
    (<model>.ood.npz), the threshold in its settings (<model>.json, beside the validation share it flags)."""

    layout: Gaussian
    features: Gaussian
    threshold: float  # a score above it is flagged
    mirror: MirrorCheck | None = None  # None in a bundle written before the check (it flags nothing)
    detail: DetailCheck | None = None  # likewise

    def scores(self, thumbnails: np.ndarray, features: np.ndarray) -> np.ndarray:
        return self.layout.distance(thumbnails) ** 2 + self.features.distance(features) ** 2

    def mirrored(self, thumbnails: np.ndarray) -> np.ndarray:
        """Which images the mirror check flags (none without one)."""
        return np.zeros(len(thumbnails), bool) if self.mirror is None else self.mirror.mirrored(thumbnails)

    def save(self, path: Path) -> None:
        from pneumonia import atomic

        arrays = {f"{part}_{name}": getattr(getattr(self, part), name)
                  for part in ("layout", "features") for name in ("mean", "precision", "scale")}
        if self.mirror is not None:
            arrays["mirror_direction"] = self.mirror.direction
        if self.detail is not None:
            arrays["detail_band"] = np.array([self.detail.low, self.detail.high])
        with atomic.atomic_path(path) as temporary, open(temporary, "wb") as file:
            np.savez(file, **arrays)

    @classmethod
    def load(cls, path: Path, threshold: float) -> OodReference:
        with np.load(path) as stored:
            parts = {part: Gaussian(stored[f"{part}_mean"], stored[f"{part}_precision"],
                                    float(stored[f"{part}_scale"])) for part in ("layout", "features")}
            mirror = MirrorCheck(stored["mirror_direction"]) if "mirror_direction" in stored else None
            detail = DetailCheck(*map(float, stored["detail_band"])) if "detail_band" in stored else None
        return cls(**parts, threshold=threshold, mirror=mirror, detail=detail)


def fit(train: tuple[np.ndarray, np.ndarray], validation: tuple[np.ndarray, np.ndarray],
        flagged: float, train_detail: np.ndarray | None = None) -> OodReference:
    """The reference from (thumbnails, features) of training images, each distance scaled by its median on
    validation images, the flag above the validation scores' 1 - `flagged` quantile; the mirror check fitted on
    the training thumbnails, the detail check on the training images' fine_detail (none without it)."""
    scaled = {}
    for part, fitted_on, scaled_on in zip(("layout", "features"), train, validation):
        gaussian = Gaussian.fit(fitted_on)
        scaled[part] = Gaussian(gaussian.mean, gaussian.precision, float(np.median(gaussian.distance(scaled_on))))
    unthresholded = OodReference(**scaled, threshold=np.inf)
    return OodReference(**scaled, threshold=float(np.quantile(unthresholded.scores(*validation), 1 - flagged)),
                        mirror=MirrorCheck.fit(train[0]),
                        detail=None if train_detail is None else DetailCheck.fit(train_detail))


MAX_FITTED_IMAGES = 5000  # training images the Gaussians are fitted on: all of Kaggle's 5,216 but a few


def split_outputs(features_model: keras.Model, tfrecords: Path, split: str, batch_size: int,
                  limit: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(the model's outputs, thumbnails, pooled features, fine detail) of a TFRecords split's images in file
    order, at most `limit` of them, in one forward pass; `features_model` is pooled_features_model's."""
    from pneumonia.data.dataset import evaluation_batches

    outputs, thumbnails, features, detail, seen = [], [], [], [], 0
    for images, _ in evaluation_batches(tfrecords, split, batch_size):
        if limit is not None and seen >= limit:
            break
        images = images.numpy()
        thumbnails.append(layout(images))
        detail.append(fine_detail(images))
        output, pooled = features_model.predict_on_batch(images)
        outputs.append(output)
        features.append(pooled)
        seen += len(images)
    return tuple(np.concatenate(parts)[:limit] for parts in (outputs, thumbnails, features, detail))


def split_inputs(features_model: keras.Model, tfrecords: Path, split: str, batch_size: int,
                 limit: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(thumbnails, pooled features) of split_outputs: what `Reference` fits and scores."""
    _, thumbnails, features, _ = split_outputs(features_model, tfrecords, split, batch_size, limit)
    return thumbnails, features
