"""The test images shown in the report: a few of each outcome, read back from the TFRecords.

Errors are the most confident ones (what most needs a radiologist's look); correct answers are
drawn at random (what the model typically gets right), reproducibly from the seed.
"""

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pneumonia import CLASS_NAMES
from pneumonia.evaluation.predictions import Predictions

# (name, actual label, predicted label), in the order the figures show them.
OUTCOMES = (
    ("true positive", 1, 1),
    ("false negative", 1, 0),
    ("true negative", 0, 0),
    ("false positive", 0, 1),
)


@dataclass(frozen=True)
class Case:
    index: int  # position in the split, in file order
    file_name: str
    label: int
    predicted: int
    probability: float  # of pneumonia
    outcome: str

    @property
    def caption(self) -> str:
        return (f"{self.outcome}\ntrue {CLASS_NAMES[self.label]}, predicted {CLASS_NAMES[self.predicted]}\n"
                f"p(pneumonia) = {self.probability:.3f}")


def pick_cases(predictions: Predictions, threshold: float, per_outcome: int, seed: int) -> list[Case]:
    """Up to `per_outcome` cases of each outcome at `threshold`, outcome by outcome."""
    predicted = (predictions.probabilities >= threshold).astype(int)
    rng = np.random.default_rng(seed)
    cases = []
    for outcome, label, guess in OUTCOMES:
        members = np.flatnonzero((predictions.labels == label) & (predicted == guess))
        if label != guess:  # most confidently wrong first
            confidence = np.abs(predictions.probabilities[members] - threshold)
            chosen = members[np.argsort(-confidence, kind="stable")[:per_outcome]]
        else:
            chosen = np.sort(rng.choice(members, size=min(per_outcome, len(members)), replace=False))
        cases += [Case(int(i), predictions.file_names[i], label, guess, float(predictions.probabilities[i]), outcome)
                  for i in chosen]
    return cases


def load_images(tfrecords: Path, split: str, cases: list[Case]) -> np.ndarray:
    """The images of `cases` as uint8 (n, height, width, 3), in the order of `cases`."""
    return images_at(tfrecords, split, [case.index for case in cases], [case.file_name for case in cases])


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
