"""dvc.yaml: cheap checks, no stage runs."""

import pytest
import yaml

from conftest import REPO
from pneumonia.config import Params, flatten

DVC_YAML = yaml.safe_load((REPO / "dvc.yaml").read_text())
# Settings that change how fast or where, not what a stage produces: not stage params, so changing
# them reruns nothing (issue 15).
NOT_RESULTS = {"tfrecords.workers", "train.backup_uri"}


def lookup(params: dict, dotted: str):
    value = params
    for part in dotted.split("."):
        value = value[part]
    return value


def covered(key: str, listed: list[str]) -> bool:
    return any(key == entry or key.startswith(entry + ".") for entry in listed)


def test_every_stage_says_what_it_does():
    for name, stage in DVC_YAML["stages"].items():
        assert len(stage.get("desc", "")) > 20, f"stage {name} has no desc: (shown by dvc stage list)"


@pytest.mark.parametrize("stage, sections", [("tfrecords", ["tfrecords"]), ("train", ["model", "train"]),
                                             ("evaluate", ["evaluate", "model", "train"])])
def test_stage_params_are_the_settings_that_change_results(stage, sections):
    listed = DVC_YAML["stages"][stage]["params"]
    keys = [key for key in flatten(Params()) if key.split(".")[0] in sections]
    assert not [key for key in keys if key in NOT_RESULTS and covered(key, listed)]
    missing = [key for key in keys if key not in NOT_RESULTS and not covered(key, listed)]
    assert not missing, f"{stage}: params.yaml keys that change results but are not stage params: {missing}"
