"""End to end: the real `dvc repro` / `dvc exp run` in a copy of the project, results read back
from the files DVC tracks and from the MLflow store."""

import csv
import io
import json
import re
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import mlflow
import pandas as pd
import pytest
import yaml
from mlflow.tracking import MlflowClient

from browser import FLAGS, assert_not_blank, chromium, open_in_chromium
from conftest import (
    PNG_MAGIC,
    commit_all,
    copy_project,
    free_port,
    mlflow_tracking_server,
    run,
    set_params,
    shared_dataset,
    tool_env,
)
from pneumonia import SPLITS
from pneumonia.data import dataset
from pneumonia.data.tfrecords import read_meta
from pneumonia.model_settings import onnx_digest, read_settings

# A sweep of two models (docs/models.md): the model swap of the README (`-S model.name=xception`, from
# scratch: no ImageNet weights here), and the custom CNN at another learning rate than the baseline's, as an
# experiment identical to one run before would be restored from DVC's run cache and not train.
SWEEP = {"custom_cnn": ["-S", "train.learning_rate=0.003"], "xception": ["-S", "model.weights=none"]}
STAGES = ["download", "prepare", "tfrecords", "class_weights", "external", "data_report", "train", "evaluate"]
TEST_METRIC_KEYS = {"accuracy", "precision", "recall", "specificity", "f1", "roc_auc", "tp", "fp", "tn", "fn", "ece",
                    "calibration"}
# `dvc exp show`'s metric columns (docs/evaluation.md#metrics): train's 3, the threshold, the test-time views, 5 of
# test and 5 of an external set
METRIC_COLUMNS = 15

pytestmark = pytest.mark.e2e


def stages_run(output: str) -> list[str]:
    return re.findall(r"Running stage '([\w-]+)'", output)


def dvc_warnings(output: str) -> list[str]:
    """DVC's warnings in a command's output: lines "WARNING: ...", less the one TensorFlow's C++ runtime
    prints in a stage before its logging is set up."""
    return [line for line in output.splitlines()
            if line.startswith("WARNING: ") and "absl::InitializeLog" not in line]


def mlflow_runs(project: Path) -> list[mlflow.entities.Run]:
    client = MlflowClient(tracking_uri=f"sqlite:///{project / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("pneumonia")
    return client.search_runs([experiment.experiment_id], order_by=["attributes.start_time ASC"])


def artifact_paths(project: Path, run_id: str) -> set[str]:
    client = MlflowClient(tracking_uri=f"sqlite:///{project / 'mlflow.db'}")
    found, pending = set(), [None]
    while pending:
        for item in client.list_artifacts(run_id, pending.pop()):
            (pending.append(item.path) if item.is_dir else found.add(item.path))
    return found


@pytest.fixture(scope="module")
def remote_tfrecords(tmp_path_factory) -> Path:
    """Where the project's shards go (tfrecords.uri, as a bucket would hold them), not in its workspace."""
    return tmp_path_factory.mktemp("remote")


@pytest.fixture(scope="module")
def synthetic_project(tmp_path_factory, remote_tfrecords) -> Path:
    project = copy_project(tmp_path_factory.mktemp("project"))
    set_params(project, **{
        "data.source": "synthetic", "data.image_size": 88, "train.epochs": 1, "train.batch_size": 8,
        "tfrecords.workers": 2, "tfrecords.uri": remote_tfrecords.as_uri(), "tracking.register_model": "pneumonia",
    })
    commit_all(project)
    return project


@pytest.fixture(scope="module")
def baseline(synthetic_project) -> tuple[str, list[mlflow.entities.Run]]:
    """The first `dvc repro` of the project (its output, stdout and stderr, and the MLflow runs right after
    it), committed as a user would before experimenting. Every test that builds on it asks for it, so each
    also runs alone (`pytest -k model`) or in another order."""
    result = run(["dvc", "repro"], synthetic_project)
    runs = mlflow_runs(synthetic_project)
    commit_all(synthetic_project, "baseline results")
    return result.stdout + result.stderr, runs


def test_repro_runs_every_stage_and_records_the_run(synthetic_project, baseline):
    output, runs = baseline
    assert stages_run(output) == STAGES
    assert not dvc_warnings(output)  # e.g. "WARNING: 'src/pneumonia/data/__init__.py' is empty."
    # nor Python's, in any stage's output: e.g. MLflow's hints about the manifests each run logs
    assert not re.findall(r"\w+Warning: .*", output), re.findall(r"\w+Warning: .*", output)

    test_metrics = json.loads((synthetic_project / "reports/evaluation/test.json").read_text())
    assert TEST_METRIC_KEYS <= test_metrics.keys()
    assert test_metrics["tp"] + test_metrics["fp"] + test_metrics["tn"] + test_metrics["fn"] == test_metrics["n"] > 0
    data = json.loads((synthetic_project / "data/split_counts.json").read_text())
    data_counts = data["images"]
    assert data_counts["test"] == {"NORMAL": 6, "PNEUMONIA": 6}  # 20% of 12 patients x 3 images
    headline = json.loads((synthetic_project / "metrics/evaluation.json").read_text())
    assert headline == {"threshold": test_metrics["threshold"], "tta_views": 1,
                        "test": {key: test_metrics[key] for key in ("roc_auc", "sensitivity", "specificity",
                                                                    "accuracy", "ece")}}
    # The model's settings, beside it: what predict, serving and adapt read (tests/test_model_bundle.py)
    settings = read_settings(synthetic_project / "models/model.keras")
    assert (settings.threshold, settings.threshold_rule) == (test_metrics["threshold"], test_metrics["threshold_rule"])
    assert (settings.image_size, settings.jpeg_quality, settings.tta_views) == (88, 95, 1)
    assert settings.training_data.images == {"train": sum(data_counts["train"].values()),
                                             "val": sum(data_counts["val"].values()), "test": 12}
    assert 0 < settings.ood.validation_flagged <= 0.2 and test_metrics["ood"]["images"] == test_metrics["n"]
    # ... and its ONNX graph, what predict runs (issue 36), bound to the settings
    assert settings.onnx_sha256 == onnx_digest((synthetic_project / "models/model.onnx").read_bytes())
    card = (synthetic_project / "docs/model_card.md").read_text()
    assert "children aged 1 to 5" in card and f"{settings.threshold:.4f}" in card
    train_metrics = json.loads((synthetic_project / "metrics/train.json").read_text())
    assert train_metrics["epochs_trained"] == 1 and set(train_metrics) == {"best_epoch", "epochs_trained",
                                                                           "train_seconds"}

    [mlflow_run] = runs
    assert mlflow_run.data.params["model.name"] == "custom_cnn"
    assert mlflow_run.data.params["data.source"] == "synthetic"
    assert {"val_auc", "loss", "test_roc_auc", "test_accuracy", "train_seconds"} <= mlflow_run.data.metrics.keys()
    assert "data.manifests_sha256" in mlflow_run.data.tags and "git.commit" in mlflow_run.data.tags
    history = MlflowClient(f"sqlite:///{synthetic_project / 'mlflow.db'}").get_metric_history(
        mlflow_run.info.run_id, "val_auc")
    assert [point.step for point in history] == [1]
    artifacts = artifact_paths(synthetic_project, mlflow_run.info.run_id)
    assert {"evaluation/confusion_matrix.png", "evaluation/roc.png", "evaluation/test.json",
            "evaluation/evaluation.json", "inputs/class_weights.json", "inputs/split_counts.json", "inputs/source.json",
            "inputs/data/summary.json", "inputs/data/figures/sample_grid.png"} <= artifacts
    [model] = MlflowClient(f"sqlite:///{synthetic_project / 'mlflow.db'}").search_logged_models(
        [mlflow_run.info.experiment_id], filter_string=f"source_run_id = '{mlflow_run.info.run_id}'")
    # One model per run, logged by evaluate: the servable one, deciding at the threshold evaluate chose.
    assert model.name == "model" and float(model.params["threshold"]) == test_metrics["threshold"]
    assert model.params["threshold_rule"] == test_metrics["threshold_rule"]
    candidate = MlflowClient(f"sqlite:///{synthetic_project / 'mlflow.db'}").get_model_version_by_alias(
        "pneumonia", "candidate")
    assert candidate.run_id == mlflow_run.info.run_id


def test_shards_are_under_the_tfrecords_uri_and_dvc_tracks_only_meta_json(synthetic_project, baseline,
                                                                          remote_tfrecords):
    """tfrecords writes its shards under tfrecords.uri (file:// here, gs:// for TPUs); train and evaluate,
    each its own process, read them through meta.json's location."""
    assert [entry.name for entry in (synthetic_project / "data/tfrecords").iterdir()] == ["meta.json"]
    meta = read_meta(synthetic_project / "data/tfrecords")
    [key_folder] = remote_tfrecords.iterdir()
    assert meta["location"] == key_folder.as_uri()
    expected = {Path(path).name for split in SPLITS
                for path in dataset.shard_paths(synthetic_project / "data/tfrecords", split)}
    assert {entry.name for entry in key_folder.iterdir()} == expected
    assert json.loads((synthetic_project / "reports/evaluation/test.json").read_text())["n"] == \
        meta["splits"]["test"]["images"]


def test_second_repro_does_nothing(synthetic_project, baseline):
    result = run(["dvc", "repro"], synthetic_project)
    assert stages_run(result.stdout) == []
    assert "Data and pipelines are up to date" in result.stdout
    assert not dvc_warnings(result.stdout + result.stderr)


def shown_experiments(project: Path) -> dict[str, dict]:
    """{name: params and metrics} of the workspace, each commit and each experiment (`dvc exp show --json`)."""
    found = {}
    for commit in json.loads(run(["dvc", "exp", "show", "--json"], project).stdout):
        for revision in [commit, *[r for experiment in commit.get("experiments") or [] for r in experiment["revs"]]]:
            data = revision.get("data") or {}
            found[revision.get("name") or data.get("name") or data.get("rev")] = {
                "params": data.get("params", {}).get("params.yaml", {}).get("data", {}),
                "train": data.get("metrics", {}).get("metrics/train.json", {}).get("data", {}),
                "test": data.get("metrics", {}).get("metrics/evaluation.json", {}).get("data", {}).get("test", {}),
            }
    return found


# --- a queued sweep on the baseline, two experiments at once (docs/models.md), compared ------------

def queue_status(project: Path) -> str:
    """`dvc queue status`. While workers run it now and then fails on a status file a worker is
    writing ("unexpected error - Expecting value: line 1 column 1", cf. treeverse/dvc#8014): that
    error is tried again a few times; any other failure, or that one persisting, fails the test."""
    for _ in range(5):
        result = run(["dvc", "queue", "status"], project, check=False)
        if result.returncode == 0:
            return result.stdout
        assert "Expecting value" in result.stderr, result.stdout + result.stderr
        time.sleep(2)
    raise AssertionError(f"dvc queue status kept failing:\n{result.stdout}\n{result.stderr}")


def queue_command(project: Path, *args: str, **env: str) -> None:
    """`dvc queue start/stop`. Its worker daemons inherit the command's environment, and its stdout and
    stderr: those go to /dev/null, not to pipes that would keep this call waiting for as long as a worker lives."""
    subprocess.run(["dvc", "queue", *args], cwd=project, env=tool_env(**env), stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL, check=True, timeout=300)


def wait_for_queue(project: Path, timeout: float = 1200) -> str:
    """`dvc queue start` returns at once; the queue is done when no task is queued or running."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = queue_status(project)
        if not any(word in status for word in ("Queued", "Running")):
            return status
        time.sleep(2)
    raise AssertionError(f"queue still busy after {timeout} s:\n{queue_status(project)}")


@pytest.fixture(scope="module")
def tracking_server(tmp_path_factory) -> Iterator[str]:
    """A real `mlflow server` on 127.0.0.1 with its own store; stopped at teardown."""
    root = tmp_path_factory.mktemp("server")
    with mlflow_tracking_server(root / "server.db", root / "server-artifacts") as url:
        yield url


@pytest.fixture(scope="module")
def sweep(synthetic_project, baseline, tracking_server) -> Iterator[list[mlflow.entities.Run]]:
    """One queued experiment per model of SWEEP on the baseline, run two at a time, both logging to and
    registering in a tracking server (MLFLOW_TRACKING_URI) at once; yields their MLflow runs. Each swaps a
    model or training param, so it reruns train and evaluate, and no data stage."""
    for model, settings in SWEEP.items():
        run(["dvc", "exp", "run", "--queue", "-n", f"sweep-{model}", "-S", f"model.name={model}", *settings],
            synthetic_project)
    queue_command(synthetic_project, "start", "-j", "2", MLFLOW_TRACKING_URI=tracking_server)
    try:
        status = wait_for_queue(synthetic_project)
        for model in SWEEP:
            logs = run(["dvc", "queue", "logs", f"sweep-{model}"], synthetic_project, check=False)
            [line] = [line for line in status.splitlines() if f"sweep-{model}" in line]
            assert "Success" in line, f"{status}\n{logs.stdout}\n{logs.stderr}"
            assert stages_run(logs.stdout) == ["train", "evaluate"], logs.stdout
        client = MlflowClient(tracking_server)
        yield client.search_runs([client.get_experiment_by_name("pneumonia").experiment_id])
    finally:
        queue_command(synthetic_project, "stop")  # idle workers would otherwise outlive the tests


def test_queued_sweep_swaps_the_model_and_lands_every_run_in_the_tracking_server(synthetic_project, sweep,
                                                                                 tracking_server):
    by_model = {r.data.params["model.name"]: r for r in sweep}
    assert sorted(by_model) == sorted(SWEEP) and len(sweep) == len(SWEEP)
    client = MlflowClient(tracking_server)
    for model, mlflow_run in by_model.items():
        assert mlflow_run.data.tags["dvc.exp_name"] == f"sweep-{model}"
        assert {"train_seconds", "peak_memory_mb", "total_params", "trainable_params",
                "test_accuracy", "test_roc_auc", "val_auc"} <= mlflow_run.data.metrics.keys()
        assert [point.step for point in client.get_metric_history(mlflow_run.info.run_id, "val_auc")] == [1]
        assert "evaluation/roc.png" in {a.path for a in client.list_artifacts(mlflow_run.info.run_id, "evaluation")}
    # both registered: two versions evaluated at once, each with its own number
    versions = {v.run_id: v.version for v in client.search_model_versions("name = 'pneumonia'")}
    assert {r.info.run_id for r in sweep} <= versions.keys() and len(set(versions.values())) == len(versions)

    shown = shown_experiments(synthetic_project)
    for model in SWEEP:
        experiment = shown[f"sweep-{model}"]
        assert experiment["params"]["model"]["name"] == model
        assert experiment["train"]["train_seconds"] > 0 and "roc_auc" in experiment["test"]
    # The same figures in MLflow and in the experiment's metrics files.
    assert {m: by_model[m].data.metrics["train_seconds"] for m in SWEEP} == {
        m: shown[f"sweep-{m}"]["train"]["train_seconds"] for m in SWEEP}
    assert {m: by_model[m].data.metrics["test_roc_auc"] for m in SWEEP} == {
        m: shown[f"sweep-{m}"]["test"]["roc_auc"] for m in SWEEP}

    # The README's command to compare experiments: the params that differ and the headline metrics, on
    # one wide screen (rich puts a "…" where columns do not fit): with every headline metric differing, the
    # table of these two experiments is about 235 columns wide.
    compared = run(["dvc", "exp", "show", "--only-changed", "--drop", ".*/", "--no-pager"], synthetic_project,
                   COLUMNS="250").stdout
    assert "…" not in compared and all(f"sweep-{model}" in compared for model in SWEEP), compared
    assert {"train_seconds", "model.name", "train.learning_rate"} <= set(compared.split())  # the rest may be equal
    # All of it, as it comes: every params.yaml key and dependency, but at most METRIC_COLUMNS metrics.
    [workspace, *_] = json.loads(run(["dvc", "exp", "show", "--json"], synthetic_project).stdout)
    columns = [f"{file}:{key}" for file, shown in workspace["data"]["metrics"].items()
               for key in pd.json_normalize(shown["data"]).columns]
    assert len(columns) <= METRIC_COLUMNS, columns


def test_compare_command_on_the_sweep(synthetic_project, sweep, tracking_server):
    result = run(["pneumonia", "compare"], synthetic_project, MLFLOW_TRACKING_URI=tracking_server)
    assert f"{len(SWEEP)} runs of 'pneumonia' compared" in result.stdout
    out = synthetic_project / "reports/comparison"
    with (out / "runs.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert sorted(row["model.name"] for row in rows) == sorted(SWEEP)
    assert all(float(row["test_roc_auc"]) >= 0 and float(row["peak_memory_mb"]) > 0 for row in rows)
    assert all(f"sweep-{model}" in (out / "runs.md").read_text() for model in SWEEP)
    assert (out / "runs.png").read_bytes().startswith(PNG_MAGIC)


def page_text(url: str, profile: Path) -> str:
    """The text of an MLflow UI page once its scripts have run, as headless Chromium renders it."""
    dom = subprocess.run([chromium(), *FLAGS, f"--user-data-dir={profile}", "--virtual-time-budget=30000",
                          "--dump-dom", url], capture_output=True, text=True, timeout=180, check=True).stdout
    dom = re.sub(r"<(script|style)[^>]*>.*?</\1>", " ", dom, flags=re.S)
    return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", dom))


@pytest.fixture(scope="module")
def temp_experiment(synthetic_project, baseline) -> tuple[str, mlflow.entities.Run]:
    """`dvc exp run --temp` on the baseline (run in a copy of the workspace): its output and its one new MLflow run."""
    before = {r.info.run_id for r in mlflow_runs(synthetic_project)}
    result = run(["dvc", "exp", "run", "--temp", "-S", "train.learning_rate=0.002"], synthetic_project)
    [exp_run] = [r for r in mlflow_runs(synthetic_project) if r.info.run_id not in before]
    return result.stdout, exp_run


def test_temp_experiment_lands_in_the_same_store(temp_experiment):
    output, exp_run = temp_experiment
    assert "train" in stages_run(output)
    assert exp_run.data.params["train.learning_rate"] == "0.002"
    assert "test_roc_auc" in exp_run.data.metrics
    assert exp_run.data.tags.get("dvc.exp_name")


def test_mlflow_ui_shows_the_run_by_its_experiment_name_its_datasets_and_the_model_with_test_metrics(
        synthetic_project, temp_experiment, tmp_path):
    """`mlflow ui` as a user opens it: the run of `dvc exp run` named as `dvc exp show` names the
    experiment, the train/val/test manifests in its Datasets, the model's page with its test metrics."""
    _, exp_run = temp_experiment
    name = exp_run.data.tags["dvc.exp_name"]
    assert exp_run.info.run_name == name
    assert name in run(["dvc", "exp", "list", "--name-only"], synthetic_project).stdout.split()
    client = MlflowClient(f"sqlite:///{synthetic_project / 'mlflow.db'}")
    [model] = client.search_logged_models([exp_run.info.experiment_id],
                                          filter_string=f"source_run_id = '{exp_run.info.run_id}'")
    linked = {metric.key: metric for metric in model.metrics}
    assert linked["test_roc_auc"].dataset_name == "test" and linked["test_roc_auc"].model_id == model.model_id
    datasets = {i.dataset.name: i.dataset.digest for i in client.get_run(exp_run.info.run_id).inputs.dataset_inputs}
    assert set(datasets) == {"train", "val", "test"}
    assert not {"threshold", "jpeg_quality"} & set(exp_run.data.params)  # one clean name each

    with mlflow_tracking_server(synthetic_project / "mlflow.db") as ui:
        experiment = exp_run.info.experiment_id
        run_page = page_text(f"{ui}/#/experiments/{experiment}/runs/{exp_run.info.run_id}", tmp_path / "p1")
        model_page = page_text(f"{ui}/#/experiments/{experiment}/models/{model.model_id}", tmp_path / "p2")
    assert name in run_page
    # The run's Datasets panel lists the first dataset with its digest and context, the others as "+N".
    panel = re.search(r"Datasets (\w+) \((\w+)\) (\w+)(?: \+(\d+))?", run_page)
    assert panel, run_page[-3000:]
    first, digest, context, more = panel.groups()
    assert datasets[first] == digest and context in {"training", "validation", "testing"}
    assert 1 + int(more or 0) == len(datasets) == 3
    # The model's page: each test metric with the test dataset (and its digest) it was computed on.
    for key in ("test_roc_auc", "test_sensitivity", "test_specificity", "test_accuracy"):
        shown = re.search(rf"{key} test \(#{datasets['test']}\) {re.escape(name)} ([-\d.e]+)", model_page)
        assert shown and float(shown[1]) == pytest.approx(linked[key].value, abs=1e-9), (key, model_page[:3000])


def test_sample_dataset_end_to_end(tmp_path, repo_sample):
    """The real chest X-rays of the compact sample a clone runs on (data.source: local, the default), at a
    small image size, scored on the external set too (another acquisition: Kaggle's official test split)."""
    external_zip = shared_dataset("chest-xray-external.zip")
    project = copy_project(tmp_path)
    set_params(project, **{
        "data.source": "local", "data.local_path": str(repo_sample), "data.image_size": 64,
        "train.epochs": 2, "train.batch_size": 32, "tfrecords.workers": 2, "evaluate.external": str(external_zip),
        # two epochs near the full learning rate: the default cosine schedule would take it to 0 within them
        "train.lr_schedule": "exponential",
    })
    commit_all(project)
    result = run(["dvc", "repro"], project)
    assert stages_run(result.stdout) == STAGES

    data = json.loads((project / "data/split_counts.json").read_text())
    # The sample's own test split, exactly as shipped (data_sample/README.md).
    assert data["images"]["test"] == {"NORMAL": 116, "PNEUMONIA": 293}
    pool = sum(data["images"][split][c] for split in ("train", "val") for c in ("NORMAL", "PNEUMONIA"))
    assert pool + data["dropped_as_in_test"] == 209 + 602 + 8 + 8
    test_metrics = json.loads((project / "reports/evaluation/test.json").read_text())
    assert test_metrics["n"] == 116 + 293
    report = json.loads((project / "reports/data/summary.json").read_text())
    assert report["images"]["as_shipped"] == {"train": {"NORMAL": 209, "PNEUMONIA": 602},
                                              "val": {"NORMAL": 8, "PNEUMONIA": 8},
                                              "test": {"NORMAL": 116, "PNEUMONIA": 293}}
    assert report["unreadable"] == [] and report["raw_images"]["width"]["median"] == 224
    audit = json.loads((project / "data/audit.json").read_text())
    assert audit["passed"] and set(audit["leaks"].values()) == {0}, audit
    # Two epochs at 64 px already separate the classes on real X-rays (one did not on the compact sample: 0.67).
    assert test_metrics["roc_auc"] > 0.75, test_metrics
    external = json.loads((project / "reports/evaluation/external.json").read_text())
    assert external["n"] == 244 and external["patients"] == 171 and external["threshold"] == test_metrics["threshold"]
    assert external["ci95"]["roc_auc"]["low"] <= external["roc_auc"] <= external["ci95"]["roc_auc"]["high"]
    # after one epoch many maps are flat (no heat): the share is over those with heat
    assert 0 <= external["border_share"] <= 1 and 0 < external["border_audit_images"] <= 244
    assert 0 <= test_metrics["border_share"] <= 1
    assert "External set: another site" in (project / "reports/evaluation.html").read_text()
    # Another hospital's X-rays are mostly not out of distribution; the same X-rays inverted or on their side are
    assert external["ood_flagged_share"] <= 0.1, external["ood"]
    # ... nor taken for mirrored, while almost all are once mirrored left to right (ood.MirrorCheck)
    mirror = external["mirror"]
    assert mirror["flagged"] <= 0.05 * 244 and mirror["flagged_once_mirrored"] >= 0.95 * 244, mirror
    # ... nor taken for blurred or noisy (ood.DetailCheck)
    assert external["detail_flagged_share"] <= 0.05, external["detail"]
    assert_unlike_xrays_are_flagged(project, external_zip, tmp_path)
    assert_evaluation_is_where_users_look(project, tmp_path, external=True)


def assert_unlike_xrays_are_flagged(project: Path, external_zip: Path, scratch: Path) -> None:
    """`pneumonia predict` with the trained sample model flags external X-rays turned on their side or inverted
    out of distribution, the same X-rays mirrored left to right as mirrored, and enlarged from an eighth of their
    size (to the model's 64 px input, from 28 px) as blurred or with noise (sd 24 grey levels) as noisy."""
    import zipfile

    import numpy as np
    from PIL import Image, ImageOps

    def noisy(image: Image.Image) -> Image.Image:
        noise = np.random.default_rng(0).normal(0, 24, (image.height, image.width))
        return Image.fromarray(np.clip(np.asarray(image, np.float32) + noise, 0, 255).astype(np.uint8))

    folder = scratch / "unlike"
    folder.mkdir()
    with zipfile.ZipFile(external_zip) as archive:
        names = sorted(name for name in archive.namelist() if name.endswith(".jpeg"))[:10]
        for index, name in enumerate(names):
            image = Image.open(io.BytesIO(archive.read(name))).convert("L")
            unlike = image.rotate(90, expand=True) if index % 2 else ImageOps.invert(image)
            unlike.save(folder / f"{index}.png")
            ImageOps.mirror(image).save(folder / f"mirrored-{index}.png")
            changed = (noisy(image) if index % 2 else
                       image.resize((image.width // 8, image.height // 8)).resize(image.size, Image.BICUBIC))
            changed.save(folder / f"{'noisy' if index % 2 else 'blurred'}-{index}.png")
    run(["pneumonia", "predict", str(folder), "--json", str(scratch / "unlike.json")], project)
    rows = json.loads((scratch / "unlike.json").read_text())
    named = {kind: [row for row in rows if Path(row["file"]).name.startswith(kind)]
             for kind in ("mirrored", "blurred", "noisy")}
    unlike = [row for row in rows if Path(row["file"]).name[0].isdigit()]
    assert sum(row["out_of_distribution"] for row in unlike) >= 8, unlike
    assert all("out of distribution" in row["flags"] for row in rows if row["out_of_distribution"])
    assert len(named["mirrored"]) == 10 and sum(row["mirrored"] for row in named["mirrored"]) >= 9, named["mirrored"]
    for kind in ("blurred", "noisy"):
        assert len(named[kind]) == 5 and sum(row[kind] for row in named[kind]) >= 4, named[kind]
    for kind, flag in (("mirrored", "mirrored: left and right"), ("blurred", "blurred: less fine detail"),
                       ("noisy", "noisy: more fine-grained")):
        assert all((flag in row["flags"]) == row[kind] for row in rows), kind


def assert_evaluation_is_where_users_look(project: Path, scratch: Path, external: bool = False) -> None:
    """`dvc plots show` draws every figure, `dvc exp show` has the headline metrics, the HTML report
    opens in a browser with every image, the MLflow run has it all."""
    rendered = json.loads(run(["dvc", "plots", "show", "--json"], project).stdout)["data"]
    figure_count = {"plots/figures": 13 if external else 7, "reports/data/figures": 4}
    for name in yaml.safe_load((project / "dvc.yaml").read_text())["plots"]:  # folders of PNG figures
        figures = sorted((project / name).glob("*.png"))
        assert len(figures) == figure_count[name], figures
        for figure in figures:
            [image] = rendered[f"{name}/{figure.name}"]
            assert image["type"] == "image" and Path(image["url"]).stat().st_size > 1000

    [workspace, *_] = json.loads(run(["dvc", "exp", "show", "--json"], project).stdout)
    shown = workspace["data"]["metrics"]["metrics/evaluation.json"]["data"]
    assert isinstance(shown["threshold"], float)
    for split in ("test", *(["external"] if external else [])):
        assert {key: type(value) for key, value in shown[split].items()} == {
            "roc_auc": float, "sensitivity": float, "specificity": float, "accuracy": float, "ece": float}, shown

    loaded, total = open_in_chromium(project / "reports/evaluation.html", scratch / "report.png")
    assert loaded == total == figure_count["plots/figures"]
    assert_not_blank(scratch / "report.png")

    [mlflow_run] = mlflow_runs(project)
    assert {"evaluation/evaluation.html", "evaluation/gradcam.png", "evaluation/training_curves.png",
            "evaluation/calibration.csv"} <= artifact_paths(project, mlflow_run.info.run_id)
    assert {"test_threshold", "test_ci95_sensitivity_low", "test_specificity",
            "test_border_share"} <= mlflow_run.data.metrics.keys()
    if external:
        assert {"external_roc_auc", "external_ci95_roc_auc_low", "external_sensitivity", "external_specificity",
                "external_border_share"} <= mlflow_run.data.metrics.keys()
        assert (project / "reports/evaluation/external_roc.csv").is_file()


def test_a_dead_tracking_server_fails_fast(synthetic_project):
    dead = f"http://127.0.0.1:{free_port()}"
    started = time.monotonic()
    result = run(["python", "stages/train.py"], synthetic_project, check=False, MLFLOW_TRACKING_URI=dead)
    assert result.returncode == 2
    assert f"the MLflow tracking server {dead} (MLFLOW_TRACKING_URI) cannot be reached" in result.stderr
    assert "Epoch 1" not in result.stdout + result.stderr  # stopped before training
    assert time.monotonic() - started < 60
