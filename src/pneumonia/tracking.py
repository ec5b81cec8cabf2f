"""MLflow: one run per training, shared by the train and evaluate stages.

Default store: `mlflow.db` (SQLite) and `mlartifacts/` at the repository root, found through
DVC_ROOT, so `dvc repro`, `dvc exp run`, `--temp` and queued experiments all land in one store
that `mlflow ui` at the root shows. MLFLOW_TRACKING_URI overrides it (e.g. a team's server).
"""

import hashlib
import json
import logging
import os
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import mlflow

from pneumonia import paths
from pneumonia.atomic import write_json
from pneumonia.config import Params, flatten

log = logging.getLogger(__name__)

STORE_FILE = "mlflow.db"
ARTIFACTS_FOLDER = "mlartifacts"


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{paths.project_root() / STORE_FILE}"


def _experiment_id(name: str) -> str:
    experiment = mlflow.get_experiment_by_name(name)
    if experiment:
        return experiment.experiment_id
    local = "MLFLOW_TRACKING_URI" not in os.environ
    location = (paths.project_root() / ARTIFACTS_FOLDER).as_uri() if local else None
    try:
        return mlflow.create_experiment(name, artifact_location=location)
    except mlflow.exceptions.MlflowException:
        # A parallel queued experiment created it first.
        return mlflow.get_experiment_by_name(name).experiment_id


def git_commit() -> str | None:
    result = subprocess.run(["git", "rev-parse", "HEAD"], cwd=paths.project_root(), capture_output=True, text=True)
    return result.stdout.strip() if result.returncode == 0 else None


def manifests_hash(manifests: Path) -> str:
    digest = hashlib.sha256()
    for manifest in sorted(manifests.glob("*.csv")):
        digest.update(manifest.name.encode() + b"\0" + manifest.read_bytes())
    return digest.hexdigest()


def run_tags(manifests: Path) -> dict[str, str]:
    tags = {"data.manifests_sha256": manifests_hash(manifests)}
    if commit := git_commit():
        tags["git.commit"] = commit
    if experiment := os.environ.get("DVC_EXP_NAME"):
        tags["dvc.exp_name"] = experiment
    return tags


@contextmanager
def training_run(params: Params, manifests: Path) -> Iterator[mlflow.ActiveRun]:
    """Open the run for this training, with all params (flattened) and the provenance tags."""
    mlflow.set_tracking_uri(tracking_uri())
    experiment_id = _experiment_id(params.tracking.experiment)
    with mlflow.start_run(experiment_id=experiment_id, tags=run_tags(manifests)) as run:
        # evaluate.* may change without retraining; the evaluate stage records those itself.
        mlflow.log_params({k: v for k, v in flatten(params).items() if not k.startswith("evaluate.")})
        log.info("MLflow run %s in experiment %r at %s", run.info.run_id, params.tracking.experiment, tracking_uri())
        yield run


@contextmanager
def resumed_run(run_info: Path) -> Iterator[mlflow.ActiveRun]:
    """Reopen the run whose id the train stage handed over in `run_info`."""
    info = json.loads(run_info.read_text())
    mlflow.set_tracking_uri(info["tracking_uri"])
    with mlflow.start_run(run_id=info["run_id"]) as run:
        yield run


def write_run_info(run: mlflow.ActiveRun, path: Path) -> None:
    write_json(path, {"run_id": run.info.run_id, "experiment_id": run.info.experiment_id,
                      "tracking_uri": tracking_uri()})


def log_training(summary: dict, model_path: Path, inputs: dict[str, Path]) -> None:
    """Training summary metrics, the input files that describe the data, and the model."""
    import keras

    mlflow.log_metrics(summary)
    for path in inputs.values():
        mlflow.log_artifact(str(path), artifact_path="inputs")
    mlflow.keras.log_model(keras.models.load_model(model_path), name="model")
