"""The train stage as a SageMaker training job (docs/accelerators.md, Amazon SageMaker): the job's
environment and /opt/ml layout simulated in a temporary folder, as the SageMaker training toolkit
sets them up; nothing reaches AWS."""

import json
import os
import re
import shutil
import sys

import pytest

from conftest import REPO, run
from pneumonia.config import load_params, with_overrides
from pneumonia.errors import PipelineError
from pneumonia.training.sagemaker import METRIC_DEFINITIONS, TrainingJob

# Small and quick: one epoch of custom_cnn on the 48 px synthetic TFRecords, no augmentation.
HYPERPARAMETERS = {"train.epochs": 1, "train.batch_size": 8, "train.learning_rate": "2e-3", "model.crop": 0,
                   "train.augment.zoom": 0, "train.augment.translation": 0, "train.augment.rotation": 0,
                   "train.augment.contrast": 0,
                   "model_dir": "s3://bucket/job/model"}  # what the TensorFlow estimator adds


def documented_metric_definitions() -> list[dict[str, str]]:
    page = (REPO / "docs" / "accelerators.md").read_text()
    return [{"Name": name, "Regex": regex}  # raw strings on the page: the regexes as written
            for name, regex in re.findall(r'\{"Name": "(\w+)", "Regex": r"([^"]+)"\}', page)]


def job_environment(root, hyperparameters: dict) -> dict[str, str]:
    """The variables the toolkit sets for a job with one channel, "train", under `root` (for /opt/ml)."""
    return {
        "SM_MODEL_DIR": str(root / "model"),
        "SM_OUTPUT_DATA_DIR": str(root / "output" / "data"),
        "SM_INPUT_DIR": str(root / "input"),
        "SM_CHANNELS": json.dumps(["train"]),
        "SM_CHANNEL_TRAIN": str(root / "input" / "data" / "train"),
        "SM_HPS": json.dumps(hyperparameters),
        **{f"SM_HP_{name.upper()}": str(value) for name, value in hyperparameters.items()},
        "SM_CURRENT_HOST": "algo-1",
        "SM_HOSTS": json.dumps(["algo-1"]),
    }


@pytest.fixture
def opt_ml(tmp_path, synthetic_data):
    """/opt/ml of a job: the "train" channel holding data/'s tfrecords/ and class_weights.json, empty
    model and output folders; and the code folder (/opt/ml/code) with params.yaml."""
    root = tmp_path / "opt" / "ml"
    channel = root / "input" / "data" / "train"
    shutil.copytree(synthetic_data / "data" / "tfrecords", channel / "tfrecords")
    (channel / "class_weights.json").write_text(json.dumps({"0": 1.5, "1": 0.75}))
    for folder in ("model", "output/data", "code"):
        (root / folder).mkdir(parents=True)
    shutil.copy(REPO / "params.yaml", root / "code" / "params.yaml")
    return root


@pytest.mark.slow
def test_the_train_stage_runs_as_a_sagemaker_training_job(opt_ml):
    result = run([sys.executable, str(REPO / "stages" / "train.py")], opt_ml / "code",
                 **job_environment(opt_ml, HYPERPARAMETERS))
    assert (opt_ml / "model" / "model.keras").stat().st_size > 0
    summary = json.loads((opt_ml / "output" / "data" / "train.json").read_text())
    assert summary["epochs_trained"] == 1  # the hyperparameter, not params.yaml's 30
    assert (opt_ml / "output" / "data" / "train_history.csv").read_text().startswith("epoch,")
    assert sorted(path.name for path in (opt_ml / "code").iterdir()) == ["params.yaml"]  # nothing else written
    # every documented metric is found in the log, as SageMaker's metric_definitions would find it
    definitions = documented_metric_definitions()
    assert definitions == METRIC_DEFINITIONS
    found = {d["Name"]: [float(value) for value in re.findall(d["Regex"], result.stdout)] for d in definitions}
    assert all(len(found[name]) == 1 for name in found), found  # one epoch, one summary line
    assert found["best_val_auc"] == found["val_auc"] == [pytest.approx(summary["best_val_auc"], abs=1e-5)]
    assert found["best_epoch"] == [1.0]


def test_hyperparameters_are_params_yaml_keys_over_params_yaml():
    job = TrainingJob.from_environ(job_environment(REPO, {"train.epochs": 5, "train.learning_rate": "2e-3",
                                                          "model.name": "xception", "model_dir": "s3://b/m"}))
    params = load_params(REPO / "params.yaml", job.params_overrides())
    assert (params.train.epochs, params.train.learning_rate, params.model.name) == (5, 0.002, "xception")
    assert params.model.weights == "imagenet"  # `auto` resolved for the overridden model, as with -S
    assert job.channels == {"train": REPO / "input" / "data" / "train"}
    assert TrainingJob.from_environ({"PATH": "/usr/bin"}) is None  # not in a job: the DVC stage


def test_a_job_whose_hyperparameters_or_folders_are_wrong_stops_before_training(tmp_path):
    """issue 33: SM_HPS='[]' or 'null' gave an AttributeError traceback, SM_MODEL_DIR= (empty) wrote model.keras
    into the code folder with exit 0, and unwritable folders were found only after training."""
    for hyperparameters, kind in (("[]", "list"), ("null", "NoneType"), ('"x"', "str")):
        with pytest.raises(PipelineError, match=rf"SM_HPS is a JSON {kind}, not an object of hyperparameters"):
            TrainingJob.from_environ({**job_environment(tmp_path, {}), "SM_HPS": hyperparameters})
    for variable in ("SM_MODEL_DIR", "SM_OUTPUT_DATA_DIR"):
        with pytest.raises(PipelineError, match=rf"{variable} is empty: the folder SageMaker uploads from"):
            TrainingJob.from_environ({**job_environment(tmp_path, {}), variable: ""})
    (tmp_path / "a-file").write_text("")
    job = TrainingJob.from_environ({**job_environment(tmp_path, {}), "SM_MODEL_DIR": str(tmp_path / "a-file" / "m")})
    with pytest.raises(PipelineError, match=r"SM_MODEL_DIR = .*a-file/m is not a folder this job can write to"):
        job.check_folders()
    if os.geteuid() != 0:  # root writes anywhere
        (tmp_path / "locked").mkdir(mode=0o500)
        locked = {**job_environment(tmp_path, {}), "SM_OUTPUT_DATA_DIR": str(tmp_path / "locked")}
        job = TrainingJob.from_environ(locked)
        with pytest.raises(PipelineError, match=r"SM_OUTPUT_DATA_DIR = .*locked is not a folder this job can write"):
            job.check_folders()
    TrainingJob.from_environ(job_environment(tmp_path, {})).check_folders()  # the usual job: fine


def test_a_wrong_hyperparameter_or_a_missing_channel_stops_the_job_saying_what_to_do(tmp_path):
    with pytest.raises(PipelineError, match=r"train\.epoch: unknown key"):
        load_params(REPO / "params.yaml", {"train.epoch": 3})
    with pytest.raises(PipelineError, match=r"train\.epochs = 0"):
        load_params(REPO / "params.yaml", {"train.epochs": "0"})
    with pytest.raises(PipelineError, match=r"train\.epochs is not a section"):
        with_overrides({"train": {"epochs": 3}}, {"train.epochs.max": 3})
    environment = job_environment(tmp_path, {})
    with pytest.raises(PipelineError, match=r"lacks tfrecords/meta\.json, class_weights\.json.*aws s3 sync"):
        TrainingJob.from_environ(environment).tfrecords()
    del environment["SM_CHANNEL_TRAIN"]
    with pytest.raises(PipelineError, match=r"no 'train' channel: call estimator\.fit with inputs="):
        TrainingJob.from_environ(environment).tfrecords()
