"""Training: the model of pneumonia.models fitted on the TFRecords (`fit`), with the callbacks that keep
the best epoch on validation and stop early (`callbacks`), and the backup a preempted training resumes
from (`backup`). Per-epoch metrics go to MLflow through pneumonia.tracking.
"""
