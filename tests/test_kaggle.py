"""download_archive driving the real `kaggle` client against the local stub in kaggle_stub.py."""

import base64
import hashlib
import io
import json
import logging
import os
import subprocess
import sys
import time
import zipfile
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # tests/ is not a package
from archives import kaggle_members, zip_bytes  # noqa: E402
from conftest import copy_project, run, set_params, tool_env  # noqa: E402
from kaggle_stub import KaggleStub  # noqa: E402
from pneumonia.data import kaggle as kg  # noqa: E402
from pneumonia.errors import PipelineError  # noqa: E402

SLUG = "paultimothymooney/chest-xray-pneumonia"
FAST = 0.01  # backoff seconds, so retry tests take milliseconds


def _make_zip() -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as z:
        z.writestr("chest_xray/train/NORMAL/IM-0001.jpeg", os.urandom(1_500_000))  # > one 1 MiB chunk
        z.writestr("chest_xray/test/PNEUMONIA/person1_virus_1.jpeg", os.urandom(700_000))
    return buffer.getvalue()


ZIP = _make_zip()


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    """A throwaway HOME with no Kaggle settings, so the real ~/.kaggle is never read or written."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    for name in list(os.environ):
        if name.startswith("KAGGLE_") or name in ("XDG_CONFIG_HOME", "NO_PROXY", "no_proxy", "VERBOSE"):
            monkeypatch.delenv(name)
    return home


@pytest.fixture
def stub(home, monkeypatch):
    with KaggleStub({SLUG: ZIP}) as server:
        for name, value in server.client_env().items():
            monkeypatch.setenv(name, value)
        # KaggleApi reads KAGGLE_API_ENVIRONMENT once, at first import: import it now, with the
        # stub env and temporary HOME in place (no credentials yet, so its import-time login is skipped).
        from kaggle.api.kaggle_api_extended import KaggleApi

        if "--local" not in KaggleApi.args:  # imported earlier in this process without the env var
            monkeypatch.setattr(KaggleApi, "args", [*KaggleApi.args, "--local"])
        server.requests.clear()
        yield server


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(0o600)


def _kaggle_json(stub: KaggleStub, key: str | None = None) -> str:
    return json.dumps({"username": stub.username, "key": key or stub.key})


def _use_credentials(method: str, stub: KaggleStub, home: Path, monkeypatch, tmp_path: Path) -> None:
    if method == kg.TOKEN_ENV:
        monkeypatch.setenv("KAGGLE_API_TOKEN", stub.token)
    elif method == kg.TOKEN_FILE:
        _write(home / ".kaggle" / "access_token", stub.token + "\n")
    elif method == kg.KEY_ENV:
        monkeypatch.setenv("KAGGLE_USERNAME", stub.username)
        monkeypatch.setenv("KAGGLE_KEY", stub.key)
    elif method == kg.KAGGLE_JSON:
        _write(home / ".kaggle" / "kaggle.json", _kaggle_json(stub))
    elif method == "KAGGLE_CONFIG_DIR":
        _write(tmp_path / "elsewhere" / "kaggle.json", _kaggle_json(stub))
        monkeypatch.setenv("KAGGLE_CONFIG_DIR", str(tmp_path / "elsewhere"))
    elif method == kg.OAUTH_FILE:
        expiry = (datetime.now(UTC) + timedelta(hours=1)).isoformat()
        _write(home / ".kaggle" / "credentials.json", json.dumps(
            {"refresh_token": "refresh-0123456789", "access_token": stub.token,
             "access_token_expiration": expiry, "username": stub.username}))


BASIC = "Basic " + base64.b64encode(b"stub-user:stub-key-0123456789").decode()
BEARER = "Bearer KGAT_stub_token_0123456789"
CASES = [  # (how credentials are given, what find_credentials reports, the header the server must see)
    (kg.TOKEN_ENV, kg.TOKEN_ENV, BEARER),
    (kg.TOKEN_FILE, kg.TOKEN_FILE, BEARER),
    (kg.KEY_ENV, kg.KEY_ENV, BASIC),
    (kg.KAGGLE_JSON, kg.KAGGLE_JSON, BASIC),
    ("KAGGLE_CONFIG_DIR", kg.KAGGLE_JSON, BASIC),
    (kg.OAUTH_FILE, kg.OAUTH_FILE, BEARER),
]


@pytest.mark.parametrize("given, reported, header", CASES, ids=[c[0] for c in CASES])
def test_download_succeeds_with_each_credential_method(stub, home, monkeypatch, tmp_path, given, reported, header):
    _use_credentials(given, stub, home, monkeypatch, tmp_path)
    assert kg.find_credentials() == reported

    dest = tmp_path / "raw"
    info = kg.download_archive(SLUG, dest, backoff_s=FAST)

    assert info.path == dest / "chest-xray-pneumonia.zip"
    assert info.path.read_bytes() == ZIP
    assert (info.slug, info.version, info.size_bytes) == (SLUG, stub.version, len(ZIP))
    assert info.sha256 == hashlib.sha256(ZIP).hexdigest()
    assert sorted(p.name for p in dest.iterdir()) == ["chest-xray-pneumonia.zip"]  # no scratch left
    [download] = stub.api_calls("DownloadDataset")
    assert download.authorization == header
    assert download.body == {"ownerSlug": "paultimothymooney", "datasetSlug": "chest-xray-pneumonia"}


def test_retries_after_two_503s(stub, monkeypatch, tmp_path):
    monkeypatch.setenv("KAGGLE_USERNAME", stub.username)
    monkeypatch.setenv("KAGGLE_KEY", stub.key)
    stub.fail_next(2, status=503)

    info = kg.download_archive(SLUG, tmp_path / "raw", retries=3, backoff_s=FAST)

    assert info.path.read_bytes() == ZIP
    assert stub.failures_served == 2
    assert len(stub.api_calls("DownloadDataset")) == 3  # two refused, the third one redirected


def test_persistent_500_fails_after_all_retries_without_partial_file(stub, monkeypatch, tmp_path):
    monkeypatch.setenv("KAGGLE_USERNAME", stub.username)
    monkeypatch.setenv("KAGGLE_KEY", stub.key)
    stub.fail_next(10**6, status=500)
    dest = tmp_path / "raw"

    with pytest.raises(PipelineError, match=r"HTTP error 500.*after 3 attempts"):
        kg.download_archive(SLUG, dest, retries=2, backoff_s=FAST)

    assert len(stub.api_calls("DownloadDataset")) == 3
    assert list(dest.iterdir()) == []


def test_unknown_slug_is_not_found(stub, monkeypatch, tmp_path):
    monkeypatch.setenv("KAGGLE_API_TOKEN", stub.token)
    dest = tmp_path / "raw"

    with pytest.raises(PipelineError, match=r"'someone/no-such-data' not found.*HTTP 404") as err:
        kg.download_archive("someone/no-such-data", dest, backoff_s=FAST)

    assert "data.kaggle_dataset" in str(err.value)
    assert len(stub.api_calls("DownloadDataset")) == 1  # a 404 is not retried
    assert list(dest.iterdir()) == []


def test_wrong_key_is_reported_as_rejected(stub, monkeypatch, tmp_path):
    monkeypatch.setenv("KAGGLE_USERNAME", stub.username)
    monkeypatch.setenv("KAGGLE_KEY", "wrong-key-9876543210")

    with pytest.raises(PipelineError, match=r"rejected the credentials \(HTTP 401\)"):
        kg.download_archive(SLUG, tmp_path / "raw", backoff_s=FAST)
    assert len(stub.api_calls("DownloadDataset")) == 1


def test_revoked_token_is_reported_as_rejected(stub, monkeypatch, tmp_path):
    # The client exit()s when introspection says the token is inactive; that must not end the process.
    monkeypatch.setenv("KAGGLE_API_TOKEN", "KGAT_revoked_0000000000")

    with pytest.raises(PipelineError, match="token was rejected"):
        kg.download_archive(SLUG, tmp_path / "raw", backoff_s=FAST)
    assert stub.api_calls("IntrospectToken") and not stub.api_calls("DownloadDataset")


def test_no_credentials_names_every_way_to_provide_them(stub, tmp_path):
    with pytest.raises(PipelineError) as err:
        kg.download_archive(SLUG, tmp_path / "raw", backoff_s=FAST)

    message = str(err.value)
    for needed in ("KAGGLE_API_TOKEN", "~/.kaggle/access_token", "KAGGLE_USERNAME", "KAGGLE_KEY",
                   "~/.kaggle/kaggle.json", "KAGGLE_CONFIG_DIR", "data.source: local", "data.local_path",
                   "data.source: synthetic"):
        assert needed in message
    assert stub.requests == []  # refused before the client was asked to do anything
    with pytest.raises(PipelineError, match="No Kaggle API credentials"):
        kg.find_credentials()


def test_credentials_check_does_not_import_the_client(home):
    # `import kaggle` logs in and may exit(); find_credentials must not trigger it.
    code = ("import sys\nfrom pneumonia.data.kaggle import find_credentials\n"
            "try:\n    find_credentials()\nexcept Exception as e:\n    print(type(e).__name__)\n"
            "print('kaggle' in sys.modules)")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src")}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.split() == ["PipelineError", "False"]


def test_server_not_running_gives_network_message(stub, monkeypatch, tmp_path):
    monkeypatch.setenv("KAGGLE_USERNAME", stub.username)
    monkeypatch.setenv("KAGGLE_KEY", stub.key)
    stub.stop()  # its port is now closed
    dest = tmp_path / "raw"

    with pytest.raises(PipelineError, match=r"Network error: could not reach the Kaggle API.*after 2 attempts"):
        kg.download_archive(SLUG, dest, retries=1, backoff_s=FAST)
    assert list(dest.iterdir()) == []


@pytest.mark.parametrize("creds", ["token", "key"])
def test_secrets_never_appear_in_messages_or_logs(home, monkeypatch, tmp_path, caplog, capsys, creds):
    caplog.set_level(logging.DEBUG)  # every logger, client included
    with KaggleStub({SLUG: ZIP}, leak_secrets_in_errors=True) as stub:  # its error bodies echo the secrets
        for name, value in stub.client_env().items():
            monkeypatch.setenv(name, value)
        if creds == "token":
            monkeypatch.setenv("KAGGLE_API_TOKEN", stub.token)
            secrets = [stub.token]
        else:
            _write(home / ".kaggle" / "kaggle.json", _kaggle_json(stub))
            secrets = [stub.key, BASIC.split()[1]]

        messages = []
        for slug, failures in (("nobody/missing", 0), (SLUG, 10**6), (SLUG, 1)):
            stub.fail_next(failures, status=500)
            try:
                kg.download_archive(slug, tmp_path / "raw", retries=1, backoff_s=FAST)
            except PipelineError as err:
                messages.append(str(err))
    assert len(messages) == 2 and "***" in messages[1]  # the 500 text echoed the secrets: scrubbed

    captured = capsys.readouterr()
    everything = "\n".join([*messages, caplog.text, captured.out, captured.err])
    assert "Authorization" in everything  # the stub's leaky text did reach our output, scrubbed
    for secret in secrets:
        assert secret not in everything


# -- the download stage end to end: `python stages/download.py` in a copy of the project, the real
# client in its own process, pointed at the stub by environment variables only.

def _kaggle_project(tmp_path: Path) -> Path:
    project = copy_project(tmp_path / "project")
    set_params(project, **{"data.source": "kaggle", "data.kaggle_dataset": SLUG})
    return project


def _run_download_stage(project: Path, stub: KaggleStub, home: Path):
    return run([sys.executable, "stages/download.py"], project, check=False, HOME=str(home),
               XDG_CONFIG_HOME=str(home / ".config"), NO_PROXY="", no_proxy="", **stub.client_env())


def test_download_stage_fetches_the_archive_through_the_real_client(tmp_path):
    members = kaggle_members()
    nested = {name.replace("chest_xray/", "chest_xray/chest_xray/", 1): data for name, data in members.items()}
    archive = zip_bytes({**members, **nested, "__MACOSX/chest_xray/._train": b"\0\5\26\7"})
    project, home = _kaggle_project(tmp_path), tmp_path / "home"
    with KaggleStub({SLUG: archive}) as stub:
        _write(home / ".kaggle" / "kaggle.json", _kaggle_json(stub))
        result = _run_download_stage(project, stub, home)

    assert result.returncode == 0, result.stderr
    [download] = stub.api_calls("DownloadDataset")
    assert download.authorization == BASIC  # the client read kaggle.json from the temporary HOME
    raw = project / "data" / "raw"
    extracted = {p.relative_to(raw).as_posix(): p.read_bytes() for p in raw.rglob("*.jpeg")}
    assert extracted == {name.removeprefix("chest_xray/"): data for name, data in members.items()}
    source = json.loads((raw / "source.json").read_text())
    assert source["kaggle_dataset"] == SLUG and source["version"] == stub.version
    assert source["archive_sha256"] == hashlib.sha256(archive).hexdigest()
    assert source["archive_size_bytes"] == len(archive)
    assert sorted(p.name for p in (project / "data").iterdir()) == ["raw"]  # no archive or scratch left
    written = "".join(p.read_text(errors="replace") for p in (project / "data").rglob("*.json"))
    for secret in (stub.key, BASIC.split()[1]):
        assert secret not in result.stdout + result.stderr + written


def test_download_stage_without_credentials_fails_cleanly(tmp_path):
    project, home = _kaggle_project(tmp_path), tmp_path / "home"
    home.mkdir()
    with KaggleStub({SLUG: ZIP}) as stub:
        result = _run_download_stage(project, stub, home)

    assert result.returncode == 2
    assert "error: No Kaggle API credentials found" in result.stderr and "Traceback" not in result.stderr
    assert stub.requests == []
    assert not (project / "data").exists() or list((project / "data").iterdir()) == []


@pytest.mark.slow
def test_a_killed_download_resumes_and_leaves_no_scratch(tmp_path):
    """SIGKILL midway through the archive: the next run removes older runs' scratch folders, resumes
    the partial archive (an HTTP range request) instead of starting from zero, and leaves only data/raw."""
    members = kaggle_members(patients=30)
    archive = zip_bytes({**members, "chest_xray/padding.bin": os.urandom(1_500_000)})  # not an image: ignored
    project, home = _kaggle_project(tmp_path), tmp_path / "home"
    stale = project / "data" / ".download-k3j2x9qa"  # a killed run of the old code: random name, never removed
    stale.mkdir(parents=True)
    (stale / "chest-xray-pneumonia.zip").write_bytes(b"partial")
    with KaggleStub({SLUG: archive}) as stub:
        _write(home / ".kaggle" / "kaggle.json", _kaggle_json(stub))
        stub.throttle = 0.05  # ~3 s for the archive
        env = tool_env(HOME=str(home), XDG_CONFIG_HOME=str(home / ".config"), NO_PROXY="", no_proxy="",
                       **stub.client_env())
        first = subprocess.Popen([sys.executable, "stages/download.py"], cwd=project, env=env,
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        partial = project / "data" / f".download-{SLUG.replace('/', '--')}" / "chest-xray-pneumonia.zip"
        deadline = time.monotonic() + 120
        while not (partial.is_file() and partial.stat().st_size > len(archive) // 3):
            assert first.poll() is None and time.monotonic() < deadline, "the download did not get going"
            time.sleep(0.05)
        first.kill()
        first.wait(timeout=30)
        kept = partial.stat().st_size
        assert 0 < kept < len(archive)

        stub.throttle = 0
        result = _run_download_stage(project, stub, home)

    assert result.returncode == 0, result.stderr
    downloads = [r for r in stub.requests if r.path.endswith(".zip")]
    assert downloads[-1].range == f"bytes={kept}-"  # resumed where the killed run stopped
    raw = project / "data" / "raw"
    assert {p.relative_to(raw).as_posix(): p.read_bytes() for p in raw.rglob("*.jpeg")} == {
        name.removeprefix("chest_xray/"): data for name, data in members.items()}
    assert json.loads((raw / "source.json").read_text())["archive_sha256"] == hashlib.sha256(archive).hexdigest()
    assert sorted(p.name for p in (project / "data").iterdir()) == ["raw"]  # no scratch, stale or new


def test_a_pinned_version_is_asked_for_and_recorded_and_a_changed_archive_is_reported(tmp_path):
    """data.kaggle_dataset owner/name/N downloads version N; data_archive.json records what came, and
    a later download of other bytes (Kaggle's current version changed) says so, with the pin to use."""
    project, home = _kaggle_project(tmp_path), tmp_path / "home"
    first = zip_bytes(kaggle_members())
    set_params(project, **{"data.kaggle_dataset": f"{SLUG}/3"})
    with KaggleStub({SLUG: first}) as stub:
        _write(home / ".kaggle" / "kaggle.json", _kaggle_json(stub))
        result = _run_download_stage(project, stub, home)
    assert result.returncode == 0, result.stderr
    [download] = stub.api_calls("DownloadDataset")
    assert download.body.get("datasetVersionNumber") == 3  # the client asked Kaggle for version 3
    source = json.loads((project / "data/raw/source.json").read_text())
    assert (source["kaggle_dataset"], source["version"]) == (f"{SLUG}/3", 3)
    recorded = json.loads((project / "data_archive.json").read_text())
    assert (recorded["version"], recorded["archive_sha256"]) == (3, hashlib.sha256(first).hexdigest())
    assert "differs" not in result.stderr

    members = kaggle_members()
    changed = zip_bytes({**members, "chest_xray/train/NORMAL/IM-9999-0001.jpeg": next(iter(members.values()))})
    set_params(project, **{"data.kaggle_dataset": SLUG})
    with KaggleStub({SLUG: changed}, version=4) as stub:
        _write(home / ".kaggle" / "kaggle.json", _kaggle_json(stub))
        result = _run_download_stage(project, stub, home)
    assert result.returncode == 0, result.stderr
    assert "differs from the one recorded in data_archive.json" in result.stderr
    assert f"data.kaggle_dataset={SLUG}/3" in result.stderr  # how to get the recorded data back
    source = json.loads((project / "data/raw/source.json").read_text())
    assert source["version"] == 4
    assert source["differs_from_recorded"] == {"version": 3, "archive_sha256": hashlib.sha256(first).hexdigest()}
    assert json.loads((project / "data_archive.json").read_text())["version"] == 4  # the record follows


COMPETITION = "rsna-pneumonia-detection-challenge"


def test_a_competitions_files_are_fetched_through_the_real_client(stub, monkeypatch, tmp_path, capsys):
    """`pneumonia download-competition`: the competition's zip (the RSNA challenge's, for evaluate.external)
    through the client's competition download; a competition not served (or its rules not accepted) says so."""
    from pneumonia import cli

    archive = zip_bytes({"stage_2_train_labels.csv": b"patientId,x,y,width,height,Target\nab,,,,,0\n",
                         "stage_2_train_images/ab.dcm": os.urandom(2000)})
    stub.competitions[COMPETITION] = archive
    monkeypatch.setenv("KAGGLE_USERNAME", stub.username)
    monkeypatch.setenv("KAGGLE_KEY", stub.key)

    cli.main(["download-competition", COMPETITION, "--out", str(tmp_path / "external")])
    assert (tmp_path / "external" / f"{COMPETITION}.zip").read_bytes() == archive
    assert sorted(p.name for p in (tmp_path / "external").iterdir()) == [f"{COMPETITION}.zip"]
    [download] = stub.api_calls("DownloadDataFiles")
    assert download.body == {"competitionName": COMPETITION} and download.authorization == BASIC
    assert "evaluate.external=" in capsys.readouterr().out

    with pytest.raises(PipelineError, match=r"competition 'no-such-challenge' not found.*HTTP 403.*accepted its rules"):
        kg.download_competition("no-such-challenge", tmp_path / "other", backoff_s=FAST)
    with pytest.raises(PipelineError, match="must be the name in the competition's address"):
        kg.download_competition("a/b", tmp_path / "other")
