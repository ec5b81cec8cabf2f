"""pneumonia.data.arrays: a split in memory without TensorFlow, as the GPU check's JAX mode reads the sample."""

import json
from pathlib import Path

import numpy as np

from pneumonia.data import dataset
from pneumonia.data.arrays import split_arrays
from pneumonia.data.manifest import read_manifest


def test_split_arrays_are_the_tfrecords_images_and_labels_in_manifest_order(synthetic_data, monkeypatch):
    """The tfrecords stage's images, to the rounding of another JPEG decoder (Pillow's IDCT, not TensorFlow's)."""
    monkeypatch.chdir(synthetic_data)  # the manifest's paths are relative to the project
    size = json.loads(Path("data/tfrecords/meta.json").read_text())["image_size"]
    images, labels = split_arrays(Path("data/manifests/train.csv"), size, jpeg_quality=95, workers=2)

    records = read_manifest(Path("data/manifests/train.csv"))
    assert images.dtype == np.uint8 and images.shape == (len(records), size, size, 3)
    assert labels.dtype == np.float32 and labels[:, 0].tolist() == [record.label for record in records]
    assert (images[..., 0] == images[..., 2]).all()  # grey in all three channels, as decode_jpeg(channels=3)
    by_name = {example["file_name"].decode(): example
               for example in dataset.records(Path("data/tfrecords"), "train").as_numpy_iterator()}
    assert len(by_name) == len(records)
    for image, label, record in zip(images, labels, records):
        example = by_name[Path(record.path).name]
        assert label[0] == example["label"][0]
        difference = np.abs(image.astype(int) - example["image"].astype(int))
        assert difference.mean() < 2 and difference.max() <= 16, record.path
