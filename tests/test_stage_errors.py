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


# Every stage with outputs outside DVC's cache (cache: false: committed in git, the baseline)
UNCACHED_OUTPUT_STAGES = ["data_report", "train", "evaluate"]


@pytest.mark.slow
def test_a_failed_stage_leaves_the_previous_results_in_place(project, tmp_path):
    """issue 27: `dvc exp run -S model.name=xception` failed in train (no network for the weights), and DVC had
    already deleted metrics/train.json and plots/train_history.csv (cache: false), which `dvc checkout` cannot
    bring back. persist: true keeps them until the stage writes them anew (atomically)."""
    import os

    import yaml

    from conftest import VENV_BIN, commit_all

    stages = yaml.safe_load((project / "dvc.yaml").read_text())["stages"]
    uncached = {}
    for name in UNCACHED_OUTPUT_STAGES:
        for entry in stages[name].get("outs", []) + stages[name].get("metrics", []):
            if isinstance(entry, dict):
                [(path, flags)] = entry.items()
                if flags.get("cache") is False and (project / path).is_file():  # committed: the baseline
                    uncached[path] = (project / path).read_bytes()
        # Stand-ins for the deps DVC checks exist; they differ from dvc.lock's, so the stage runs.
        for dep in stages[name]["deps"]:
            if not (project / dep).exists():
                (project / dep).parent.mkdir(parents=True, exist_ok=True)
                (project / dep).mkdir() if not Path(dep).suffix else (project / dep).write_text("{}")
    assert {"metrics/train.json", "plots/train_history.csv", "metrics/evaluation.json", "plots/roc.csv",
            "reports/data/summary.json"} <= uncached.keys()
    # A cached output too: the report (issue 33: any failed evaluate deleted it)
    (project / "reports" / "evaluation.html").write_text("<html>the last evaluation</html>")
    uncached["reports/evaluation.html"] = b"<html>the last evaluation</html>"
    commit_all(project)
    # Each stage fails as soon as it starts: a `python` that exits 2 (what fails does not matter to DVC).
    failing = tmp_path / "bin"
    failing.mkdir()
    (failing / "python").write_text("#!/bin/sh\necho 'error: the stage failed' >&2\nexit 2\n")
    (failing / "python").chmod(0o755)

    for name in reversed(UNCACHED_OUTPUT_STAGES):  # downstream first: each keeps the deps of the next
        result = run(["dvc", "repro", "--single-item", name], project, check=False,
                     PATH=os.pathsep.join([str(failing), str(VENV_BIN), os.environ["PATH"]]))
        assert result.returncode != 0 and "error: the stage failed" in result.stderr, result.stderr
    assert {path: (project / path).read_bytes() if (project / path).exists() else None for path in uncached} == uncached


def test_a_late_evaluate_failure_leaves_every_previous_output(tmp_path, monkeypatch):
    """issue 33: MLflow failing after the work (here: the run reopened fails) left the new threshold in
    metrics/evaluation.json, new reports/evaluation/ and plots/figures beside the old ones. Now nothing moves
    unless the run has them too; a success moves them all, and MLflow got the files that are then in place."""
    import importlib.util
    from contextlib import contextmanager
    from types import SimpleNamespace

    from pneumonia import paths, serving, tracking
    from pneumonia.errors import PipelineError

    spec = importlib.util.spec_from_file_location("evaluate_stage", Path(__file__).parents[1] / "stages/evaluate.py")
    stage = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(stage)
    monkeypatch.chdir(tmp_path)
    Path("params.yaml").write_text("{}\n")
    before = {}
    for output in stage.OUTPUTS:
        output.parent.mkdir(parents=True, exist_ok=True)
        if output.suffix:
            output.write_text("before")
        else:
            output.mkdir()
            (output / "before.txt").write_text("before")
        before[output] = sorted((p.as_posix(), p.read_text() if p.is_file() else "")
                                for p in [output, *output.rglob("*")])

    def report(folder, *args):
        (folder / "roc.png").write_text("after")
        return "<html>after</html>"

    table = (["a"], [[1]])
    split = SimpleNamespace(tables=lambda: {name: table for name in stage.TEST_TABLES}, scores={"threshold": 0.1})
    settings = SimpleNamespace(to_json=lambda: '{"after": true}\n')
    settings.model_copy = lambda update: settings
    result = SimpleNamespace(test=split, external=None, headline={"threshold": 0.1}, report=report, threshold=0.1,
                             mlflow_metrics=lambda: {}, settings=lambda *args: settings,
                             card=lambda *args: [("Intended use", ["after"])],
                             ood=SimpleNamespace(save=lambda path: path.write_text("after")))
    monkeypatch.setattr(stage, "evaluate", lambda *args: result)
    monkeypatch.setattr(stage, "model_digest", lambda path: "0" * 64)
    monkeypatch.setattr(stage, "training_data", lambda *args: None)
    monkeypatch.setattr(tracking, "manifests_hash", lambda path: "0" * 64)
    monkeypatch.setattr(stage, "load_model", lambda path, compile: None)
    monkeypatch.setattr(stage.engines, "onnx_model", lambda model: b"after")
    monkeypatch.setattr(tracking, "check_run", lambda run_info: None)

    @contextmanager
    def deleted_run(run_info):
        raise PipelineError("the MLflow run was deleted")
        yield

    monkeypatch.setattr(tracking, "resumed_run", deleted_run)
    with pytest.raises(PipelineError, match="the MLflow run was deleted"):
        stage.main()
    for output, listed in before.items():
        assert sorted((p.as_posix(), p.read_text() if p.is_file() else "")
                      for p in [output, *output.rglob("*")]) == listed
    assert not list(tmp_path.glob(".evaluate*"))

    logged = []
    monkeypatch.setattr(tracking, "resumed_run", contextmanager(lambda run_info: (yield)))
    monkeypatch.setattr(serving, "log_model", lambda *args, **kwargs: SimpleNamespace(model_id="m-1"))
    monkeypatch.setattr(tracking, "log_evaluation", lambda params, model_id, splits, outputs, report:
                        logged.extend((path.name, path.read_text()) for path in outputs))
    stage.main()
    assert paths.EVALUATION_METRICS.read_text() == '{\n  "threshold": 0.1\n}\n'
    assert [p.name for p in paths.FIGURES.iterdir()] == ["roc.png"] and paths.TEST_SCORES.is_file()
    assert paths.MODEL_SETTINGS.read_text() == '{"after": true}\n' and paths.OOD_REFERENCE.read_text() == "after"
    assert (paths.MODELS / "model.onnx").read_text() == "after"
    assert ("evaluation.html", "<html>after</html>") in logged and ("roc.png", "after") in logged
