"""Shared fixtures: a copy of the project to run DVC in, and a small synthetic dataset; the package's import
graph as read from its source (tests/test_stage_deps.py, tests/test_layers.py)."""

import ast
import inspect
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
SRC = REPO / "src"
SHARED_DATASETS = REPO.parent / "shared" / "datasets"
SAMPLE_ZIP = SHARED_DATASETS / "chest-xray-sample.zip"
# The compact sample committed in the repository (data_sample/README.md): on every clone.
REPO_SAMPLE = REPO / "data_sample" / "chest-xray-small.zip"
# CI sets this (.ci/run): there ../shared exists, and a test that needs it must run, not be skipped.
REQUIRE_SHARED = os.environ.get("PNEUMONIA_REQUIRE_SHARED") == "1"
VENV_BIN = Path(sys.executable).parent
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


def tool_env(**extra: str) -> dict[str, str]:
    """Environment for subprocesses: this venv first on PATH, no outside MLflow server, a git identity."""
    env = {key: value for key, value in os.environ.items() if not key.startswith(("MLFLOW_", "DVC_", "KAGGLE_"))}
    env.update(
        PATH=f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}",
        GIT_AUTHOR_NAME="test", GIT_AUTHOR_EMAIL="test@example.com",
        GIT_COMMITTER_NAME="test", GIT_COMMITTER_EMAIL="test@example.com",
        DVC_NO_ANALYTICS="1",
        # `mlflow server` would also start its GenAI job runner, eight Python processes no test uses
        MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false",
    )
    env.update(extra)
    return env


def run(args: list[str], cwd: Path, check: bool = True, **env: str) -> subprocess.CompletedProcess:
    result = subprocess.run(args, cwd=cwd, env=tool_env(**env), capture_output=True, text=True)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now, for a server a test starts."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def stop_group(process: subprocess.Popen) -> None:
    """Stop a server started with start_new_session=True and every process it started (uvicorn workers)."""
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=30)


def wait_until_answering(process: subprocess.Popen, url: str, what: str, log: Path | None, seconds: float) -> float:
    """Seconds until `url` answered 200, while `process` (`what`, its output in `log`) runs."""
    import requests

    started = time.perf_counter()
    while True:
        output = log.read_text()[-3000:] if log else ""
        if process.poll() is not None:
            raise AssertionError(f"{what} exited ({process.returncode}):\n{output}")
        if time.perf_counter() - started > seconds:
            raise AssertionError(f"{what} did not answer {url} within {seconds} s:\n{output}")
        try:
            if requests.get(url, timeout=2).status_code == 200:
                return time.perf_counter() - started
        except requests.ConnectionError:
            pass
        time.sleep(0.5)


@contextmanager
def mlflow_model_server(model_uri: str, tracking_uri: str, log: Path,
                        start_seconds: float = 180) -> Iterator[tuple[str, int, float]]:
    """The real `mlflow models serve` of `model_uri` in this venv on a free loopback port (one worker, its
    output in `log`): yields its URL, its process group (the CLI and its uvicorn worker) and the seconds it
    took to answer /ping; stopped on exit. Used by the serving tests and benchmarks/inference.py."""
    url = f"http://127.0.0.1:{free_port()}"
    with log.open("w") as output:
        process = subprocess.Popen(
            ["mlflow", "models", "serve", "-m", model_uri, "-h", "127.0.0.1", "-p", url.rsplit(":", 1)[1],
             "--env-manager", "local", "--workers", "1"],
            env=tool_env(MLFLOW_TRACKING_URI=tracking_uri), stdout=output, stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: the uvicorn worker goes down with it
        )
    try:
        seconds = wait_until_answering(process, f"{url}/ping", "mlflow models serve", log, start_seconds)
        yield url, process.pid, seconds
    finally:
        stop_group(process)


@contextmanager
def mlflow_tracking_server(store: Path, artifacts: Path | None = None, start_seconds: float = 120) -> Iterator[str]:
    """The real `mlflow server` (what `mlflow ui` runs) over the SQLite store `store` on a free loopback
    port, with its own artifact store at `artifacts` if given: yields its URL; stopped on exit."""
    url = f"http://127.0.0.1:{free_port()}"
    command = ["mlflow", "server", "--host", "127.0.0.1", "--port", url.rsplit(":", 1)[1], "--workers", "1",
               "--backend-store-uri", f"sqlite:///{store}"]
    if artifacts:
        command += ["--artifacts-destination", str(artifacts)]
    process = subprocess.Popen(command, env=tool_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True)  # its worker processes stop with it
    try:
        wait_until_answering(process, f"{url}/health", "mlflow server", None, start_seconds)
        yield url
    finally:
        stop_group(process)


def set_params(project: Path, **dotted: object) -> None:
    """set_params(p, **{"data.source": "synthetic"}) edits params.yaml in place."""
    params = yaml.safe_load((project / "params.yaml").read_text())
    for key, value in dotted.items():
        *parents, last = key.split(".")
        section = params
        for parent in parents:
            section = section[parent]
        section[last] = value
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def copy_project(dest: Path) -> Path:
    """The project's files (tracked and new, not ignored) in a fresh git repository at `dest`."""
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
                            cwd=REPO, capture_output=True, text=True, check=True).stdout.split("\0")
    for name in filter(None, listed):
        source = REPO / name
        if source.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, dest / name)
    return dest


def commit_all(project: Path, message: str = "test set-up") -> None:
    if not (project / ".git").exists():
        run(["git", "init", "-q"], project)
    run(["git", "add", "-A"], project)
    run(["git", "commit", "-qm", message], project)


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist reads the xdist_group marks
def pytest_collection_modifyitems(items) -> None:
    """Mark `shared` every test that reads ../shared/datasets (the sample_zip fixture or shared_dataset),
    so CI can run them where the folder exists and the rest in a clone with nothing beside it.

    The tests run on every core (pytest-xdist, `--dist loadgroup` in pyproject.toml); the tests of a
    module that share a module-scoped fixture (a trained project they only read) go to one worker, so
    it is made once."""
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
