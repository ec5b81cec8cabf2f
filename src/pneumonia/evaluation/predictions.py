"""Model predictions on a TFRecords split, in file order."""

from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np

from pneumonia.data import dataset


@dataclass(frozen=True)
class Predictions:
    file_names: list[str]
    labels: np.ndarray  # 0 NORMAL, 1 PNEUMONIA
    probabilities: np.ndarray  # of pneumonia


def predict_split(model: keras.Model, tfrecords: Path, split: str, batch_size: int) -> Predictions:
    labels, names = dataset.labels_and_names(tfrecords, split)
    probabilities = model.predict(dataset.evaluation_batches(tfrecords, split, batch_size), verbose=0)
    return Predictions(names, np.array(labels, dtype=int), probabilities.reshape(-1).astype(float))
