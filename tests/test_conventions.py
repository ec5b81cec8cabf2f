"""One way to do each small thing (issue 35): figures, CSV and JSON files each written by one helper, MLflow
called from tracking.py (and the MLflow model it logs), no constant name with two meanings, benchmarks
that import nothing from tests/, and an evaluation package handed values rather than params. Reads the
source only."""

import ast
from collections import defaultdict
from pathlib import Path

import pytest

from conftest import REPO, SRC, imported_modules

LIBRARY = sorted((SRC / "pneumonia").rglob("*.py"))
CODE = LIBRARY + sorted((REPO / "stages").glob("*.py")) + sorted((REPO / "benchmarks").glob("*.py")) + [
    REPO / "harness.py"]
# Module constants that several modules define with one meaning, each its own value.
SHARED_CONSTANT_NAMES = {
    "TARGET": "a benchmark's target figure",
    "RULES": "the threshold rules a benchmark compares",
}
# Modules that call MLflow: tracking.py, and the MLflow model the evaluate stage logs (a pyfunc PythonModel).
MLFLOW_MODULES = {"pneumonia/tracking.py", "pneumonia/serving.py"}
# JSON written without write_json, and why.
OTHER_JSON_WRITES = {"src/pneumonia/serving.py": "a scratch file in a temporary folder that MLflow copies into the "
                                                 "logged model"}


def relative(file: Path) -> str:
    return file.relative_to(REPO).as_posix()


def tree(file: Path) -> ast.Module:
    return ast.parse(file.read_text(), str(file))


def dotted(node: ast.expr) -> str:
    """`a.b.c` for an attribute chain, '' for anything else."""
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        base = dotted(node.value)
        return f"{base}.{node.attr}" if base else ""
    return ""


def called(file: Path) -> list[tuple[str, ast.Call]]:
    return [(dotted(node.func), node) for node in ast.walk(tree(file)) if isinstance(node, ast.Call)]


def where(files: list[Path], test) -> list[str]:
    return sorted({relative(file) for file in files for name, call in called(file) if test(name, call)})


def test_figures_are_saved_by_one_helper():
    """pneumonia.plotting chooses matplotlib's backend and saves every figure (atomically)."""
    assert where(CODE, lambda name, _: name.endswith(".savefig")) == ["src/pneumonia/plotting.py"]
    assert where(CODE, lambda name, _: name == "matplotlib.use") == ["src/pneumonia/plotting.py"]


def test_csv_files_are_written_by_one_helper():
    """atomic.write_csv, quoting as the csv module does."""
    assert where(CODE, lambda name, _: name in ("csv.writer", "csv.DictWriter")) == ["src/pneumonia/atomic.py"]


def test_json_files_are_written_by_one_helper():
    """atomic.write_json: no `path.write_text(json.dumps(...))` (not atomic), no json.dump into a handle."""
    def writes_json(name: str, call: ast.Call) -> bool:
        dumps = any(isinstance(arg, ast.Call) and dotted(arg.func) == "json.dumps" for arg in ast.walk(call)
                    if arg is not call)
        return name == "json.dump" or (name.endswith(".write_text") and dumps)

    assert set(where(CODE, writes_json)) <= {"src/pneumonia/atomic.py", *OTHER_JSON_WRITES}


def test_only_tracking_calls_mlflow():
    users = set()
    for file in LIBRARY:
        for node in ast.walk(tree(file)):
            names = ([alias.name for alias in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            if any(name.split(".")[0] == "mlflow" for name in names):
                users.add(file.relative_to(SRC).as_posix())
    assert users <= MLFLOW_MODULES, f"these modules import MLflow: {sorted(users - MLFLOW_MODULES)}"


def test_no_constant_name_means_two_things():
    """A module constant's name is defined in one module (the others import it), or means one thing in each."""
    defined = defaultdict(list)
    for file in CODE:
        for node in tree(file).body:
            targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(
                node, ast.AnnAssign) else []
            for target in targets:
                if isinstance(target, ast.Name) and target.id.isupper():
                    defined[target.id].append(relative(file))
    twice = {name: files for name, files in defined.items() if len(files) > 1 and name not in SHARED_CONSTANT_NAMES}
    assert not twice, f"one name, defined in several modules: {twice}"


@pytest.mark.parametrize("file", sorted((REPO / "benchmarks").glob("*.py")), ids=lambda file: file.name)
def test_benchmarks_import_nothing_from_tests(file):
    """What a benchmark shares with the tests lives in a module both import (harness.py, the package)."""
    test_modules = {path.stem for path in (REPO / "tests").glob("*.py")}
    imported = set()
    for node in ast.walk(tree(file)):
        if isinstance(node, ast.Import):
            imported |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module.split(".")[0])
    assert not imported & test_modules, f"{file.name} imports from tests/: {sorted(imported & test_modules)}"
    assert '"tests"' not in file.read_text(), f"{file.name} names the tests folder (sys.path?)"


EVALUATION = sorted(file for file in (SRC / "pneumonia" / "evaluation").glob("*.py") if file.name != "__init__.py")


def test_only_the_evaluate_entry_of_the_evaluation_takes_params():
    """evaluation/evaluate.py reads the evaluate section and hands each function the values it needs
    (score_split a seed, not the whole EvaluateConfig): what a function depends on is in its signature."""
    takers = [relative(file) for file in EVALUATION
              if file.name != "evaluate.py" and "pneumonia.config" in imported_modules(file)]
    assert not takers, f"these evaluation modules import the params schema (pneumonia.config): {takers}"
