"""The `evaluate.threshold` rule: parsed here without numeric imports, so params validate fast.

Bottom layer, like pneumonia.config which validates the rule with it; pneumonia.evaluation.threshold applies it.
"""

import math
import numbers

THRESHOLD_RULE_FORMS = (
    'a number strictly between 0 and 1 (e.g. 0.5), "youden", '
    'or "sensitivity@X" with X in (0, 1] (e.g. "sensitivity@0.95")'
)
SENSITIVITY_PREFIX = "sensitivity@"
# The conventional threshold: metrics at it beside the chosen one, and that of a model with none chosen
DEFAULT_THRESHOLD = 0.5


def parse_threshold_rule(value):
    """Validate a threshold rule and return it (numbers as float, strings unchanged).

    Allowed forms: a number in (0, 1), "youden", or "sensitivity@X" with X in (0, 1].
    Raises ValueError naming the allowed forms; usable from a config validator.
    """
    # bool is a numbers.Real subclass, but `threshold: true` in a config is a mistake.
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        if 0 < value < 1:
            return float(value)
        raise ValueError(f"threshold rule {value!r} is out of range; use {THRESHOLD_RULE_FORMS}")
    if isinstance(value, str):
        if value == "youden":
            return value
        if value.startswith(SENSITIVITY_PREFIX):
            target = value[len(SENSITIVITY_PREFIX):]
            try:
                x = float(target)
            except ValueError:
                x = math.nan
            if 0 < x <= 1:
                return value
    raise ValueError(f"invalid threshold rule {value!r}; use {THRESHOLD_RULE_FORMS}")
