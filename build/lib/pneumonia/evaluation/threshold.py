"""Where the threshold is chosen: the operating point (pneumonia when p(pneumonia) >= threshold) that the
evaluate.threshold rule picks on the validation split's calibrated probabilities, never on test or the
external set. The rule's forms are checked in pneumonia.threshold_rule, below the params schema; they are
applied here.
"""

import math

import numpy as np
from sklearn.metrics import roc_curve

from pneumonia.errors import PipelineError
from pneumonia.evaluation.metrics import check_inputs, require_both_classes
from pneumonia.evaluation.predictions import Predictions
from pneumonia.threshold_rule import SENSITIVITY_PREFIX, parse_threshold_rule


def choose_threshold(y_true, y_prob, rule) -> float:
    """Turn a threshold rule into a probability threshold (predict positive if prob >= it).

    * number in (0, 1): returned as is.
    * "youden": the ROC point maximising sensitivity + specificity - 1; among ties the
      one with the fewest false alarms, so the result is deterministic.
    * "sensitivity@X": the ROC point with the best specificity whose sensitivity is >= X.

    A ROC point is reached by any threshold between the lowest score it calls positive
    and the next lower score (see `_midway_below`): the threshold returned is halfway
    between them, so applying it to the same data reproduces the chosen point exactly.
    """
    rule = parse_threshold_rule(rule)
    if isinstance(rule, float):
        return rule
    y_true, y_prob = check_inputs(y_true, y_prob)
    require_both_classes(y_true, f"threshold rule {rule!r}")

    # Keep every distinct score as a candidate, highest first; drop sklearn's leading
    # +inf ("predict nobody positive"), which is not a usable threshold.
    fpr, tpr, thresholds = roc_curve(y_true, y_prob, drop_intermediate=False)
    fpr, tpr, thresholds = fpr[1:], tpr[1:], thresholds[1:]

    if rule == "youden":
        # Compare J on integer counts (tp*N - fp*P) so float rounding cannot break ties.
        n_pos, n_neg = y_true.sum(), len(y_true) - y_true.sum()
        tp, fp = np.rint(tpr * n_pos), np.rint(fpr * n_neg)
        best = int(np.argmax(tp * n_neg - fp * n_pos))  # argmax: first = highest threshold
        return _midway_below(thresholds, best)

    target = float(rule[len(SENSITIVITY_PREFIX):])
    # tpr only grows as the threshold falls, so the first hit is the highest threshold.
    # The tolerance keeps e.g. 7/10 >= 0.7 true despite binary floating point.
    meets = tpr >= target - 1e-12
    return _midway_below(thresholds, int(np.argmax(meets)))  # tpr ends at 1, so a hit exists


def _midway_below(thresholds: np.ndarray, index: int) -> float:
    """The threshold halfway, in log-odds, between candidate `index` and the next lower score.

    Every threshold in (next lower score, thresholds[index]] gives the same ROC point on the
    data it was chosen on. The score itself sits right at the edge of the positives, so new
    positives scoring a little lower are missed; the middle of the gap keeps an equal margin to
    both classes. Log-odds, because a confident model's scores crowd near 0 and 1.
    """
    high = float(thresholds[index])
    if index + 1 == len(thresholds):  # the lowest score: every case is called positive
        return high
    low = float(thresholds[index + 1])
    eps = 1e-7  # keeps log-odds finite for scores of exactly 0 or 1
    logit_low, logit_high = (math.log(p / (1 - p)) for p in np.clip([low, high], eps, 1 - eps))
    middle = 1 / (1 + math.exp(-(logit_low + logit_high) / 2))
    return min(max(middle, float(np.nextafter(low, 1.0))), high)  # strictly above low despite clipping


def threshold_on_validation(val: Predictions, rule: float | str) -> float:
    """The probability threshold that `rule` (evaluate.threshold) picks on the validation predictions."""
    try:
        return choose_threshold(val.labels, val.probabilities, rule)
    except ValueError as exc:
        raise PipelineError(
            f"params.yaml: evaluate.threshold = {rule!r} cannot be chosen on the validation split ({exc}).\n"
            "Use a fixed number (e.g. `dvc exp run -S evaluate.threshold=0.5`) or a validation split "
            "with both classes (data.val_fraction)."
        ) from None
