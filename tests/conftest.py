"""Shared fixtures: the samples and a small synthetic dataset; the package's import graph as read from its
source (tests/test_stage_deps.py, tests/test_layers.py). Project copies, tools and servers: harness.py."""

import ast
import inspect
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

# The tools, project copies and servers the benchmarks use too, for the tests that import them from here.
from harness import (  # noqa: F401
    REPO,
    VENV_BIN,
    commit_all,
    copy_project,
    free_port,
    mlflow_model_server,
    mlflow_tracking_server,
    run,
    set_params,
    stop_group,
    tool_env,
    wait_until_answering,
)

SRC = REPO / "src"
SHARED_DATASETS = REPO.parent / "shared" / "datasets"
SAMPLE_ZIP = SHARED_DATASETS / "chest-xray-sample.zip"
# The compact sample committed in the repository (data_sample/README.md): on every clone.
REPO_SAMPLE = REPO / "data_sample" / "chest-xray-small.zip"
# CI sets this (.ci/run): there ../shared exists, and a test that needs it must run, not be skipped.
REQUIRE_SHARED = os.environ.get("PNEUMONIA_REQUIRE_SHARED") == "1"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"  # how every PNG file starts

# Keep TensorFlow quiet and off any GPU a developer may have: tests are about behaviour, not speed.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def module_file(module: str) -> Path | None:
    """The source file of `pneumonia...` module `module`, or None when it is not a module of the package."""
    base = SRC.joinpath(*module.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def imported_modules(file: Path) -> set[str]:
    """The `pneumonia` modules `file` imports, anywhere in it (also inside functions: they run when called)."""
    # the package a relative import starts from: pneumonia/a/b.py and pneumonia/a/__init__.py are both in pneumonia.a
    package = list(file.relative_to(SRC).parts[:-1]) if file.is_relative_to(SRC) else []
    modules = set()
    for node in ast.walk(ast.parse(file.read_text(), str(file))):
        if isinstance(node, ast.Import):
            modules.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: `.` is the package, each further dot one level up
                base = ".".join(package[:len(package) - node.level + 1] + ([node.module] if node.module else []))
            else:
                base = node.module
            modules.add(base)
            # `from pneumonia.x import y` imports submodule pneumonia.x.y when y is one
            modules.update(f"{base}.{alias.name}" for alias in node.names)
    return {module for module in modules if module.split(".")[0] == "pneumonia" and module_file(module)}


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist reads the xdist_group marks
def pytest_collection_modifyitems(items) -> None:
    """Mark `shared` every test that reads ../shared/datasets (the sample_zip fixture or shared_dataset),
    so CI can run them where the folder exists and the rest in a clone with nothing beside it.

    The tests run on every core (pytest-xdist, `--dist loadgroup` in pyproject.toml); the tests of a
    module that share a module-scoped fixture (a trained project they only read) go to one worker, so
    it is made once. The longest work goes first (end-to-end, then slow, then the rest; pyproject.toml turns
    off pytest-xdist's own reordering by group size), so that no long group starts last and runs alone."""
    for item in items:
        function = getattr(item, "function", None)
        if "sample_zip" in getattr(item, "fixturenames", ()) or (
                function is not None and "shared_dataset(" in inspect.getsource(function)):
            item.add_marker(pytest.mark.shared)
        if item.get_closest_marker("e2e"):
            item.add_marker(pytest.mark.slow)
        fixtures = getattr(item, "_fixtureinfo", None)
        if fixtures and any(definition.scope in ("module", "class") for definitions in
                            fixtures.name2fixturedefs.values() for definition in definitions):
            item.add_marker(pytest.mark.xdist_group(item.module.__name__))
    items.sort(key=lambda item: 0 if item.get_closest_marker("e2e") else 1 if item.get_closest_marker("slow") else 2)


@pytest.fixture(autouse=True)
def default_keras_state() -> Iterator[None]:
    """Each test starts from Keras' and TensorFlow's process-wide defaults, whichever test ran before it
    on its worker: an in-process training sets the precision policy and, with train.deterministic,
    op determinism (which also turns off Keras' XLA) and Grappler."""
    yield
    if "keras" in sys.modules:
        import keras
        import tensorflow as tf
        from tensorflow.python.framework import config as tf_config  # the undo of enable_op_determinism is not public

        keras.mixed_precision.set_global_policy("float32")
        tf_config.disable_op_determinism()
        tf.config.optimizer.set_experimental_options({"disable_meta_optimizer": False})


def shared_dataset(name: str) -> Path:
    """A file of ../shared/datasets, beside the repository on the development and CI machines, not in a
    clone: the test is skipped without it, saying what is missing; with PNEUMONIA_REQUIRE_SHARED=1 (CI)
    it fails instead."""
    path = SHARED_DATASETS / name
    if not path.is_file():
        missing = f"{path} is missing (../shared/datasets beside the repository, not part of a clone)"
        if REQUIRE_SHARED:
            pytest.fail(f"{missing}, and PNEUMONIA_REQUIRE_SHARED=1 says it must be there")
        pytest.skip(missing)
    return path


@pytest.fixture(scope="session")
def sample_zip() -> Path:
    """The larger real sample (5216 images), ../shared/datasets/chest-xray-sample.zip."""
    return shared_dataset(SAMPLE_ZIP.name)


@pytest.fixture(scope="session")
def repo_sample() -> Path:
    """The compact real sample committed in data_sample/ (1236 images), on every clone."""
    assert REPO_SAMPLE.is_file(), f"{REPO_SAMPLE} is committed with the code; rebuild it: data_sample/README.md"
    return REPO_SAMPLE


def prepare_synthetic(root: Path, *, patients_per_class: int, images_per_patient: int, raw_size: int,
                      image_size: int, images_per_shard: int) -> Path:
    """A prepared synthetic project folder at `root`: data/raw, data/manifests and data/tfrecords
    (at `image_size`), made by the library as the stages make them."""
    from pneumonia import paths
    from pneumonia.config import SyntheticConfig, TFRecordsConfig
    from pneumonia.data import synthetic
    from pneumonia.data.manifest import write_manifests
    from pneumonia.data.prepare import prepare
    from pneumonia.data.tfrecords import write_tfrecords

    cwd = os.getcwd()
    os.chdir(root)  # manifest paths are relative to the project root
    try:
        synthetic.generate(paths.RAW, SyntheticConfig(patients_per_class=patients_per_class,
                                                      images_per_patient=images_per_patient, image_size=raw_size), 0)
        write_manifests(paths.MANIFESTS, prepare(paths.RAW, val_fraction=0.2, seed=0).splits)
        write_tfrecords(paths.MANIFESTS, paths.TFRECORDS, image_size,
                        TFRecordsConfig(images_per_shard=images_per_shard, workers=2))
    finally:
        os.chdir(cwd)
    return root


@pytest.fixture(scope="session")
def synthetic_data(tmp_path_factory) -> Path:
    """A prepared synthetic project folder: data/raw, data/manifests and data/tfrecords at 48 px."""
    return prepare_synthetic(tmp_path_factory.mktemp("synthetic"), patients_per_class=10, images_per_patient=3,
                             raw_size=64, image_size=48, images_per_shard=16)
