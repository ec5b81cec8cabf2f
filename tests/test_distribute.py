"""Where training runs: strategy and precision selection, its clear errors, and a real two-worker
MultiWorkerMirroredStrategy training through the train stage on 127.0.0.1."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import keras
import pytest
import tensorflow as tf
import yaml
from mlflow.tracking import MlflowClient

from conftest import REPO, free_port, tool_env
from pneumonia import distribute
from pneumonia.errors import PipelineError


@pytest.fixture
def no_cluster(monkeypatch):
    for name in ("TF_CONFIG", "TPU_NAME"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(distribute, "TPU_VM_DEVICE", Path("/nonexistent/accel0"))


def test_auto_on_a_cpu_machine_is_the_default_strategy_in_float32(no_cluster):
    placement = distribute.place("auto", "auto")
    assert (placement.strategy_name, placement.device, placement.precision) == ("default", "cpu", "float32")
    assert placement.replicas == 1 and placement.is_chief and placement.worker_name == "chief"
    assert keras.mixed_precision.global_policy().name == "float32"
    assert placement.describe() == {"placement.strategy": "default", "placement.replicas": 1,
                                    "placement.device": "cpu", "placement.precision": "float32"}


@pytest.mark.parametrize("accelerator, names", [("tpu", ["TPU_NAME", "TPU build"]),
                                                ("gpu", ["no GPU", "pip install -e '.[gpu]'", "nvidia-smi"])])
def test_asking_for_a_missing_accelerator_is_a_clear_error_not_a_cpu_run(no_cluster, accelerator, names):
    with pytest.raises(PipelineError) as error:
        distribute.select_strategy(accelerator)
    message = str(error.value)
    assert f"train.accelerator = '{accelerator}'" in message and all(name in message for name in names)


def test_precision_follows_the_device(monkeypatch):
    assert distribute.select_precision("auto", "cpu") == "float32"
    for native_bfloat16 in (True, False):  # on a CPU, bfloat16 for the backbones where the CPU has it
        monkeypatch.setattr(distribute, "cpu_has_bfloat16", lambda native=native_bfloat16: native)
        assert distribute.select_precision("auto", "cpu", backbone=True) == (
            "mixed_bfloat16" if native_bfloat16 else "float32")
        assert distribute.select_precision("auto", "cpu", backbone=False) == "float32"
    assert distribute.select_precision("float32", "cpu", backbone=True) == "float32"
    assert distribute.select_precision("auto", "tpu") == "mixed_bfloat16"
    assert distribute.select_precision("mixed_float16", "cpu") == "mixed_float16"  # asked for: as asked

    def gpus_with(capability):
        monkeypatch.setattr(tf.config, "list_physical_devices", lambda kind=None: ["GPU:0"] if kind == "GPU" else [])
        monkeypatch.setattr(tf.config.experimental, "get_device_details",
                            lambda device: {"compute_capability": capability})

    gpus_with((8, 0))  # an A100: tensor cores
    assert distribute.select_precision("auto", "gpu") == "mixed_float16"
    gpus_with((6, 1))  # a P4: float16 would not pay
    assert distribute.select_precision("auto", "gpu") == "float32"


def test_mixed_precision_keeps_the_output_layer_in_float32(no_cluster):
    from pneumonia.config import ModelConfig
    from pneumonia.models.build import build_model

    distribute.place("cpu", "mixed_bfloat16")
    try:
        model = build_model(ModelConfig(crop=0, name="custom_cnn"), 32)
        assert any(layer.dtype_policy.compute_dtype == "bfloat16" for layer in model.layers)
        assert model.layers[-1].dtype_policy.name == "float32" and model.output.dtype == "float32"
    finally:
        keras.mixed_precision.set_global_policy("float32")


def test_the_cluster_comes_from_tf_config(monkeypatch):
    monkeypatch.setenv("TF_CONFIG", json.dumps({"cluster": {"chief": ["a:1"], "worker": ["b:1", "c:1"]},
                                                "task": {"type": "worker", "index": 0}}))
    assert distribute.cluster_workers() == 3
    monkeypatch.setenv("TF_CONFIG", json.dumps({"cluster": {"worker": ["a:1"]},
                                                "task": {"type": "worker", "index": 0}}))
    assert distribute.cluster_workers() == 1  # one machine: no multi-worker strategy
    monkeypatch.delenv("TF_CONFIG")
    assert distribute.cluster_workers() == 0


def prepared_project(synthetic_data: Path, dest: Path, **train: object) -> Path:
    """A folder the train stage can run in: the synthetic TFRecords and the small inputs it logs."""
    shutil.copytree(synthetic_data / "data", dest / "data")
    (dest / "data/class_weights.json").write_text(json.dumps({"0": 1.0, "1": 1.0}))
    (dest / "data/raw/source.json").write_text(json.dumps({"source": "synthetic"}))
    (dest / "data/split_counts.json").write_text("{}")
    (dest / "reports/data").mkdir(parents=True)
    (dest / "reports/data/summary.json").write_text("{}")
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["data"].update(source="synthetic", image_size=48)
    params["train"].update({"epochs": 1, "batch_size": 4, **train})
    (dest / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return dest


def train_stage(project: Path, **env: str) -> subprocess.Popen:
    # One thread each: two workers share a small machine with the rest of the test suite.
    return subprocess.Popen([sys.executable, str(REPO / "stages/train.py")], cwd=project,
                            env=tool_env(OMP_NUM_THREADS="1", TF_NUM_INTRAOP_THREADS="1",
                                         TF_NUM_INTEROP_THREADS="1", **env),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def run_store(project: Path) -> MlflowClient:
    return MlflowClient(f"sqlite:///{project / 'mlflow.db'}")


@pytest.mark.e2e
def test_two_workers_train_one_epoch_and_only_the_chief_writes(synthetic_data, tmp_path):
    ports = {free_port()}
    while len(ports) < 2:
        ports.add(free_port())
    cluster = {"worker": [f"127.0.0.1:{port}" for port in ports]}
    # Each worker in its own copy, as on two machines: what the other one writes shows.
    projects = [prepared_project(synthetic_data, tmp_path / f"worker{index}") for index in range(2)]
    workers = [train_stage(project,
                           TF_CONFIG=json.dumps({"cluster": cluster, "task": {"type": "worker", "index": index}}))
               for index, project in enumerate(projects)]
    outputs = []
    for worker in workers:
        try:
            outputs.append(worker.communicate(timeout=240)[0])
        except subprocess.TimeoutExpired:
            for other in workers:
                other.kill()
            raise
    assert [worker.returncode for worker in workers] == [0, 0], "\n".join(outputs)[-6000:]

    chief, other = projects
    assert (chief / "models/model.keras").is_file() and (chief / "metrics/train.json").is_file()
    assert json.loads((chief / "metrics/train.json").read_text())["epochs_trained"] == 1
    [run] = run_store(chief).search_runs([run_store(chief).get_experiment_by_name("pneumonia").experiment_id])
    assert run.data.tags["placement.strategy"] == "multi_worker_mirrored"
    assert run.data.tags["placement.replicas"] == "2"
    assert [point.step for point in run_store(chief).get_metric_history(run.info.run_id, "val_auc")] == [1]
    assert not (other / "models").exists() and not (other / "metrics/train.json").exists()
    assert not (other / "mlflow.db").exists() and not (other / "mlartifacts").exists()
    # Both cleaned up their backups once training had finished.
    assert not (chief / "backup").exists() and not (other / "backup").exists()
