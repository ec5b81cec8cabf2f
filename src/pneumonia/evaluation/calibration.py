"""Calibration of the model's probability of pneumonia: fitted on the validation split by the evaluate
stage (evaluate.calibration), applied wherever the model's probability is read (evaluate, `pneumonia
predict`, the served model), so the probability reported means the same thing from run to run and the
decision threshold is a threshold on it.

Both methods are an affine map of the log-odds, `logit(p') = scale * logit(p) + shift`, with scale > 0:

* temperature: shift 0, scale = 1 / temperature (Guo et al. 2017);
* platt: scale and shift both fitted (Platt 1999).

The map is increasing, so it keeps the ranking (ROC AUC) and, the threshold being chosen on the calibrated
validation probabilities, the operating point: only the numbers change. Each is fitted by maximum likelihood
against Platt's targets, (positives + 1) / (positives + 2) and 1 / (negatives + 2) rather than 1 and 0: a
validation split the model nearly separates (validation ROC AUC ~0.998) would otherwise drive the scale up
without bound, i.e. the probabilities to 0 and 1.

Pure NumPy and SciPy: no TensorFlow, so predict and serving apply it without the evaluation's imports.
`calibration_on_validation` is the evaluate stage's fit, with its error in terms of params.yaml.
"""

import math
from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np
from scipy.special import expit, log_expit, logit

from pneumonia.errors import PipelineError
from pneumonia.evaluation.predictions import Predictions

Method = Literal["none", "temperature", "platt"]
METHODS: tuple[Method, ...] = ("none", "temperature", "platt")
# The model's float32 sigmoid reaches exactly 1.0 (log-odds above ~16.6): probabilities are clipped into
# [smallest float32, 1 - 2**-26] before taking log-odds, so 1.0 is just above the largest float32 below it
# (1 - 2**-24) and every probability a float32 model gives keeps its rank.
LOWEST, HIGHEST = float(np.finfo(np.float32).tiny), 1 - 2.0**-26


def log_odds(probabilities) -> np.ndarray:
    return logit(np.clip(np.asarray(probabilities, dtype=float), LOWEST, HIGHEST))


@dataclass(frozen=True)
class Calibration:
    """`logit(p') = scale * logit(p) + shift`: the parameters the evaluate stage stores with the threshold."""

    method: Method = "none"
    scale: float = 1.0
    shift: float = 0.0

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"calibration method {self.method!r} is not one of {', '.join(METHODS)}")
        if not (math.isfinite(self.scale) and self.scale > 0 and math.isfinite(self.shift)):
            raise ValueError(f"calibration scale must be a positive number and shift a finite one, "
                             f"got scale {self.scale!r}, shift {self.shift!r}")

    def apply(self, probabilities) -> np.ndarray:
        """The calibrated probabilities of pneumonia (float64, same shape)."""
        probabilities = np.asarray(probabilities, dtype=float)
        if self.method == "none":
            return probabilities
        return expit(self.scale * log_odds(probabilities) + self.shift)

    def uncalibrated(self, threshold: float) -> float:
        """The threshold on the model's own probability that `threshold` on the calibrated one is (the inverse
        map): for what reads the model's output directly, e.g. self-training's pseudo-labels."""
        if self.method == "none" or threshold in (0, 1):
            return threshold
        return float(expit((logit(threshold) - self.shift) / self.scale))

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any] | None) -> "Calibration":
        """The calibration `as_dict` wrote; None (a model evaluated before calibration existed): none."""
        if values is None:
            return UNCALIBRATED
        return cls(method=values["method"], scale=float(values["scale"]), shift=float(values["shift"]))


UNCALIBRATED = Calibration()  # the model's own probability: models evaluated before calibration, method none


def fit_calibration(method: Method, labels, probabilities) -> "Calibration":
    """The calibration of `method` that best explains the 0/1 `labels` by the model's `probabilities` (the
    validation split's): maximum likelihood against Platt's targets (module doc). Both classes needed."""
    if method == "none":
        return UNCALIBRATED
    labels = np.asarray(labels, dtype=int)
    positives, negatives = int(labels.sum()), int(len(labels) - labels.sum())
    if not positives or not negatives:
        raise ValueError("calibration needs both NORMAL (0) and PNEUMONIA (1) cases")
    targets = np.where(labels == 1, (positives + 1) / (positives + 2), 1 / (negatives + 2))
    model_log_odds = log_odds(probabilities)

    def negative_log_likelihood(parameters: np.ndarray) -> float:
        log_scale, shift = parameters[0], (parameters[1] if method == "platt" else 0.0)
        fitted = np.exp(log_scale) * model_log_odds + shift  # exp: the scale stays positive, the map increasing
        return float(-(targets * log_expit(fitted) + (1 - targets) * log_expit(-fitted)).sum())

    from scipy.optimize import minimize  # here: its import is a third of a one-image `pneumonia predict`'s time

    start = np.zeros(2 if method == "platt" else 1)
    found = minimize(negative_log_likelihood, start, method="L-BFGS-B")
    return Calibration(method, scale=float(np.exp(found.x[0])), shift=float(found.x[1]) if method == "platt" else 0.0)


def calibration_on_validation(val: Predictions, method: Method) -> Calibration:
    """The calibration of `method` (evaluate.calibration) fitted on the validation predictions."""
    try:
        return fit_calibration(method, val.labels, val.probabilities)
    except ValueError as exc:
        raise PipelineError(
            f"params.yaml: evaluate.calibration = {method!r} cannot be fitted on the validation split "
            f"({exc}). Use `-S evaluate.calibration=none` or a validation split with both classes (data.val_fraction)."
        ) from None
