"""A TFRecords split read back: the model's predictions on it, in file order, and its images at given
positions (for the cases shown and the border audit).

TensorFlow is imported only to read and predict, so the metrics code can use `Predictions` without it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import keras


@dataclass(frozen=True)
class Predictions:
    file_names: list[str]
    labels: np.ndarray  # 0 NORMAL, 1 PNEUMONIA
    probabilities: np.ndarray  # of pneumonia
    ood_scores: np.ndarray | None = None  # how unlike the training X-rays (pneumonia.ood), when scored

    @classmethod
    def of(cls, names: list[str], labels: list[int], outputs: np.ndarray) -> Predictions:
        """The model's `outputs` (either head) on the images named `names`, labelled `labels`."""
        return cls(names, np.array(labels, dtype=int), pneumonia_probability(outputs))


def pneumonia_probability(outputs: np.ndarray) -> np.ndarray:
    """One probability of pneumonia per image, from a sigmoid output ([n, 1]) or a softmax one
    over [NORMAL, PNEUMONIA] ([n, 2]): the one place that knows both heads."""
    outputs = np.asarray(outputs)
    return (outputs[:, 1] if outputs.shape[-1] == 2 else outputs.reshape(-1)).astype(float)


def split_predictions(outputs: np.ndarray, tfrecords: Path, split: str) -> Predictions:
    """The model's `outputs` on a TFRecords split's images (in file order) as its Predictions."""
    from pneumonia.data import dataset

    labels, names = dataset.labels_and_names(tfrecords, split)
    return Predictions.of(names, labels, outputs)


def predict_split(model: keras.Model, tfrecords: Path, split: str, batch_size: int) -> Predictions:
    import keras
    from tqdm import tqdm

    from pneumonia.data import dataset

    labels, names = dataset.labels_and_names(tfrecords, split)

    class Progress(keras.callbacks.Callback):  # on stderr, like the other stages' progress
        def on_predict_batch_end(self, batch, logs=None):
            bar.update(min(batch_size, len(labels) - bar.n))

    with tqdm(total=len(labels), desc=f"predicting {split}", unit="img", mininterval=2) as bar:
        outputs = model.predict(dataset.evaluation_batches(tfrecords, split, batch_size), verbose=0,
                                callbacks=[Progress()])
    return Predictions.of(names, labels, outputs)


def images_at(tfrecords: Path, split: str, indices: list[int], names: list[str] | None = None) -> np.ndarray:
    """The split's images at positions `indices` (file order) as uint8 (n, height, width, 3), in the
    order given; `names`, when given, are checked against the records' file names."""
    from pneumonia.data import dataset

    wanted = dict(zip(indices, names or [None] * len(indices)))
    found = {}
    for index, example in enumerate(dataset.records(tfrecords, split).as_numpy_iterator()):
        if index in wanted:
            name = example["file_name"].decode()
            if wanted[index] is not None and name != wanted[index]:
                raise RuntimeError(f"{split} record {index} is {name}, predictions say {wanted[index]}")
            found[index] = example["image"]
            if len(found) == len(wanted):
                break
    return np.stack([found[index] for index in indices]) if indices else np.zeros((0, 1, 1, 3), np.uint8)
