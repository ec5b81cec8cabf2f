"""Bad input at the stage level, as a user meets it: a clear message on stderr, exit code 2, no
traceback and no output that looks complete."""

import zipfile
from pathlib import Path

import numpy as np
import pytest

from conftest import copy_project, run, set_params
from pneumonia.data.synthetic import synthetic_image


@pytest.fixture
def project(tmp_path) -> Path:
    return copy_project(tmp_path / "project")


def assert_refused(result, *fragments: str) -> None:
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in result.stderr, result.stderr


def test_missing_local_path(project):
    set_params(project, **{"data.source": "local", "data.local_path": "no/such/archive.zip"})
    result = run(["python", "stages/download.py"], project, check=False)
    assert_refused(result, "data.local_path = 'no/such/archive.zip' does not exist")
    assert not (project / "data" / "raw").exists()


def test_archive_without_a_train_folder(project, tmp_path):
    archive = tmp_path / "wrong.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for split in ("validation", "test"):
            for label, name in enumerate(("NORMAL", "PNEUMONIA")):
                picture = synthetic_image(np.random.default_rng(label), 32, bool(label))
                path = tmp_path / f"{split}-{name}.png"
                picture.save(path)
                zf.write(path, f"chest_xray/{split}/{name}/image.png")
    set_params(project, **{"data.source": "local", "data.local_path": str(archive)})
    result = run(["python", "stages/download.py"], project, check=False)
    assert_refused(result, "no train/NORMAL/ or train/PNEUMONIA/ folder", "chest_xray")
    assert not (project / "data" / "raw").exists()
    assert not list((project / "data").glob(".raw.tmp-*"))


def test_missing_kaggle_credentials(project, tmp_path):
    set_params(project, **{"data.source": "kaggle"})
    result = run(["python", "stages/download.py"], project, check=False, HOME=str(tmp_path / "home"))
    assert_refused(result, "KAGGLE_API_TOKEN", "KAGGLE_USERNAME", "kaggle.json", "data.source: local")
    assert not (project / "data" / "raw").exists()


@pytest.mark.slow
@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("model.name", "resnet9000", "model.name = 'resnet9000': unknown model; allowed: custom_cnn"),
        ("train.epochs", "ten", "train.epochs = 'ten': Input should be a valid integer"),
    ],
)
def test_invalid_params_stop_the_train_stage_before_any_work(project, key, value, message):
    set_params(project, **{key: value})
    result = run(["python", "stages/train.py"], project, check=False)
    assert_refused(result, "params.yaml has invalid params", message)
    assert not (project / "models").exists()
