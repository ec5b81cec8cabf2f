"""Reproducible pneumonia classification on chest X-rays (Kermany et al. / Kaggle)."""

CLASS_NAMES = ("NORMAL", "PNEUMONIA")  # label 0, label 1
SPLITS = ("train", "val", "test")
EXTERNAL_SPLIT = "external"  # the external set (evaluate.external): its split name in TFRecords and metrics
