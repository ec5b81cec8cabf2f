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
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow

from pneumonia import paths
from pneumonia.atomic import write_json
from pneumonia.config import TrackingConfig
from pneumonia.errors import PipelineError
from pneumonia.logs import redact

log = logging.getLogger(__name__)

STORE_FILE = "mlflow.db"
ARTIFACTS_FOLDER = "mlartifacts"


def default_store_uri() -> str:
    return f"sqlite:///{paths.project_root() / STORE_FILE}"


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or default_store_uri()


def shown_uri() -> str:
    """The tracking URI as logs, messages and files show it: without its password."""
    return redact(tracking_uri())


def use_tracking_uri(uri: str) -> None:
    if redact(uri) != uri:
        # MLflow prints an http store's run links to stdout, password and all.
        os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    mlflow.set_tracking_uri(uri)


def check_reachable(uri: str, nothing_done: str = "Nothing was trained.") -> None:
    """Fail before training, not after an hour of it (nor after MLflow's minutes of retries), when a tracking
    server is down; `nothing_done` ends the message."""
    if not uri.startswith(("http://", "https://")):
        return
    import requests

    shown = redact(uri)
    try:
        requests.get(uri.rstrip("/") + "/health", timeout=10).raise_for_status()
    except requests.RequestException as exc:
        raise PipelineError(
            f"the MLflow tracking server {shown} (MLFLOW_TRACKING_URI) cannot be reached: {type(exc).__name__}. "
            f"Start it or fix MLFLOW_TRACKING_URI, or unset it to use the local store mlflow.db. {nothing_done}"
        ) from None


def create_store_once(uri: str) -> None:
    """Create a new SQLite store (or upgrade an old one) one process at a time.

    MLflow creates its tables by schema migrations that break when two processes run them at once:
    two queued experiments (`dvc queue start -j 2`) starting on a fresh mlflow.db failed with
    alembic's "expected to match one row when updating ... in 'alembic_version'". A lock file next
    to the database serialises that step; later writes are safe under SQLite's own locking.
    """
    if not uri.startswith("sqlite:///"):
        return
    from filelock import FileLock

    database = uri.removeprefix("sqlite:///").split("?")[0]
    with FileLock(f"{database}.lock"):
        mlflow.MlflowClient(uri).search_experiments(max_results=1)  # creates or upgrades the tables


LOCKED_RETRY_SECONDS = 600


def retry_locked(call, *args, **kwargs):
    """call(*args, **kwargs), tried again while the SQLite store stays locked past MLflow's 20 s busy
    timeout: queued experiments share mlflow.db, and a "database is locked" must not end a training
    that has run for an hour. Every MLflow write of the stages and commands goes through it."""
    delay, deadline = 1.0, time.monotonic() + LOCKED_RETRY_SECONDS
    while True:
        try:
            return call(*args, **kwargs)
        except mlflow.exceptions.MlflowException as exc:
            if "database is locked" not in str(exc) or time.monotonic() + delay > deadline:
                raise
            log.warning("the MLflow store is locked by another process: trying again in %.0f s", delay)
            time.sleep(delay)
            delay = min(2 * delay, 30)


def log_epoch_metrics(metrics: dict[str, float], step: int) -> None:
    retry_locked(mlflow.log_metrics, metrics, step=step)


def epoch_metrics_callback(history):
    """A Keras callback logging per-epoch metrics into the active MLflow run, step = epoch number
    (1-based), each epoch once. `history` is the training's pneumonia.training.backup.EpochHistory.

    Runs after the epoch's backup and logs every recorded epoch the run does not hold yet: an epoch
    backed up just before the process was killed is logged when training resumes, and an epoch
    that will be trained again was never logged.
    """
    import keras  # only training needs it: MLflow's other users here need no TensorFlow

    class MlflowEpochMetrics(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            run_id = active_run_id()
            self.logged = {point.step for point in retry_locked(mlflow.MlflowClient().get_metric_history, run_id,
                                                                "loss")}

        def _log_new_epochs(self):
            for record in history.epochs:
                step = record["epoch"] + 1
                if step not in self.logged:
                    log_epoch_metrics({k: v for k, v in record.items() if k not in ("epoch", "stage")}, step)
                    self.logged.add(step)

        def on_epoch_end(self, epoch, logs=None):
            self._log_new_epochs()

        def on_train_end(self, logs=None):
            self._log_new_epochs()

    return MlflowEpochMetrics()


def _experiment_id(name: str) -> str:
    experiment = retry_locked(mlflow.get_experiment_by_name, name)
    if experiment:
        return experiment.experiment_id
    # (mlflow.set_tracking_uri also exports MLFLOW_TRACKING_URI, so compare URIs, not the variable.)
    default_store = tracking_uri() == default_store_uri()
    location = (paths.project_root() / ARTIFACTS_FOLDER).as_uri() if default_store else None
    try:
        return retry_locked(mlflow.create_experiment, name, artifact_location=location)
    except mlflow.exceptions.MlflowException:
        # A parallel queued experiment created it first.
        return retry_locked(mlflow.get_experiment_by_name, name).experiment_id


def git_commit() -> str | None:
    result = subprocess.run(["git", "rev-parse", "HEAD"], cwd=paths.project_root(), capture_output=True, text=True)
    return result.stdout.strip() if result.returncode == 0 else None


def manifests_hash(manifests: Path) -> str:
    digest = hashlib.sha256()
    for manifest in sorted(manifests.glob("*.csv")):
        digest.update(manifest.name.encode() + b"\0" + manifest.read_bytes())
    return digest.hexdigest()


def data_version_tags(source: Path) -> dict[str, str]:
    """The exact data trained on, from data/raw/source.json: Kaggle dataset version, archive size and hash."""
    recorded = json.loads(source.read_text()) if source.is_file() else {}
    keys = ("kaggle_dataset", "version", "archive_sha256", "archive_size_bytes")
    return {f"data.{key}": str(recorded[key]) for key in keys if recorded.get(key) is not None}


def run_name(model_name: str) -> str:
    """The DVC experiment's name under `dvc exp run` (DVC_EXP_NAME, as `dvc exp show` lists it), else
    what a plain `dvc repro` trained: repro-<model>-<commit>."""
    if experiment := os.environ.get("DVC_EXP_NAME"):
        return experiment
    commit = git_commit()
    return f"repro-{model_name}" + (f"-{commit[:7]}" if commit else "")


def run_tags(manifests: Path) -> dict[str, str]:
    tags = {"data.manifests_sha256": manifests_hash(manifests), **data_version_tags(paths.RAW_SOURCE)}
    if commit := git_commit():
        tags["git.commit"] = commit
    if experiment := os.environ.get("DVC_EXP_NAME"):
        tags["dvc.exp_name"] = experiment
    return tags


@contextmanager
def _open_run(**start_run_args) -> Iterator[mlflow.ActiveRun]:
    """mlflow.start_run, its opening and its closing write (the run's status) retried like any other."""
    with retry_locked(mlflow.start_run, **start_run_args) as run:
        status = "FAILED"
        try:
            yield run
            status = "FINISHED"
        finally:
            # mlflow.end_run takes the run off its stack before writing, so it cannot be retried itself:
            # the status is written (and retried) first, then end_run's repeat of it is a no-op if it fails.
            retry_locked(mlflow.MlflowClient().set_terminated, run.info.run_id, status)
            retry_locked(mlflow.end_run, status)


def active_run_id() -> str | None:
    """The id of the MLflow run this process is logging into, None outside one."""
    run = mlflow.active_run()
    return run.info.run_id if run else None


@contextmanager
def training_run(config: TrackingConfig, params: dict[str, Any], manifests: Path,
                 resume_run_id: str | None = None, tags: dict[str, Any] | None = None) -> Iterator[mlflow.ActiveRun]:
    """Open the run for this training in experiment tracking.experiment, with the params (flattened:
    config.flatten), the provenance tags and `tags`; or reopen `resume_run_id`, the run of an interrupted
    training that now resumes (`tags` set again: it may continue on other hardware)."""
    check_reachable(tracking_uri())
    create_store_once(tracking_uri())
    use_tracking_uri(tracking_uri())
    experiment_id = _experiment_id(config.experiment)
    if resume_run_id is not None:
        try:
            retry_locked(mlflow.get_run, resume_run_id)
        except mlflow.exceptions.MlflowException:
            log.warning("the interrupted training's MLflow run %s is not in %s: starting a new run", resume_run_id,
                        shown_uri())
            resume_run_id = None
    with _open_run(run_id=resume_run_id, experiment_id=experiment_id, tags=run_tags(manifests),
                   run_name=None if resume_run_id else run_name(params["model.name"])) as run:
        # evaluate.* may change without retraining; the evaluate stage records those itself.
        retry_locked(mlflow.log_params, {k: v for k, v in params.items() if not k.startswith("evaluate.")})
        if tags:
            retry_locked(mlflow.set_tags, tags)
        log.info("MLflow run %s in experiment %r at %s", run.info.run_id, config.experiment, shown_uri())
        yield run


def _recorded_store(run_info: Path) -> tuple[str, str]:
    """(run id, the URI of the store to reopen it in) from the train stage's `run_info`; a PipelineError when
    that store cannot be used from here."""
    info = json.loads(run_info.read_text())
    recorded = info["tracking_uri"]
    uri = tracking_uri() if shown_uri() == recorded else recorded
    if "***@" in uri:
        raise PipelineError(
            f"the train stage logged to {recorded}, whose password {run_info} does not keep: set "
            "MLFLOW_TRACKING_URI to that URI with its password, as for the train stage"
        )
    elsewhere = Path(uri.removeprefix("sqlite:///")).parent
    if (uri.startswith("sqlite:///") and uri.endswith(f"/{STORE_FILE}") and elsewhere != paths.project_root()
            and uri != tracking_uri()):
        # The default store of another folder: this project was copied or moved after training, and
        # would write into the original's store (whose artifact locations are the original's too).
        raise PipelineError(
            f"{run_info} records run {info['run_id']} in the MLflow store of the project at {elsewhere}, not in "
            f"this one ({paths.project_root()}): this folder was copied or moved after training. Retrain here "
            f"(`dvc repro -f -s train`) for a run of its own, or set MLFLOW_TRACKING_URI={recorded} to log into "
            "that project's store on purpose"
        )
    return info["run_id"], uri


def check_run(run_info: Path) -> None:
    """Before a stage's work: the run `run_info` records can be reopened (its store reachable and here, the
    run in it and not deleted)."""
    from mlflow.exceptions import MlflowException

    run_id, uri = _recorded_store(run_info)
    check_reachable(uri, "Nothing was evaluated.")
    try:
        run = retry_locked(mlflow.MlflowClient(uri).get_run, run_id)
    except MlflowException as exc:
        raise PipelineError(f"the MLflow run {run_id} that {run_info} records is not in {redact(uri)} "
                            f"({exc.message.splitlines()[0]}): retrain (`dvc repro -f -s train`)") from None
    if run.info.lifecycle_stage == "deleted":
        raise PipelineError(f"the MLflow run {run_id} that {run_info} records was deleted: restore it "
                            f"(`mlflow runs restore --run-id {run_id}`, with MLFLOW_TRACKING_URI={redact(uri)}), "
                            "or retrain (`dvc repro -f -s train`)")


@contextmanager
def resumed_run(run_info: Path) -> Iterator[mlflow.ActiveRun]:
    """Reopen the run whose id the train stage handed over in `run_info`.

    The file holds the tracking URI without its password (it is a DVC output, pushed to remotes):
    MLFLOW_TRACKING_URI supplies the password when it names the same store.
    """
    run_id, uri = _recorded_store(run_info)
    use_tracking_uri(uri)
    with _open_run(run_id=run_id) as run:
        yield run


def write_run_info(path: Path) -> None:
    """The active run's id and store, for the evaluate stage (`resumed_run`)."""
    run = mlflow.active_run()
    write_json(path, {"run_id": run.info.run_id, "experiment_id": run.info.experiment_id,
                      "tracking_uri": shown_uri()})


def log_training(metrics: dict, inputs: list[Path]) -> None:
    """The training's metrics (TrainingResult.metrics) and the input files that describe the data.

    The run's model is logged by the evaluate stage (pneumonia.serving), which knows its decision
    threshold: one servable model per run.
    """
    retry_locked(mlflow.log_metrics, metrics)
    for path in inputs:
        retry_locked(mlflow.log_artifact, str(path), artifact_path="inputs")


@contextmanager
def _manifest_hints_held_back() -> Iterator[None]:
    """While manifests are logged as datasets: without two hints MLflow would print in every train and evaluate
    stage's output, which say nothing here: that their integer labels "cannot represent missing values" (a
    manifest has none), and that a path "can be interpreted in multiple ways: LocalArtifactDatasetSource,
    LocalArtifactDatasetSource" (one class registered twice: either is it). Other warnings pass."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Hint: Inferred schema contains integer column", UserWarning, r"mlflow\.")
        warnings.filterwarnings("ignore", "The specified dataset source can be interpreted", UserWarning, r"mlflow\.")
        yield


def manifest_dataset(manifest: Path, name: str | None = None):
    """A split's manifest (path, label, patient, image hash per row) as an MLflow dataset: the UI's
    Datasets panel names it with a digest of its content."""
    import pandas as pd

    return mlflow.data.from_pandas(pd.read_csv(manifest), source=str(manifest.resolve()), name=name or manifest.stem,
                                   targets="label")


def log_manifests(manifests: Path, splits: dict[str, str]) -> dict:
    """Log the manifests of `splits` ({split: context}) as the active run's inputs; return the datasets."""
    datasets = {}
    with _manifest_hints_held_back():
        for split, context in splits.items():
            datasets[split] = manifest_dataset(manifests / f"{split}.csv")
            retry_locked(mlflow.log_input, datasets[split], context=context)
    return datasets


def log_evaluation(params: dict[str, Any], model_id: str, splits: dict[str, tuple[Path, str, dict[str, float]]],
                   outputs: list[Path], data_report: Path) -> None:
    """The evaluate stage's record in the active run, after it logged the run's model `model_id`
    (pneumonia.serving): its `params` as tags evaluate.<key> (they change without retraining); per
    split {name: (manifest, context, metrics)} the manifest as an input and the metrics, linked to the
    model and to that dataset (the logged model's page shows them, mlflow.search_logged_models ranks
    models by them); the `outputs` under evaluation/ and the data report under inputs/data (logged
    here so that report changes cost no retraining). Each write retried on a locked store (retry_locked)."""
    retry_locked(mlflow.set_tags, {f"evaluate.{key}": value for key, value in params.items()})
    with _manifest_hints_held_back():
        for name, (manifest, context, metrics) in splits.items():
            dataset = manifest_dataset(manifest, name=name)
            retry_locked(mlflow.log_input, dataset, context=context)
            retry_locked(mlflow.log_metrics, metrics, model_id=model_id, dataset=dataset)
    for path in outputs:
        retry_locked(mlflow.log_artifact, str(path), artifact_path="evaluation")
    retry_locked(mlflow.log_artifacts, str(data_report), artifact_path="inputs/data")


@dataclass(frozen=True)
class RecordedRun:
    """What a run holds, as read back from the store."""

    run_id: str
    params: dict[str, str]
    metrics: dict[str, float]  # each metric's last value
    tags: dict[str, str]


def experiment_runs(experiment: str, nothing_done: str) -> list[RecordedRun]:
    """Every run of MLflow experiment `experiment` in the tracking store, oldest first; a PipelineError naming
    the experiments there when there is none of that name, or when a tracking server is down (`nothing_done`
    ends that message)."""
    check_reachable(tracking_uri(), nothing_done)
    client = mlflow.MlflowClient(tracking_uri())
    found = client.get_experiment_by_name(experiment)
    if found is None:
        names = ", ".join(sorted(e.name for e in client.search_experiments())) or "none"
        raise PipelineError(
            f"no MLflow experiment {experiment!r} at {redact(client.tracking_uri)} (experiments there: {names}); "
            "pass --experiment, or run the pipeline first (dvc exp run)."
        )
    runs, token = [], None
    while True:
        page = client.search_runs([found.experiment_id], order_by=["attributes.start_time ASC"], page_token=token)
        runs.extend(RecordedRun(run.info.run_id, run.data.params, run.data.metrics, run.data.tags) for run in page)
        token = page.token
        if not token:
            return runs
