"""Evaluation: the predictions on a split, their metrics and confidence intervals, the threshold, calibration, the
report and its figures, Grad-CAM."""
