"""Class weights from the training manifest, so the rarer NORMAL class counts as much in the loss."""

import json
from pathlib import Path

import numpy as np
from sklearn.utils.class_weight import compute_class_weight

from pneumonia.data.manifest import Record


def class_weights(records: list[Record], class_balance: str) -> dict[int, float]:
    """{label: weight}; train.class_balance 'weights' is n_samples / (n_classes * n_label), else all 1
    (oversampling balances the batches instead: pneumonia.data.dataset.training_batches)."""
    labels = np.array([record.label for record in records])
    if class_balance != "weights":
        return {0: 1.0, 1: 1.0}
    weights = compute_class_weight("balanced", classes=np.array([0, 1]), y=labels)
    return {label: float(weight) for label, weight in enumerate(weights)}


def read_class_weights(path: Path) -> dict[int, float]:
    """The {label: weight} the class_weights stage wrote to `path` (JSON keys are strings)."""
    return {int(label): weight for label, weight in json.loads(path.read_text()).items()}
