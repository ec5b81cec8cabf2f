"""dvc.yaml and the committed baseline (dvc.lock, metrics/, plots/): cheap checks, no stage runs."""

import re
import shutil
from collections import Counter

import pytest
import yaml
from PIL import Image
from ruamel.yaml import YAML

from conftest import REPO, commit_all, copy_project, run

DVC_YAML = yaml.safe_load((REPO / "dvc.yaml").read_text())


def lookup(params: dict, dotted: str):
    value = params
    for part in dotted.split("."):
        value = value[part]
    return value


def test_every_stage_says_what_it_does():
    for name, stage in DVC_YAML["stages"].items():
        assert len(stage.get("desc", "")) > 20, f"stage {name} has no desc: (shown by dvc stage list)"


def test_no_dependency_is_an_empty_file():
    """DVC prints "WARNING: '<path>' is empty." for an empty dependency at every stage that lists it
    (the end-to-end run asserts DVC prints no warning at all)."""
    deps = {dep for stage in DVC_YAML["stages"].values() for dep in stage.get("deps", [])}
    empty = sorted(dep for dep in deps if (REPO / dep).is_file() and (REPO / dep).stat().st_size == 0)
    assert not empty, f"empty files DVC would warn about: {empty}"


def test_bytecode_caches_in_a_source_folder_change_no_stage(tmp_path):
    """A stage that depends on a folder of src/ (train: src/pneumonia/models) is unchanged whether Python wrote
    its __pycache__ there or not (PYTHONDONTWRITEBYTECODE, another interpreter): .dvcignore leaves them out,
    else dvc.lock would differ from one machine to the next and a clone's second `dvc repro` train again."""
    project = copy_project(tmp_path / "project")
    commit_all(project)
    before = run(["dvc", "status", "--json", "train"], project).stdout
    cache = project / "src/pneumonia/models/__pycache__"
    cache.mkdir(exist_ok=True)
    (cache / "build.cpython-311.pyc").write_bytes(b"bytecode")
    assert run(["dvc", "status", "--json", "train"], project).stdout == before


@pytest.mark.slow
def test_dvc_plots_show_draws_every_figure_once_and_renders_offline(tmp_path):
    """Each PNG of plots/figures and reports/data/figures appears once in `dvc plots show`'s page
    (declared both as a stage plot and at top level, each was drawn twice; Vega charts of the CSVs
    repeated them), and the page loads nothing from elsewhere: DVC's Vega charts fetch their scripts
    from a CDN, blank offline."""
    for name in ("dvc.yaml", "params.yaml", "plots/train_history.csv", "plots/test_predictions.csv",
                 "plots/roc.csv", "plots/precision_recall.csv", "plots/calibration.csv"):  # the baseline's tables
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(REPO / name, tmp_path / name)
    figures = ["plots/figures/roc.png", "plots/figures/gradcam.png", "reports/data/figures/sample_grid.png"]
    for name in figures:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8)).save(tmp_path / name)
    run(["git", "init", "-q"], tmp_path)
    run(["dvc", "init", "-q"], tmp_path)
    run(["dvc", "plots", "show", "-o", "rendered"], tmp_path)
    page = (tmp_path / "rendered" / "index.html").read_text()
    drawn = Counter(re.findall(r'<img[^>]*src="static/workspace_([^"]+)\.png"', page))
    assert drawn == Counter({name.removesuffix(".png").replace("/", "_"): 1 for name in figures}), drawn
    assert not re.findall(r'(?:src|href)="(?:https?:)?//', page), "the page fetches from elsewhere: blank offline"
    assert "<script" not in page


def test_committed_lock_records_the_committed_params():
    """The baseline (dvc.lock, metrics/, plots/) describes params.yaml as committed: refresh it with
    `dvc repro` and commit when params.yaml changes (README "The committed baseline")."""
    # Read as DVC reads them (YAML 1.2, ruamel): to PyYAML's YAML 1.1 the `1e-05` DVC writes is a string.
    dvc_yaml = YAML(typ="safe")
    params = dvc_yaml.load((REPO / "params.yaml").read_text())
    stages = DVC_YAML["stages"]
    lock = dvc_yaml.load((REPO / "dvc.lock").read_text())["stages"]
    assert set(lock) == set(stages), "dvc.lock lacks stages of dvc.yaml: run `dvc repro` and commit"
    stale = []
    for name, stage in stages.items():
        recorded = lock[name].get("params", {}).get("params.yaml", {})
        assert set(recorded) == set(stage.get("params", [])), f"{name}: dvc.yaml params changed since dvc.lock"
        stale += [f"{name}: {key} = {value!r} in dvc.lock, {lookup(params, key)!r} in params.yaml"
                  for key, value in recorded.items() if lookup(params, key) != value]
    assert not stale, "the committed baseline is stale; run `dvc repro` and commit:\n" + "\n".join(stale)
