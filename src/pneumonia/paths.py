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
TFRECORDS = DATA / "tfrecords"  # tfrecords: {train,val,test}-NNNNN-of-NNNNN.tfrecord
CLASS_WEIGHTS = DATA / "class_weights.json"
# external: evaluate.external as TFRecords (split "external"), manifest.csv and the audit in meta.json
EXTERNAL = DATA / "external"

MODELS = Path("models")
MODEL = MODELS / "model.keras"
RUN_INFO = MODELS / "mlflow_run.json"  # hands the MLflow run id from train to evaluate
# train: the state of an unfinished training, one folder per worker ("chief", "worker-1", ...),
# resumed by the next attempt after a preemption; not a DVC output (DVC would delete it first)
TRAIN_BACKUP = Path("backup") / "train"

METRICS = Path("metrics")
DATA_METRICS = METRICS / "data.json"
DATA_AUDIT = METRICS / "data_audit.json"  # prepare: leakage audit
TRAIN_METRICS = METRICS / "train.json"
TEST_METRICS = METRICS / "test.json"
EXTERNAL_METRICS = METRICS / "external.json"  # evaluate: the external set, {"evaluated": false} without one

PLOTS = Path("plots")
TRAIN_HISTORY = PLOTS / "train_history.csv"
TEST_PREDICTIONS = PLOTS / "test_predictions.csv"
ROC_CURVE = PLOTS / "roc.csv"
PR_CURVE = PLOTS / "precision_recall.csv"
CALIBRATION_CURVE = PLOTS / "calibration.csv"
EXTERNAL_PLOTS = PLOTS / "external"  # evaluate: predictions.csv, roc.csv, ... of the external set (if any)
FIGURES = PLOTS / "figures"  # evaluate: PNG figures, rendered by `dvc plots show` and logged to MLflow

REPORTS = Path("reports")
EVALUATION_REPORT = REPORTS / "evaluation.html"
DATA_REPORT = REPORTS / "data"  # data_report: summary.json, class_distribution.csv, PNG figures
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
