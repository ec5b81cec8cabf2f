"""TFRecords on cloud storage (tfrecords.uri): written through tf.io.gfile under a content key,
read back by every reader through meta.json's "location". And the shards' bytes: those of TensorFlow's
own writer, which the local ones are written without.

No gs:// bucket is reachable from the test machines, so the remote filesystems here are
TensorFlow's in-memory ram:// (in-process, reached only through tf.io.gfile) and file:// URIs
(across the processes of the real DVC stages: the end-to-end project of tests/test_pipeline_e2e.py keeps its
shards under one, so its experiments, queued and --temp, read them from there).
"""

import uuid
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from pneumonia import SPLITS
from pneumonia.config import TFRecordsConfig, parse_params
from pneumonia.data import dataset
from pneumonia.data.manifest import read_manifest
from pneumonia.data.tfrecords import (
    content_key,
    read_meta,
    remote_location,
    shard_names,
    write_split,
    write_tfrecords,
)
from pneumonia.errors import PipelineError

IMAGE_SIZE = 48  # as the synthetic_data fixture wrote its local TFRecords
LOCAL_CONFIG = TFRecordsConfig(images_per_shard=16, workers=2)


def decoded(tfrecords: Path, split: str) -> list[tuple[bytes, float, bytes]]:
    return [(example["image"].tobytes(), float(example["label"][0]), example["file_name"])
            for example in dataset.records(tfrecords, split).as_numpy_iterator()]


@pytest.fixture
def in_memory_tfrecords(synthetic_data, tmp_path, monkeypatch) -> tuple[Path, str]:
    """The fixture's manifests written again with tfrecords.uri = ram://<unique>/tfrecords:
    (the local folder with meta.json, the URI)."""
    uri = f"ram://{uuid.uuid4().hex}/tfrecords"
    monkeypatch.chdir(synthetic_data)  # manifest paths are relative to the project root
    write_tfrecords(Path("data/manifests"), tmp_path / "tfrecords", IMAGE_SIZE,
                    LOCAL_CONFIG.model_copy(update={"uri": uri}))
    return tmp_path / "tfrecords", uri


def test_shards_in_memory_filesystem_read_back_like_local_ones(synthetic_data, in_memory_tfrecords):
    remote, uri = in_memory_tfrecords
    local = synthetic_data / "data/tfrecords"
    assert [entry.name for entry in remote.iterdir()] == ["meta.json"]
    meta = read_meta(remote)
    key = content_key(synthetic_data / "data/manifests", IMAGE_SIZE, LOCAL_CONFIG)
    assert meta["location"] == f"{uri}/{key}"
    assert meta["splits"] == read_meta(local)["splits"]

    for split in SPLITS:
        paths = dataset.shard_paths(remote, split)
        assert all(path.startswith(f"{uri}/{key}/{split}-") for path in paths)
        assert sorted(tf.io.gfile.glob(f"{uri}/{key}/{split}-*.tfrecord")) == sorted(paths)
        assert dataset.split_size(remote, split) == dataset.split_size(local, split) > 0
        assert decoded(remote, split) == decoded(local, split)
        assert dataset.labels_and_names(remote, split) == dataset.labels_and_names(local, split)
    assert not tf.io.gfile.glob(f"{uri}/{key}/.*")  # no temporary object left

    [(remote_images, remote_labels)] = dataset.training_batches(remote, 8, seed=3).take(1).as_numpy_iterator()
    [(local_images, local_labels)] = dataset.training_batches(local, 8, seed=3).take(1).as_numpy_iterator()
    np.testing.assert_array_equal(remote_images, local_images)
    np.testing.assert_array_equal(remote_labels, local_labels)


def test_shards_are_the_bytes_tensorflows_writer_writes(synthetic_data, tmp_path):
    """The tfrecords and external stages write shards without TensorFlow: each must be, byte for byte, what
    tf.io.TFRecordWriter writes for the same tf.train.Example messages (serialised deterministically), on a
    local disk as through tf.io.gfile."""
    manifest = read_manifest(synthetic_data / "data/manifests/train.csv")
    records = manifest[:3] + manifest[-2:]
    assert {record.label for record in records} == {0, 1}
    jpegs = [b"", b"\xff\xd8" * 100_000, *(bytes([index]) * (index * 61) for index in range(3))]  # lengths 0 to 200 kB
    uri = f"ram://{uuid.uuid4().hex}/key"
    for out in (tmp_path, uri):
        write_split(records, out, "train", iter((jpeg, "") for jpeg in jpegs), images_per_shard=5)

    def feature(value: bytes | int) -> tf.train.Feature:
        return (tf.train.Feature(bytes_list=tf.train.BytesList(value=[value])) if isinstance(value, bytes) else
                tf.train.Feature(int64_list=tf.train.Int64List(value=[value])))

    expected = tmp_path / "by-tensorflow.tfrecord"
    with tf.io.TFRecordWriter(str(expected)) as writer:
        for record, jpeg in zip(records, jpegs, strict=True):
            features = {"image": jpeg, "label": record.label, "patient_id": record.patient_id.encode(),
                        "file_name": Path(record.path).name.encode()}
            example = tf.train.Example(features=tf.train.Features(feature={
                name: feature(value) for name, value in features.items()}))
            writer.write(example.SerializeToString(deterministic=True))
    [name] = shard_names("train", 1)
    assert (tmp_path / name).read_bytes() == expected.read_bytes()
    with tf.io.gfile.GFile(f"{uri}/{name}", "rb") as remote:
        assert remote.read() == expected.read_bytes()


def test_content_key_follows_the_data_and_encoding(synthetic_data, tmp_path):
    manifests = synthetic_data / "data/manifests"
    key = content_key(manifests, IMAGE_SIZE, LOCAL_CONFIG)
    assert content_key(manifests, IMAGE_SIZE, LOCAL_CONFIG.model_copy(update={"workers": 1})) == key
    assert content_key(manifests, IMAGE_SIZE, LOCAL_CONFIG.model_copy(update={"uri": "gs://b/x"})) == key
    assert content_key(manifests, IMAGE_SIZE + 16, LOCAL_CONFIG) != key
    assert content_key(manifests, IMAGE_SIZE, LOCAL_CONFIG.model_copy(update={"jpeg_quality": 80})) != key
    assert content_key(manifests, IMAGE_SIZE, LOCAL_CONFIG.model_copy(update={"images_per_shard": 8})) != key
    changed = tmp_path / "manifests"
    changed.mkdir()
    for split in SPLITS:
        lines = (manifests / f"{split}.csv").read_text().splitlines(keepends=True)
        (changed / f"{split}.csv").write_text("".join(lines[:-1] if split == "train" else lines))
    assert content_key(changed, IMAGE_SIZE, LOCAL_CONFIG) != key


def test_failed_remote_write_leaves_no_shard_under_a_final_name(synthetic_data):
    records = read_manifest(synthetic_data / "data/manifests/train.csv")[:10]
    encoded = iter([(b"not really a jpeg", "")] * 6 + [(None, "OSError: truncated")])
    folder = f"ram://{uuid.uuid4().hex}/key"
    with pytest.raises(PipelineError, match="not a readable image"):
        write_split(records, folder, "train", encoded, images_per_shard=4)
    # The first shard was complete; the second failed on its third image and left nothing.
    assert tf.io.gfile.glob(f"{folder}/*") == [f"{folder}/train-00000-of-00003.tfrecord"]


def test_unwritable_scheme_stops_before_any_work():
    # TensorFlow 2.21 has no s3:// filesystem (tensorflow-io provided one for older versions).
    with pytest.raises(PipelineError, match=r"tfrecords.uri = 's3://bucket/tfrecords'.*not implemented(.|\n)*gs://"):
        remote_location("s3://bucket/tfrecords", "0123456789abcdef")


@pytest.mark.parametrize("uri", ["/data/tfrecords", "data/tfrecords", "gs:/bucket/x", "gs://", "file:///"])
def test_uri_without_a_scheme_is_refused(uri):
    with pytest.raises(PipelineError, match=r"tfrecords\.uri = .*leave tfrecords\.uri empty"):
        parse_params({"tfrecords": {"uri": uri}})


@pytest.mark.parametrize(("uri", "expected"), [
    ("gs://bucket/pneumonia/tfrecords/", "gs://bucket/pneumonia/tfrecords"), ("file:///tmp/x", "file:///tmp/x"),
    ("", ""), (None, ""),
])
def test_uri_is_normalised(uri, expected):
    assert parse_params({"tfrecords": {"uri": uri}}).tfrecords.uri == expected
