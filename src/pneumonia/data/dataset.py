"""tf.data input from the TFRecords: parallel interleaved reads, parallel decode, prefetch."""

from collections.abc import Callable, Mapping
from functools import partial
from pathlib import Path

import tensorflow as tf

from pneumonia.data.tfrecords import read_meta, shard_names
from pneumonia.paths import join

FEATURES = {
    "image": tf.io.FixedLenFeature([], tf.string),
    "label": tf.io.FixedLenFeature([], tf.int64),
    "patient_id": tf.io.FixedLenFeature([], tf.string),
    "file_name": tf.io.FixedLenFeature([], tf.string),
}
SHUFFLE_BUFFER = 2048
RECORDS_BATCH = 64  # images decoded together when reading image by image


def _shard_by_element() -> tf.data.Options:
    """Under a multi-worker strategy each worker keeps every n-th element (its shard of each batch):
    correct with any number of TFRecord files, also fewer files than workers (FILE sharding is not)."""
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    return options


def shard_paths(tfrecords: Path, split: str) -> list[str]:
    """The split's shard files, for every reader: beside `tfrecords`/meta.json, or under the URI its
    "location" names (tfrecords.uri), which tf.data reads through tf.io.gfile as it does local files."""
    meta = read_meta(tfrecords)
    folder = meta.get("location") or str(tfrecords)
    return [join(folder, name) for name in shard_names(split, meta["splits"][split]["shards"])]


def _batch_decoder(image_size: int):
    """Parses a batch of serialized examples at once: one parse_example and one map_fn a batch took a
    third less process CPU per training image than a parse and a map per image (0.105 vs 0.151 ms at
    128 px), CPU that two cores otherwise take from training (benchmarks/input_vs_compute.py)."""
    def decode(serialized: tf.Tensor) -> dict[str, tf.Tensor]:
        examples = tf.io.parse_example(serialized, FEATURES)
        images = tf.map_fn(partial(tf.io.decode_jpeg, channels=3), examples["image"],  # grey -> 3 equal channels
                           fn_output_signature=tf.uint8)
        images = tf.ensure_shape(images, (None, image_size, image_size, 3))  # static shapes, as TPUs need
        labels = tf.cast(examples["label"], tf.float32)[:, tf.newaxis]
        return {"image": images, "label": labels, "file_name": examples["file_name"]}

    return decode


def _serialized(tfrecords: Path, split: str, shuffle_seed: int | None = None) -> tf.data.Dataset:
    """The split's serialized examples; shuffled (shards and records) when a seed is given."""
    paths = shard_paths(tfrecords, split)
    files = tf.data.Dataset.from_tensor_slices(paths)
    if shuffle_seed is not None:
        files = files.shuffle(len(paths), seed=shuffle_seed)
    dataset = files.interleave(
        tf.data.TFRecordDataset, cycle_length=min(len(paths), 8), num_parallel_calls=tf.data.AUTOTUNE,
        deterministic=True,
    )
    if shuffle_seed is not None:
        dataset = dataset.shuffle(SHUFFLE_BUFFER, seed=shuffle_seed, reshuffle_each_iteration=True)
    return dataset


def _decoded(serialized_batches: tf.data.Dataset, tfrecords: Path) -> tf.data.Dataset:
    return serialized_batches.map(_batch_decoder(read_meta(tfrecords)["image_size"]),
                                  num_parallel_calls=tf.data.AUTOTUNE)


def _images_and_labels(batch: dict[str, tf.Tensor]) -> tuple[tf.Tensor, tf.Tensor]:
    return batch["image"], batch["label"]


def records(tfrecords: Path, split: str) -> tf.data.Dataset:
    """One dict per image ("image", "label", "file_name"), in file order."""
    return _decoded(_serialized(tfrecords, split).batch(RECORDS_BATCH), tfrecords).unbatch()


def split_size(tfrecords: Path, split: str) -> int:
    return read_meta(tfrecords)["splits"][split]["images"]


def _label(serialized: tf.Tensor) -> tf.Tensor:
    return tf.io.parse_single_example(serialized, {"label": FEATURES["label"]})["label"]


def _class_weights(class_weight: Mapping[int, float] | None) -> tf.Tensor:
    """[NORMAL's, PNEUMONIA's] weight, for sample weights gathered by class (1 each without class weights)."""
    return tf.constant([class_weight[0], class_weight[1]] if class_weight else [1.0, 1.0], tf.float32)


def image_key(label: int, file_name: str) -> str:
    """A training image's key among the split's images: its class and file name (names are unique in a class
    folder, not across them). `distilled_targets` makes the same key in the input pipeline."""
    return f"{label}/{file_name}"


def distilled_targets(teacher_probabilities: Mapping[str, float], weight: float,
                      class_weight: Mapping[int, float] | None) -> Callable[[dict], tuple]:
    """Knowledge distillation's targets (Hinton et al. 2015): a decoded batch to (image, target, sample weight)
    with target (1 - weight) x label + weight x the teachers' probability of the image (by `image_key`), and
    the weight of its labelled class: Keras' `class_weight` would round a soft target to a class. Binary
    cross-entropy against this target is (1 - weight) x the labels' loss + weight x the teachers' (temperature 1).
    An image the teachers did not score stops training (an error, not a silent label)."""
    keys = list(teacher_probabilities)
    table = tf.lookup.StaticHashTable(
        tf.lookup.KeyValueTensorInitializer(tf.constant(keys, tf.string),
                                            tf.constant([teacher_probabilities[key] for key in keys], tf.float32)),
        default_value=-1.0)
    weight_of_class = _class_weights(class_weight)

    def targets(batch: dict[str, tf.Tensor]) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
        labels = batch["label"]
        classes = tf.cast(labels[:, 0], tf.int64)
        taught = table.lookup(tf.strings.join([tf.strings.as_string(classes), batch["file_name"]], separator="/"))
        tf.debugging.assert_non_negative(taught, "a training image the teachers did not score")
        return (batch["image"], (1 - weight) * labels + weight * taught[:, tf.newaxis],
                tf.gather(weight_of_class, classes))

    return targets


def training_batches(tfrecords: Path, batch_size: int, seed: int, oversample: bool = False,
                     targets: Callable[[dict], tuple] | None = None) -> tf.data.Dataset:
    """Endless (image, label) batches for fitting: reshuffled each pass, full batches only (static
    shapes); fit takes `split_size // batch_size` steps an epoch. `batch_size` is the global batch.
    `oversample` (train.class_balance): each image drawn from either class with equal chance, so the
    rarer class comes round more often than once a pass (and the model's augmentation makes each
    repeat another image). `targets` makes a decoded batch (image, label, file name) what fit takes:
    (image, label) when None, `distilled_targets` for distillation."""
    serialized = _serialized(tfrecords, "train", shuffle_seed=seed).repeat()
    if oversample:
        by_class = [serialized.filter(lambda example, label=label: tf.equal(_label(example), label))
                    for label in (0, 1)]
        serialized = tf.data.Dataset.sample_from_datasets(by_class, weights=[0.5, 0.5], seed=seed)
    serialized = serialized.batch(batch_size, drop_remainder=True)
    return (
        _decoded(serialized, tfrecords)
        .map(targets or _images_and_labels)
        .prefetch(tf.data.AUTOTUNE)
        .with_options(_shard_by_element())
    )


def mixed_up(batches: tf.data.Dataset, alpha: float, seed: int,
             class_weight: dict[int, float] | None = None, cut: bool = False) -> tf.data.Dataset:
    """Mixup (Zhang et al. 2018) of (image, label) batches into (image, label, sample weight) batches: each
    image blended with the image at the mirrored place of its batch (batches are shuffled), by a share drawn
    from Beta(alpha, alpha) per pair, and its label alike (a sigmoid's (n, 1) or a softmax's one-hot). The
    class weights are blended the same way into each pair's weight: Keras' `class_weight` would round a
    blended label to one class. Reproducible: the draws depend on `seed` and the batch's number only.

    `cut`: CutMix (Yun et al. 2019) instead: a box of the mirrored image, of area 1 - share (clipped at the
    image's edges), pasted at a uniformly drawn centre; the label and weight mixed by the share of the image
    left."""
    weight_of_class = _class_weights(class_weight)

    def mixed(values: tf.Tensor, share: tf.Tensor) -> tf.Tensor:
        return share * values + (1 - share) * tf.reverse(values, axis=[0])

    def pasted(images: tf.Tensor, share: tf.Tensor, centre_seed: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        """The images with a box of their mirrored image each, and the share of each image left."""
        count, height, width = tf.shape(images)[0], tf.shape(images)[1], tf.shape(images)[2]
        side = tf.sqrt(1 - share)  # of the box, as a fraction of each side: its area 1 - share
        centre = tf.random.stateless_uniform([count, 2], seed=centre_seed)

        def inside(size: tf.Tensor, column: int) -> tf.Tensor:  # (count, size): in the box along one axis
            size_f = tf.cast(size, tf.float32)
            low = tf.round((centre[:, column] - side / 2) * size_f)
            high = tf.round((centre[:, column] + side / 2) * size_f)
            positions = tf.cast(tf.range(size), tf.float32)[None]
            return (positions >= low[:, None]) & (positions < high[:, None])

        box = inside(height, 0)[:, :, None] & inside(width, 1)[:, None, :]
        left = 1 - tf.reduce_mean(tf.cast(box, tf.float32), axis=[1, 2])
        return tf.where(box[..., None], tf.reverse(images, axis=[0]), images), left

    def blend(step: tf.Tensor, batch: tuple[tf.Tensor, tf.Tensor]) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
        images, labels = tf.cast(batch[0], tf.float32), batch[1]
        count = tf.shape(images)[0]
        first, second, third = tf.unstack(tf.random.experimental.stateless_split(tf.stack([seed, step]), 3))
        draws = [tf.random.stateless_gamma([count], seed=part, alpha=alpha) for part in (first, second)]
        share = draws[0] / (draws[0] + draws[1])  # Beta(alpha, alpha)
        if cut:
            images, share = pasted(images, share, third)
        else:
            images = mixed(images, share[:, None, None, None])
        classes = tf.cast(labels[:, -1] > 0.5, tf.int32)  # the PNEUMONIA column of either output
        weights = tf.gather(weight_of_class, classes)
        return images, mixed(labels, share[:, None]), mixed(weights, share)

    return batches.enumerate().map(blend, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)


def evaluation_batches(tfrecords: Path, split: str, batch_size: int) -> tf.data.Dataset:
    """(image, label) batches in file order, every image once; decoded once and cached."""
    serialized = (_serialized(tfrecords, split)
                  .apply(tf.data.experimental.assert_cardinality(split_size(tfrecords, split)))
                  .batch(batch_size))
    return (
        _decoded(serialized, tfrecords)
        .map(_images_and_labels)
        .cache()
        .prefetch(tf.data.AUTOTUNE)
        .with_options(_shard_by_element())
    )


def labels_and_names(tfrecords: Path, split: str) -> tuple[list[int], list[str]]:
    labels, names = [], []
    for example in records(tfrecords, split).map(lambda e: (e["label"], e["file_name"])).as_numpy_iterator():
        labels.append(int(example[0][0]))
        names.append(example[1].decode())
    return labels, names
