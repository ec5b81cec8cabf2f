"""Class weights from the training manifest, so the rarer NORMAL class counts as much in the loss."""

import numpy as np
from sklearn.utils.class_weight import compute_class_weight

from pneumonia.data.manifest import Record


def class_weights(records: list[Record], method: str) -> dict[int, float]:
    """{label: weight}; 'balanced' is n_samples / (n_classes * n_label), 'none' is all 1."""
    labels = np.array([record.label for record in records])
    if method == "none":
        return {0: 1.0, 1: 1.0}
    weights = compute_class_weight("balanced", classes=np.array([0, 1]), y=labels)
    return {label: float(weight) for label, weight in enumerate(weights)}
