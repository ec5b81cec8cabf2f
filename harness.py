"""What the tests and the benchmarks both run: the project's tools in this virtual environment (no
outside MLflow server or DVC settings), copies of the project to run DVC in, and real MLflow servers on
loopback ports. At the repository root, beside benchmarks/: `python -m benchmarks.X` and pytest
(pythonpath ".") both find it; tests/conftest.py hands its names on to the tests."""

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

import yaml

REPO = Path(__file__).resolve().parent
VENV_BIN = Path(sys.executable).parent


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


MLFLOW_SERVE = ("mlflow", "models", "serve", "--env-manager", "local")
PNEUMONIA_SERVE = ("pneumonia", "serve")  # the same app, JSON depth checked (pneumonia.serving.serve)


@contextmanager
def mlflow_model_server(model_uri: str, tracking_uri: str, log: Path, start_seconds: float = 180,
                        command: tuple[str, ...] = MLFLOW_SERVE) -> Iterator[tuple[str, int, float]]:
    """The real `mlflow models serve` (or `command`: PNEUMONIA_SERVE) of `model_uri` in this venv on a free
    loopback port (one worker, its output in `log`): yields its URL, its process group (the CLI and its uvicorn
    worker) and the seconds it took to answer /ping; stopped on exit. Used by the serving tests and
    benchmarks/inference.py."""
    url = f"http://127.0.0.1:{free_port()}"
    with log.open("w") as output:
        process = subprocess.Popen(
            [*command, "--model-uri", model_uri, "--host", "127.0.0.1", "--port", url.rsplit(":", 1)[1],
             "--workers", "1"],
            env=tool_env(MLFLOW_TRACKING_URI=tracking_uri), stdout=output, stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: the uvicorn worker goes down with it
        )
    try:
        seconds = wait_until_answering(process, f"{url}/ping", " ".join(command[:3]), log, start_seconds)
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


def run_experiment(project: Path, settings: list[str], **env: str) -> None:
    """`dvc exp run` with `settings` (its -S arguments) on params.yaml as committed. An experiment run in the
    workspace leaves its -S values in params.yaml, where the next one would inherit every value it does not set."""
    run(["git", "checkout", "-q", "HEAD", "--", "params.yaml"], project)
    run(["dvc", "exp", "run", *settings], project, **env)


def commit_all(project: Path, message: str = "test set-up") -> None:
    if not (project / ".git").exists():
        run(["git", "init", "-q"], project)
    run(["git", "add", "-A"], project)
    run(["git", "commit", "-qm", message], project)
