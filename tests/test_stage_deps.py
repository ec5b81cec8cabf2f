"""dvc.yaml's stage deps cannot drift from the code: a module a stage imports, or a path it reads or
writes, that its stage does not declare would let a change go by without rerunning the stage (a stale
output under a fresh lock). Reads the source and dvc.yaml only; runs no DVC.
"""

import ast
from pathlib import Path, PurePosixPath

import pytest
import yaml

from conftest import REPO, SRC, imported_modules, module_file
from pneumonia import paths

STAGES = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]

# paths.* constants a stage script may use without declaring them, and why.
UNDECLARED_PATHS = {
    "PARAMS": "params.yaml is declared key by key, in the stage's `params`",
    "TRAIN_BACKUP": "an unfinished training's state; as an output DVC would delete it before the stage resumes from it",
}


def transitive_imports(script: Path) -> set[Path]:
    """Every source file of `pneumonia` that running `script` can execute: each imported module and the
    `__init__.py` of every package above it, followed through their own imports."""
    seen: set[Path] = set()
    todo = [script]
    while todo:
        for module in imported_modules(todo.pop()):
            parts = module.split(".")
            for depth in range(1, len(parts) + 1):
                file = module_file(".".join(parts[:depth]))
                if file not in seen:
                    seen.add(file)
                    todo.append(file)
    return seen


def declared(stage: dict, *sections: str) -> list[PurePosixPath]:
    """The paths listed in a stage's sections (`deps`, `outs`, ...), entries with options included."""
    entries = [entry for section in sections for entry in stage.get(section, [])]
    return [PurePosixPath(next(iter(entry)) if isinstance(entry, dict) else entry) for entry in entries]


def covers(listed: PurePosixPath, path: PurePosixPath) -> bool:
    return listed == path or listed in path.parents


def script_of(stage: dict) -> Path:
    words = stage["cmd"].split()
    assert words[:2] == ["python", words[1]] and words[1].startswith("stages/"), stage["cmd"]
    return REPO / words[1]


def paths_used(script: Path) -> set[str]:
    """The `paths.NAME` constants (upper case) `script` refers to."""
    return {node.attr for node in ast.walk(ast.parse(script.read_text()))
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "paths"
            and node.attr.isupper()}


@pytest.mark.parametrize("name", sorted(STAGES))
def test_every_module_a_stage_imports_is_a_dep(name):
    stage = STAGES[name]
    script = script_of(stage)
    deps = declared(stage, "deps")
    relative = PurePosixPath(script.relative_to(REPO).as_posix())
    assert relative in deps, f"stage {name}: its script {relative} is not in its deps"
    missing = sorted(str(file.relative_to(REPO)) for file in transitive_imports(script)
                     if not any(covers(dep, PurePosixPath(file.relative_to(REPO).as_posix())) for dep in deps))
    assert not missing, f"stage {name} imports these, not covered by its deps in dvc.yaml: {missing}"


@pytest.mark.parametrize("name", sorted(STAGES))
def test_every_path_a_stage_script_uses_is_declared(name):
    """A path the script reads or writes is a dep or an output: the path itself, a folder holding it,
    or a file inside it (a stage may read one file of a folder, e.g. the training manifest)."""
    stage = STAGES[name]
    listed = declared(stage, "deps", "outs", "metrics", "plots")
    missing = {}
    for constant in sorted(paths_used(script_of(stage)) - UNDECLARED_PATHS.keys()):
        path = PurePosixPath(getattr(paths, constant).as_posix())
        if not any(covers(entry, path) or covers(path, entry) for entry in listed):
            missing[constant] = str(path)
    assert not missing, f"stage {name} uses paths not in its deps, outs, metrics or plots: {missing}"


def test_the_import_walk_follows_packages_submodules_and_lazy_imports():
    """What the checks above rest on: the walk finds a package's __init__, a submodule imported by
    `from package import module`, and an import inside a function (distribute's keras_compat)."""
    files = {file.relative_to(SRC).as_posix() for file in transitive_imports(REPO / "stages" / "train.py")}
    assert {"pneumonia/__init__.py", "pneumonia/paths.py", "pneumonia/models/__init__.py",
            "pneumonia/keras_compat.py"} <= files
    assert "pneumonia/evaluation/report.py" not in files
