"""Every path the pipeline reads or writes, in one place.

Stage paths are relative to the working directory, which DVC sets to the repository root (or to
the temporary copy of it that `dvc exp run --temp` and queued experiments use).
"""

import os
from pathlib import Path

PARAMS = Path("params.yaml")

# The compact real sample committed with the code (data_sample/README.md): the default data.local_path
SAMPLE = Path("data_sample") / "chest-xray-small.zip"

# download: the archive last downloaded (source, version, sha256), kept across runs and committed with
# the baseline, so that a download that differs from it says so
ARCHIVE_RECORD = Path("data_archive.json")

DATA = Path("data")
RAW = DATA / "raw"  # download: {train,val,test}/{NORMAL,PNEUMONIA}/ images + source.json
RAW_SOURCE = RAW / "source.json"
MANIFESTS = DATA / "manifests"  # prepare: {train,val,test}.csv
IMAGE_TABLE = DATA / "images.csv"  # prepare: every raw file, its size, mode, intensity, or why it is unreadable
SPLIT_COUNTS = DATA / "split_counts.json"  # prepare: images per split and class, patients, dropped, unreadable
DATA_AUDIT = DATA / "audit.json"  # prepare: leakage audit
TFRECORDS = DATA / "tfrecords"  # tfrecords: {train,val,test}-NNNNN-of-NNNNN.tfrecord
CLASS_WEIGHTS = DATA / "class_weights.json"
# external: evaluate.external as TFRecords (split "external"), manifest.csv and the audit in meta.json
EXTERNAL = DATA / "external"

MODELS = Path("models")
MODEL = MODELS / "model.keras"
# evaluate: the model's settings and out-of-distribution reference, beside it (pneumonia.model_settings)
MODEL_SETTINGS = MODELS / "model.json"
OOD_REFERENCE = MODELS / "model.ood.npz"
# evaluate: the model card, generated from the run (pneumonia.evaluation.model_card)
MODEL_CARD = Path("docs") / "model_card.md"
RUN_INFO = MODELS / "mlflow_run.json"  # hands the MLflow run id from train to evaluate
# train: the state of an unfinished training, one folder per worker ("chief", "worker-1", ...),
# resumed by the next attempt after a preemption; not a DVC output (DVC would delete it first)
TRAIN_BACKUP = Path("backup") / "train"

# DVC metrics: the headline figures `dvc exp show` compares, a few columns (docs/evaluation.md#metrics);
# every other figure is in the details below and in the MLflow run
METRICS = Path("metrics")
TRAIN_METRICS = METRICS / "train.json"  # train: best epoch, epochs trained, seconds
EVALUATION_METRICS = METRICS / "evaluation.json"  # evaluate: threshold; test (and external) ROC AUC, sensitivity, ...

PLOTS = Path("plots")
TRAIN_HISTORY = PLOTS / "train_history.csv"
TEST_PREDICTIONS = PLOTS / "test_predictions.csv"
ROC_CURVE = PLOTS / "roc.csv"
PR_CURVE = PLOTS / "precision_recall.csv"
CALIBRATION_CURVE = PLOTS / "calibration.csv"
FIGURES = PLOTS / "figures"  # evaluate: PNG figures, rendered by `dvc plots show` and logged to MLflow

REPORTS = Path("reports")
EVALUATION_REPORT = REPORTS / "evaluation.html"
# evaluate: every figure of the evaluation: test.json (intervals, at 0.5, counts, validation, border audit), and
# with an external set external.json and its tables external_predictions.csv, external_roc.csv, ...
EVALUATION_DETAILS = REPORTS / "evaluation"
TEST_SCORES = EVALUATION_DETAILS / "test.json"
EXTERNAL_SCORES = EVALUATION_DETAILS / "external.json"
DATA_REPORT = REPORTS / "data"  # data_report: summary.json, PNG figures
COMPARISON = REPORTS / "comparison"  # `pneumonia compare`: runs.md, runs.csv, runs.png


def project_root() -> Path:
    """The user's repository root, also from inside a `--temp` or queued experiment.

    DVC points DVC_ROOT at the original repository for every stage it runs, so relative user
    paths (data.local_path) and the shared MLflow store resolve to the same place either way.
    """
    return Path(os.environ.get("DVC_ROOT") or Path.cwd()).resolve()


def resolve_user_path(path: str | os.PathLike) -> Path:
    """A path from params.yaml: absolute as given, relative to the repository root otherwise."""
    path = Path(path).expanduser()
    return path if path.is_absolute() else project_root() / path


def join(folder: str | os.PathLike, name: str) -> str:
    """`folder`/`name` for a local path or a URI alike (gs://..., file://...: tfrecords.uri,
    train.backup_uri), which pathlib would mangle (Path("gs://b/x") is "gs:/b/x")."""
    return f"{os.fspath(folder).rstrip('/')}/{name}"
