"""tf.data input from the TFRecords: parallel interleaved reads, parallel decode, prefetch."""

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


def _decoder(image_size: int):
    def decode(serialized: tf.Tensor) -> dict[str, tf.Tensor]:
        example = tf.io.parse_single_example(serialized, FEATURES)
        image = tf.io.decode_jpeg(example["image"], channels=3)  # grey -> 3 equal channels
        image = tf.ensure_shape(image, (image_size, image_size, 3))  # static shapes, as TPUs need
        label = tf.cast(example["label"], tf.float32)[tf.newaxis]
        return {"image": image, "label": label, "file_name": example["file_name"]}

    return decode


def records(tfrecords: Path, split: str, shuffle_seed: int | None = None) -> tf.data.Dataset:
    """One dict per image; shuffled (shards and records) when a seed is given."""
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
    return dataset.map(_decoder(read_meta(tfrecords)["image_size"]), num_parallel_calls=tf.data.AUTOTUNE)


def split_size(tfrecords: Path, split: str) -> int:
    return read_meta(tfrecords)["splits"][split]["images"]


def training_batches(tfrecords: Path, batch_size: int, seed: int) -> tf.data.Dataset:
    """Endless (image, label) batches for fitting: reshuffled each pass, full batches only (static
    shapes); fit takes `split_size // batch_size` steps an epoch. `batch_size` is the global batch."""
    return (
        records(tfrecords, "train", shuffle_seed=seed)
        .map(lambda example: (example["image"], example["label"]), num_parallel_calls=tf.data.AUTOTUNE)
        .repeat()
        .batch(batch_size, drop_remainder=True)
        .prefetch(tf.data.AUTOTUNE)
        .with_options(_shard_by_element())
    )


def evaluation_batches(tfrecords: Path, split: str, batch_size: int) -> tf.data.Dataset:
    """(image, label) batches in file order, every image once; decoded once and cached."""
    return (
        records(tfrecords, split)
        .apply(tf.data.experimental.assert_cardinality(split_size(tfrecords, split)))
        .map(lambda example: (example["image"], example["label"]), num_parallel_calls=tf.data.AUTOTUNE)
        .batch(batch_size)
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
