"""dvc.yaml's stage deps cannot drift from the code: a module a stage imports, or a path it reads or
writes, that its stage does not declare would let a change go by without rerunning the stage (a stale
output under a fresh lock). Reads the source and dvc.yaml only; runs no DVC.
"""

import ast
import inspect
import textwrap
from pathlib import Path, PurePosixPath

import pytest
import yaml
from pydantic import BaseModel

from conftest import REPO, SRC, imported_modules, module_file
from pneumonia import paths
from pneumonia.config import Params, flatten

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


# model_settings' functions giving a file of a model's bundle from its .keras path
BUNDLE_FILES = {"settings_file", "ood_file", "onnx_file"}


def bundle_files_named(script: Path) -> set[PurePosixPath]:
    """The bundle files `script` names as `<model_settings function>(paths.NAME)`, e.g. onnx_file(paths.MODEL)."""
    from pneumonia import model_settings

    return {PurePosixPath(getattr(model_settings, node.func.id)(getattr(paths, node.args[0].attr)).as_posix())
            for node in ast.walk(ast.parse(script.read_text()))
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in BUNDLE_FILES
            and len(node.args) == 1 and isinstance(node.args[0], ast.Attribute)
            and isinstance(node.args[0].value, ast.Name) and node.args[0].value.id == "paths"}


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
    used = {constant: PurePosixPath(getattr(paths, constant).as_posix())
            for constant in sorted(paths_used(script_of(stage)) - UNDECLARED_PATHS.keys())}
    for name_or_path, path in [*used.items(), *((str(path), path) for path in bundle_files_named(script_of(stage)))]:
        if not any(covers(entry, path) or covers(path, entry) for entry in listed):
            missing[name_or_path] = str(path)
    assert not missing, f"stage {name} uses paths not in its deps, outs, metrics or plots: {missing}"


@pytest.mark.parametrize("name", sorted(STAGES))
def test_every_output_of_a_stage_is_named_by_its_script(name):
    """The one way outputs are written (docs/decisions.md): the stage script names every output it
    declares, and writes it or hands its path to the library function that streams it to disk; no
    library function picks an output's place itself."""
    stage = STAGES[name]
    named = [*(PurePosixPath(getattr(paths, constant).as_posix()) for constant in paths_used(script_of(stage))),
             *bundle_files_named(script_of(stage))]
    unnamed = [str(out) for out in declared(stage, "outs", "metrics", "plots")
               if not any(covers(path, out) or covers(out, path) for path in named)]
    assert not unnamed, f"stage {name}: its script does not name these outputs (paths.*): {unnamed}"


def test_the_import_walk_follows_packages_submodules_and_lazy_imports():
    """What the checks above rest on: the walk finds a package's __init__, a submodule imported by
    `from package import module`, and an import inside a function (distribute's keras_compat)."""
    files = {file.relative_to(SRC).as_posix() for file in transitive_imports(REPO / "stages" / "train.py")}
    assert {"pneumonia/__init__.py", "pneumonia/paths.py", "pneumonia/models/__init__.py",
            "pneumonia/keras_compat.py"} <= files
    assert "pneumonia/evaluation/report.py" not in files


# --- params: what each stage's code reads of params.yaml --------------------------------------------------

# Settings that change how fast or where, not what a stage produces: not stage params, so changing
# them reruns nothing (issue 15).
NOT_RESULTS = {"tfrecords.workers", "train.backup_uri"}
# Arguments (function, parameter) that are records of the run, not inputs of a DVC output: the MLflow
# run's params, all of params.yaml flattened (each key reruns the stages whose outputs it changes).
RECORDS = {("pneumonia.tracking.training_run", "params")}


def section_class(path: str) -> type:
    """The config class of params path `path` ("" for Params, "train", "data.synthetic", ...)."""
    cls = Params
    for part in filter(None, path.split(".")):
        cls = cls.model_fields[part].annotation
    return cls


def is_section(cls: type, name: str) -> bool:
    annotation = cls.model_fields[name].annotation
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


def leaf_keys(path: str) -> set[str]:
    """The params.yaml keys at or under `path`."""
    return {key for key in flatten(Params()) if not path or key == path or key.startswith(path + ".")}


class ParamsReads:
    """Follows the config objects through the code a stage runs, from `load_params()` on: an attribute
    that is a params key is read (`params.train.epochs`); a section passed to a function of the package
    is followed into it (by parameter name), as is a property or method of the config classes; a section
    dumped (`model_dump`) or handed to code outside the package counts as read whole."""

    def __init__(self):
        self.reads: set[str] = set()
        self._done: set[tuple] = set()

    # where a called name leads: a function, a method, or a module of the package
    def _module_names(self, file: Path) -> dict[str, str]:
        names = {}
        for node in ast.walk(ast.parse(file.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("pneumonia"):
                names.update({alias.asname or alias.name: f"{node.module}.{alias.name}" for alias in node.names})
            elif isinstance(node, ast.Import):
                names.update({alias.asname or alias.name: alias.name for alias in node.names})
        return names

    def _definition(self, dotted: str) -> tuple[Path, ast.AST] | None:
        """The FunctionDef (or ClassDef) `dotted` names, with its file: pneumonia.x.f, pneumonia.x.C.m."""
        parts = dotted.split(".")
        for split in range(len(parts), 0, -1):
            file = module_file(".".join(parts[:split]))
            if file:
                break
        else:
            return None
        node = ast.parse(file.read_text())
        for name in parts[split:]:
            found = [child for child in node.body if isinstance(child, ast.FunctionDef | ast.ClassDef)
                     and child.name == name]
            if not found:
                return None
            node = found[0]
        return (file, node) if split < len(parts) else None

    def _resolve(self, func: ast.expr, names: dict[str, str], file: Path) -> str | None:
        if isinstance(func, ast.Name):
            local = module_name(file)
            if local and self._definition(f"{local}.{func.id}"):
                return f"{local}.{func.id}"
            return names.get(func.id)
        if isinstance(func, ast.Attribute):
            base = self._resolve(func.value, names, file)
            return f"{base}.{func.attr}" if base else None
        return None

    def follow(self, dotted: str, bound: dict[str, str], args: list[ast.expr] | None = None) -> None:
        """Run the analysis over function `dotted` with its parameters bound to params paths."""
        definition = self._definition(dotted)
        if definition is None:
            for path in bound.values():  # outside the package: read whole
                self.reads |= leaf_keys(path)
            return
        file, node = definition
        if isinstance(node, ast.ClassDef):  # a constructor: its fields are records of the class
            node = next((child for child in node.body if isinstance(child, ast.FunctionDef)
                         and child.name == "__init__"), None)
            if node is None:
                for path in bound.values():
                    self.reads |= leaf_keys(path)
                return
        key = (dotted, tuple(sorted(bound.items())))
        if key in self._done:
            return
        self._done.add(key)
        self._walk(node, dict(bound), self._module_names(file), file)

    def _bind(self, node: ast.FunctionDef, values: list, keywords: dict) -> dict[str, str]:
        params = [arg.arg for arg in node.args.posonlyargs + node.args.args]
        if params and params[0] in ("self", "cls"):
            params = params[1:]
        bound = {name: value for name, value in zip(params, values, strict=False) if isinstance(value, str)}
        bound.update({name: value for name, value in keywords.items() if isinstance(value, str)})
        return bound

    def _value(self, node: ast.AST, bound: dict[str, str], names: dict[str, str], file: Path):
        """The params path `node` evaluates to (a section), or None; records the keys it reads."""
        if isinstance(node, ast.Name):
            return bound.get(node.id)
        if isinstance(node, ast.Attribute):
            base = self._value(node.value, bound, names, file)
            if base is None:
                return None
            cls = section_class(base)
            key = f"{base}.{node.attr}".lstrip(".")
            if node.attr in cls.model_fields:
                if is_section(cls, node.attr):
                    return key
                self.reads.add(key)
                return None
            member = inspect.getattr_static(cls, node.attr, None)
            if isinstance(member, property):
                self._config_member(member.fget, base)
            return ("method", base, node.attr)
        if isinstance(node, ast.Call):
            func = self._value(node.func, bound, names, file)
            dotted = self._resolve(node.func, names, file)
            definition = self._definition(dotted) if dotted else None
            parameters = ([arg.arg for arg in definition[1].args.posonlyargs + definition[1].args.args
                           if arg.arg not in ("self", "cls")]
                          if definition and isinstance(definition[1], ast.FunctionDef) else [])
            values = [self._argument(arg, (dotted, name), bound, names, file)
                      for arg, name in zip(node.args, parameters + [None] * len(node.args), strict=False)]
            keywords = {kw.arg: self._argument(kw.value, (dotted, kw.arg), bound, names, file)
                        for kw in node.keywords}
            if isinstance(func, tuple):  # a method of a config class
                _, base, method = func
                if method == "model_dump":
                    self.reads |= leaf_keys(base)
                elif method == "model_copy":  # the section again, with keys the code sets, not reads
                    return base
                elif callable(member := getattr(section_class(base), method, None)):
                    self._config_member(member, base)
                return None
            if dotted == "pneumonia.config.load_params":
                return ""
            tracked = [value for value in [*values, *keywords.values()] if isinstance(value, str)]
            if tracked:
                if definition and isinstance(definition[1], ast.FunctionDef):
                    self.follow(dotted, self._bind(definition[1], values, keywords))
                else:
                    self.follow(dotted or "<outside>", {str(i): path for i, path in enumerate(tracked)})
            return None
        self._walk(node, bound, names, file)
        return None

    def _argument(self, node: ast.expr, parameter: tuple, bound: dict[str, str], names: dict[str, str],
                  file: Path):
        """An argument's value; what a record (RECORDS) is made of is not read."""
        if parameter not in RECORDS:
            return self._value(node, bound, names, file)
        reads = set(self.reads)
        self._value(node, bound, names, file)
        self.reads = reads
        return None

    def _walk(self, node: ast.AST, bound: dict[str, str], names: dict[str, str], file: Path) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.Assign | ast.AnnAssign) and child.value is not None:
                value = self._value(child.value, bound, names, file)
                targets = child.targets if isinstance(child, ast.Assign) else [child.target]
                for target in targets:
                    if isinstance(target, ast.Name):
                        if isinstance(value, str):
                            bound[target.id] = value
                        else:
                            bound.pop(target.id, None)
                    else:
                        self._value(target, bound, names, file)
            elif isinstance(child, ast.expr):
                self._value(child, bound, names, file)
            else:
                self._walk(child, bound, names, file)

    def _config_member(self, function, base: str) -> None:
        """A property or method of a config class, `self` being the section at `base`."""
        node = ast.parse(textwrap.dedent(inspect.getsource(function))).body[0]
        file = Path(inspect.getsourcefile(function))
        key = (f"{function.__qualname__}", base)
        if key in self._done:
            return
        self._done.add(key)
        self._walk(node, {"self": base}, self._module_names(file), file)


def module_name(file: Path) -> str | None:
    return ".".join(file.relative_to(SRC).with_suffix("").parts) if file.is_relative_to(SRC) else None


def params_read(script: Path) -> set[str]:
    """The params.yaml keys running `script` reads (its `main`, and all it calls)."""
    analysis = ParamsReads()
    analysis._walk(ast.parse(script.read_text()), {}, analysis._module_names(script), script)
    return analysis.reads


@pytest.mark.parametrize("name", sorted(STAGES))
def test_stage_params_are_what_its_code_reads(name):
    """dvc.yaml's `params` of a stage are the params.yaml keys its code reads, both ways: a key read but
    not declared changes the output without rerunning the stage; a key declared but not read reruns it
    for nothing (class_weights declared train.label_smoothing). Speed and place settings (NOT_RESULTS)
    are read but never declared."""
    stage = STAGES[name]
    declared_keys = set().union(*(leaf_keys(entry) for entry in stage.get("params", [])))
    read = params_read(script_of(stage))
    assert not declared_keys & NOT_RESULTS, f"stage {name} declares settings that change no result"
    missing, extra = sorted(read - NOT_RESULTS - declared_keys), sorted(declared_keys - read)
    assert not missing, f"stage {name} reads these params.yaml keys, not in its params in dvc.yaml: {missing}"
    assert not extra, f"stage {name} declares params its code never reads: {extra}"


def test_the_params_walk_follows_sections_properties_records_and_dumps(tmp_path):
    """What the check above rests on: a section passed into the package is followed by parameter name,
    through further calls (the augmentation's fields read in pneumonia.models); a property reads what
    its body reads (`model.backbone`: model.name); a record (MLflow's params) reads nothing; a dump
    reads the whole section."""
    def read(code: str) -> set[str]:
        script = tmp_path / "script.py"
        script.write_text("from pneumonia import tracking\nfrom pneumonia.config import flatten, load_params\n"
                          "from pneumonia.models.build import build_model\nparams = load_params()\n" + code)
        return params_read(script)

    # every augmentation but mixup and cutmix, which mix batches in the input pipeline (pneumonia.training.fit)
    assert read("build_model(params.model, 128, params.train.augment)") >= leaf_keys("train.augment") - {
        "train.augment.mixup", "train.augment.cutmix"}
    assert not {key for key in read("build_model(params.model, 128, params.train.augment)")
                if key.startswith(("train.epochs", "data.", "evaluate."))}
    assert read("params.model.backbone") == {"model.name"}
    assert read("tracking.training_run(params.tracking, flatten(params), None)") == {"tracking.experiment"}
    assert read("params.evaluate.model_dump()") == leaf_keys("evaluate")
    assert params_read(REPO / "stages" / "class_weights.py") == {"train.class_balance"}
