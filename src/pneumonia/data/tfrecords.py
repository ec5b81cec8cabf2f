"""The tfrecords stage: each split as sharded TFRecords of resized JPEGs.

Decoding and resizing the originals (up to ~3000 px) is the expensive part, so it runs in a pool
of worker processes; the parent only serialises records and writes shards, in manifest order, so
the same manifests always give the same files.
"""

import itertools
import json
import logging
import math
import multiprocessing
import os
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from functools import partial
from pathlib import Path

from tqdm import tqdm

from pneumonia import SPLITS
from pneumonia.atomic import atomic_path, write_json
from pneumonia.config import TFRecordsConfig
from pneumonia.data.images import resized_jpegs
from pneumonia.data.manifest import Record, read_manifest
from pneumonia.errors import PipelineError

log = logging.getLogger(__name__)

META = "meta.json"
CHUNK = 8  # images a worker task encodes: amortises the inter-process round trip
IN_FLIGHT = 1024  # images submitted but not yet written: bounds memory whatever the dataset's size


def _example(record: Record, jpeg: bytes) -> bytes:
    import tensorflow as tf

    def _bytes(value: bytes) -> tf.train.Feature:
        return tf.train.Feature(bytes_list=tf.train.BytesList(value=[value]))

    features = {
        "image": _bytes(jpeg),
        "label": tf.train.Feature(int64_list=tf.train.Int64List(value=[record.label])),
        "patient_id": _bytes(record.patient_id.encode()),
        "file_name": _bytes(Path(record.path).name.encode()),
    }
    return tf.train.Example(features=tf.train.Features(feature=features)).SerializeToString()


def shard_names(split: str, count: int) -> list[str]:
    return [f"{split}-{index:05d}-of-{count:05d}.tfrecord" for index in range(count)]


def write_split(records: list[Record], out: Path, split: str, encoded: Iterator[tuple[bytes | None, str]],
                images_per_shard: int) -> int:
    """Write `records` (whose encodings `encoded` yields in the same order) into shards under `out`."""
    import tensorflow as tf

    names = shard_names(split, max(1, math.ceil(len(records) / images_per_shard)))
    pending = iter(records)
    for index, name in enumerate(tqdm(names, desc=f"{split} shards", mininterval=2)):
        with tf.io.TFRecordWriter(str(out / name)) as writer:
            for record in itertools.islice(pending, images_per_shard):
                jpeg, error = next(encoded)
                if jpeg is None:
                    # prepare leaves out files it cannot decode, so this one changed since (or decodes differently here).
                    raise PipelineError(f"{record.path} is not a readable image ({error}), though prepare could read "
                                        "it: was data/raw changed by hand? Run `dvc repro -f -s download` and retry.")
                writer.write(_example(record, jpeg))
    return len(names)


def encode_in_order(executor: ProcessPoolExecutor, paths: list[str], size: int,
                    quality: int) -> Iterator[tuple[bytes | None, str]]:
    """resized_jpeg of each path, in order, encoded by the executor's worker processes.

    At most IN_FLIGHT images are queued or held at a time, so memory stays flat however large the
    dataset. The first chunks are queued on call, so workers start while the writer imports
    TensorFlow. A worker that dies fails its chunk (BrokenProcessPool) instead of hanging the stage.
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
    meta: dict = {"image_size": image_size, "splits": {}}
    # spawn: workers need only PIL, not a fork of a process that may hold TensorFlow's threads.
    executor = ProcessPoolExecutor(config.workers or os.cpu_count() or 1, mp_context=multiprocessing.get_context("spawn"))
    with executor, atomic_path(target, directory=True) as out:
        for split in SPLITS:
            records = read_manifest(manifests / f"{split}.csv")
            encoded = encode_in_order(executor, [record.path for record in records], image_size,
                                      config.jpeg_quality)
            shards = write_split(records, out, split, encoded, config.images_per_shard)
            meta["splits"][split] = {"images": len(records), "shards": shards}
            log.info("%s: %d images in %d shards", split, len(records), shards)
        write_json(out / META, meta)
    return meta


def read_meta(tfrecords: Path) -> dict:
    return json.loads((tfrecords / META).read_text())
