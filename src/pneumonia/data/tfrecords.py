"""The tfrecords stage: each split as sharded TFRecords of resized JPEGs.

Decoding and resizing the originals (up to ~3000 px) is the expensive part, so it runs in a pool
of worker processes; the parent only serialises records and writes shards, in manifest order, so
the same manifests always give the same files.

The shards go to data/tfrecords (the DVC output), or, with tfrecords.uri set, to a folder named by
their content key under that URI (a bucket a TPU can read): data/tfrecords then holds only
meta.json, whose "location" tells the readers (pneumonia.data.dataset.shard_paths) where they are.

Local shards are written without TensorFlow (its import is most of a small stage's time): the records are
tf.train.Example messages serialised by the protobuf runtime, framed as tf.io.TFRecordWriter frames them,
byte for byte its files (tests/test_cloud_storage.py). Only a URI brings in TensorFlow, for tf.io.gfile.
"""

import hashlib
import itertools
import json
import logging
import math
import multiprocessing
import os
import struct
import uuid
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from functools import cache, partial
from pathlib import Path
from typing import BinaryIO

from tqdm import tqdm

from pneumonia import SPLITS
from pneumonia.atomic import atomic_path, write_json
from pneumonia.config import TFRecordsConfig
from pneumonia.data.images import resized_jpegs
from pneumonia.data.manifest import Record, read_manifest
from pneumonia.errors import PipelineError
from pneumonia.paths import join

log = logging.getLogger(__name__)

META = "meta.json"
CHUNK = 8  # images a worker task encodes: amortises the inter-process round trip
IN_FLIGHT = 1024  # images submitted but not yet written: bounds memory whatever the dataset's size
# In the content key: bump when the records' format or the resizing changes, so new shards never
# land on a key whose old shards a committed meta.json still points at.
FORMAT = 1


# tf.train.Example and the messages it holds, as tensorflow/core/example/{example,feature}.proto declare them
# (the fields written here; the field numbers are the wire format), in a pool of their own: no clash with
# TensorFlow's generated classes in a process that has both.
EXAMPLE_PROTO = """
name: "pneumonia/example.proto" package: "tensorflow" syntax: "proto3"
message_type { name: "BytesList" field { name: "value" number: 1 label: LABEL_REPEATED type: TYPE_BYTES } }
message_type { name: "Int64List" field { name: "value" number: 1 label: LABEL_REPEATED type: TYPE_INT64 } }
message_type {
  name: "Feature" oneof_decl { name: "kind" }
  field { name: "bytes_list" number: 1 label: LABEL_OPTIONAL type: TYPE_MESSAGE type_name: ".tensorflow.BytesList"
          oneof_index: 0 }
  field { name: "int64_list" number: 3 label: LABEL_OPTIONAL type: TYPE_MESSAGE type_name: ".tensorflow.Int64List"
          oneof_index: 0 }
}
message_type {
  name: "Features"
  field { name: "feature" number: 1 label: LABEL_REPEATED type: TYPE_MESSAGE
          type_name: ".tensorflow.Features.FeatureEntry" }
  nested_type {
    name: "FeatureEntry" options { map_entry: true }
    field { name: "key" number: 1 label: LABEL_OPTIONAL type: TYPE_STRING }
    field { name: "value" number: 2 label: LABEL_OPTIONAL type: TYPE_MESSAGE type_name: ".tensorflow.Feature" }
  }
}
message_type {
  name: "Example"
  field { name: "features" number: 1 label: LABEL_OPTIONAL type: TYPE_MESSAGE type_name: ".tensorflow.Features" }
}
"""


# The writer's libraries are imported where they are used: readers (read_meta) and pneumonia.data.arrays, which the
# GPU check's JAX mode runs where neither is installed (docs/accelerators.md), need neither.
@cache
def _example_class() -> type:
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory, text_format

    pool = descriptor_pool.DescriptorPool()
    pool.Add(text_format.Parse(EXAMPLE_PROTO, descriptor_pb2.FileDescriptorProto()))
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("tensorflow.Example"))


def _example(record: Record, jpeg: bytes) -> bytes:
    example = _example_class()()
    feature = example.features.feature
    feature["image"].bytes_list.value.append(jpeg)
    feature["label"].int64_list.value.append(record.label)
    feature["patient_id"].bytes_list.value.append(record.patient_id.encode())
    feature["file_name"].bytes_list.value.append(Path(record.path).name.encode())
    # deterministic: the feature map in key order; otherwise its order, hence the shards' bytes, differs
    # between processes, and the same data would never give the same DVC hash.
    return example.SerializeToString(deterministic=True)


def _masked_crc(data: bytes) -> bytes:
    """CRC-32C of `data`, masked as TFRecords store it (tensorflow/core/lib/hash/crc32c.h)."""
    import google_crc32c

    crc = google_crc32c.value(data)
    return struct.pack("<I", (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF)


class RecordWriter:
    """Writes TFRecords to a binary file: each record's length (8 bytes, little-endian), its masked CRC, the
    record and its masked CRC, as tf.io.TFRecordWriter does (uncompressed)."""

    def __init__(self, file: BinaryIO):
        self._file = file

    def write(self, record: bytes) -> None:
        length = struct.pack("<Q", len(record))
        self._file.write(length + _masked_crc(length) + record + _masked_crc(record))


def shard_names(split: str, count: int) -> list[str]:
    return [f"{split}-{index:05d}-of-{count:05d}.tfrecord" for index in range(count)]


def content_key(manifests: Path, image_size: int, config: TFRecordsConfig) -> str:
    """Names the shard folder under tfrecords.uri: the same manifests (which hold every image's
    sha256) and encoding params give the same key, so a rerun rewrites the same objects, and other
    data or params never overwrite shards that another meta.json points at."""
    inputs = {
        "format": FORMAT, "image_size": image_size, "jpeg_quality": config.jpeg_quality,
        "images_per_shard": config.images_per_shard,
        "manifests": {split: hashlib.sha256((manifests / f"{split}.csv").read_bytes()).hexdigest()
                      for split in SPLITS},
    }
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:16]


def remote_location(uri: str, key: str) -> str:
    """`uri`/`key`, created; a PipelineError naming tfrecords.uri when TensorFlow cannot write there,
    before any image is encoded."""
    import tensorflow as tf

    location = join(uri, key)
    try:
        tf.io.gfile.makedirs(location)
    except tf.errors.OpError as exc:
        hint = ("TensorFlow has no s3:// filesystem of its own (tensorflow-io added one to older TensorFlow "
                "versions); use gs://, or leave tfrecords.uri empty for local shards"
                if uri.startswith("s3://") else
                "check that the bucket exists and that this machine's credentials may write to it "
                "(gs://: `gcloud auth application-default login` or GOOGLE_APPLICATION_CREDENTIALS), "
                "or leave tfrecords.uri empty for local shards")
        raise PipelineError(f"params.yaml: tfrecords.uri = {uri!r}: cannot write to {location} "
                            f"({exc.message}).\n{hint}.") from None
    return location


@contextmanager
def _shard_writer(out: Path | str, name: str) -> Iterator:
    """A RecordWriter for shard `name` under `out`.

    `out` a Path: the local temporary folder that atomic_path renames as a whole once complete.
    `out` a URI: a temporary object, renamed to `name` once written, so a killed run never leaves a
    partial shard under a final name (a run killed outright may leave a `.NAME.tmp-*` object behind,
    never read). Shards are written here, in the parent process (the workers only encode JPEGs),
    so in-process filesystems such as TensorFlow's ram:// work too.
    """
    if isinstance(out, Path):
        with open(out / name, "wb") as file:
            yield RecordWriter(file)
        return
    import tensorflow as tf

    temporary = join(out, f".{name}.tmp-{uuid.uuid4().hex[:12]}")
    try:
        with tf.io.gfile.GFile(temporary, "wb") as file:
            yield RecordWriter(file)
        tf.io.gfile.rename(temporary, join(out, name), overwrite=True)
    except BaseException:
        try:
            tf.io.gfile.remove(temporary)
        except tf.errors.OpError:
            pass  # never written, or already gone
        raise


def write_split(records: list[Record], out: Path | str, split: str, encoded: Iterator[tuple[bytes | None, str]],
                images_per_shard: int) -> int:
    """Write `records` (whose encodings `encoded` yields in the same order) into shards under `out`,
    a local folder (Path) or a URI (str)."""
    names = shard_names(split, max(1, math.ceil(len(records) / images_per_shard)))
    pending = iter(records)
    for name in tqdm(names, desc=f"{split} shards", mininterval=2):
        with _shard_writer(out, name) as writer:
            for record in itertools.islice(pending, images_per_shard):
                jpeg, error = next(encoded)
                if jpeg is None:
                    # prepare leaves out files it cannot decode, so this one changed since
                    # (or decodes differently here).
                    raise PipelineError(f"{record.path} is not a readable image ({error}), though prepare could read "
                                        "it: was data/raw changed by hand? Run `dvc repro -f -s download` and retry.")
                writer.write(_example(record, jpeg))
    return len(names)


def encode_in_order(executor: ProcessPoolExecutor, paths: list[str], size: int,
                    quality: int) -> Iterator[tuple[bytes | None, str]]:
    """resized_jpeg of each path, in order, encoded by the executor's worker processes.

    At most IN_FLIGHT images are queued or held at a time, so memory stays flat however large the
    dataset. The first chunks are queued on call, so workers start at once. A worker that dies fails its
    chunk (BrokenProcessPool) instead of hanging the stage.
    """
    # A function of pneumonia.data.images: the workers import only it (PIL), not this module's imports.
    encode = partial(resized_jpegs, size=size, quality=quality)
    chunks = (paths[start:start + CHUNK] for start in range(0, len(paths), CHUNK))
    pending = deque(executor.submit(encode, chunk) for chunk in itertools.islice(chunks, IN_FLIGHT // CHUNK))

    def results() -> Iterator[tuple[bytes | None, str]]:
        while pending:
            done = pending.popleft().result()
            if (chunk := next(chunks, None)) is not None:
                pending.append(executor.submit(encode, chunk))
            yield from done

    return results()


def write_tfrecords(manifests: Path, target: Path, image_size: int, config: TFRecordsConfig) -> dict:
    """Shards of every split into `target` (a local folder), or under tfrecords.uri with only
    meta.json in `target`; meta.json comes last, so it marks complete shards wherever they are."""
    location = remote_location(config.uri, content_key(manifests, image_size, config)) if config.uri else None
    if location is not None:
        log.info("Shards go to %s", location)
    splits = {split: read_manifest(manifests / f"{split}.csv") for split in SPLITS}
    with atomic_path(target, directory=True) as out:
        return write_records(splits, out, image_size, config, location)


def write_records(splits: dict[str, list[Record]], out: Path, image_size: int, config: TFRecordsConfig,
                  location: str | None = None, extra_meta: dict | None = None) -> dict:
    """Shards of each named split of `splits` into the folder `out` (the caller's temporary one), or
    under `location` (a URI) with only meta.json in `out`: the one way images become model input, for
    the pipeline's splits and for an external validation set alike. meta.json comes last."""
    meta: dict = {"image_size": image_size, "splits": {}, **(extra_meta or {})}
    if location is not None:
        meta["location"] = location
    # spawn: workers need only PIL, not a fork of a process that may hold TensorFlow's threads.
    executor = ProcessPoolExecutor(config.workers or os.cpu_count() or 1,
                                   mp_context=multiprocessing.get_context("spawn"))
    with executor:
        for split, records in splits.items():
            encoded = encode_in_order(executor, [record.path for record in records], image_size,
                                      config.jpeg_quality)
            shards = write_split(records, out if location is None else location, split, encoded,
                                 config.images_per_shard)
            meta["splits"][split] = {"images": len(records), "shards": shards}
            log.info("%s: %d images in %d shards", split, len(records), shards)
        write_json(out / META, meta)
    return meta


def read_meta(tfrecords: Path) -> dict:
    """data/tfrecords/meta.json: image size, images and shards per split, and "location", the URI
    of the shard folder when the shards are not beside it (tfrecords.uri)."""
    return json.loads((tfrecords / META).read_text())
