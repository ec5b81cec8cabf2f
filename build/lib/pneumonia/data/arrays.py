"""A split in memory as arrays, without TensorFlow: the images the TFRecords hold, for Keras under another
backend (benchmarks/gpu_check_jax.py trains the recipe under JAX on a machine that has no TensorFlow).

The tfrecords stage's own resize and JPEG encode (images.resized_jpeg, in worker processes as the stage
runs them), decoded by Pillow. TensorFlow's decoder (data.dataset) uses another IDCT, so a pixel may differ
by a few grey levels from what training under TensorFlow sees (classifier.model_input); the labels and the
order are the manifest's, as in the TFRecords.
"""

import io
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

from pneumonia.data.manifest import read_manifest
from pneumonia.data.tfrecords import encode_in_order
from pneumonia.errors import PipelineError


def split_arrays(manifest: Path, image_size: int, jpeg_quality: int, workers: int = 0) -> tuple[np.ndarray,
                                                                                                   np.ndarray]:
    """The manifest's images as uint8 (n, image_size, image_size, 3), grey in all three channels, and their
    labels as float32 (n, 1), in manifest order (its paths relative to the working directory). `workers`:
    processes that decode the originals, 0 = one per CPU core."""
    records = read_manifest(manifest)
    images = np.empty((len(records), image_size, image_size, 3), np.uint8)
    # spawn: the workers need only PIL, as in tfrecords.write_records
    with ProcessPoolExecutor(workers or os.cpu_count() or 1, mp_context=multiprocessing.get_context("spawn")) as pool:
        encoded = encode_in_order(pool, [record.path for record in records], image_size, jpeg_quality)
        for index, (record, (jpeg, error)) in enumerate(zip(records, encoded)):
            if jpeg is None:
                raise PipelineError(f"{record.path} (in {manifest}) is not a readable image ({error}): "
                                    "prepare the data again")
            images[index] = np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB"))
    return images, np.array([[record.label] for record in records], np.float32)
