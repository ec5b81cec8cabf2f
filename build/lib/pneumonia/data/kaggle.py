"""Download a Kaggle dataset's archive, or a competition's files, with the official `kaggle` client.

`import kaggle` authenticates at import time and prints help / calls exit() when it finds no
credentials, so we look for credentials ourselves first (mirroring the client's search order)
and import the client lazily, only when we are about to use it.
"""

import base64
import contextlib
import hashlib
import io
import json
import logging
import os
import re
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from pneumonia.errors import PipelineError

log = logging.getLogger(__name__)

TOKEN_ENV = "KAGGLE_API_TOKEN"
TOKEN_FILE = "access_token file"
KEY_ENV = "KAGGLE_USERNAME/KAGGLE_KEY"
KAGGLE_JSON = "kaggle.json"
OAUTH_FILE = "credentials.json (kaggle auth login)"

NO_CREDENTIALS_HELP = (
    "No Kaggle API credentials found. Create an API token at https://www.kaggle.com/settings/api "
    "and provide it in one of these ways:\n"
    "  - export KAGGLE_API_TOKEN=<token>, or save the token to ~/.kaggle/access_token\n"
    "  - export KAGGLE_USERNAME=<user> and KAGGLE_KEY=<key>\n"
    '  - save {"username": "<user>", "key": "<key>"} to ~/.kaggle/kaggle.json (chmod 600), '
    "or to $KAGGLE_CONFIG_DIR/kaggle.json if KAGGLE_CONFIG_DIR is set\n"
    "  - run `kaggle auth login`\n"
    "Or do without Kaggle: set data.source: local with data.local_path pointing to the Kaggle zip "
    "(chest-xray-pneumonia.zip), or data.source: synthetic."
)


@dataclass(frozen=True)
class ArchiveInfo:
    path: Path
    slug: str
    version: int | None  # dataset version number, when the API reports it
    size_bytes: int
    sha256: str


def _config_dir() -> Path:
    # Same rule as KaggleApi.config_dir: KAGGLE_CONFIG_DIR, else ~/.kaggle, else (Linux) XDG.
    if os.environ.get("KAGGLE_CONFIG_DIR"):
        return Path(os.environ["KAGGLE_CONFIG_DIR"])
    home_dir = Path(os.path.expanduser("~/.kaggle"))
    if sys.platform.startswith("linux") and not home_dir.exists():
        xdg = os.environ.get("XDG_CONFIG_HOME") or os.path.expanduser("~/.config")
        return Path(xdg) / "kaggle"
    return home_dir


def _read_text(path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError:
        return ""


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _credentials() -> tuple[str, list[str]]:
    """(method, secrets) in the client's order: access token, legacy API key, OAuth login."""
    token = os.environ.get("KAGGLE_API_TOKEN", "")
    if token and Path(token).is_file():  # the client also accepts a path to a token file here
        token = _read_text(Path(token))
    if token:
        return TOKEN_ENV, [token]
    for name in ("access_token", "access_token.txt"):
        token = _read_text(Path(os.path.expanduser("~/.kaggle")) / name)
        if token:
            return TOKEN_FILE, [token]

    # Legacy key: kaggle.json, overridden field by field by KAGGLE_USERNAME / KAGGLE_KEY.
    file_values = _read_json(_config_dir() / "kaggle.json")
    user = os.environ.get("KAGGLE_USERNAME") or file_values.get("username")
    key = os.environ.get("KAGGLE_KEY") or file_values.get("key")
    if user and key:
        basic = base64.b64encode(f"{user}:{key}".encode()).decode()  # as sent in the auth header
        from_env = os.environ.get("KAGGLE_USERNAME") and os.environ.get("KAGGLE_KEY")
        return (KEY_ENV if from_env else KAGGLE_JSON), [str(key), basic]

    oauth = _read_json(Path(os.path.expanduser("~/.kaggle/credentials.json")))
    if oauth.get("refresh_token"):
        return OAUTH_FILE, [str(oauth["refresh_token"]), str(oauth.get("access_token") or "")]
    raise PipelineError(NO_CREDENTIALS_HELP + f"\n(Looked in {_config_dir()} and ~/.kaggle.)")


def find_credentials() -> str:
    """Which documented method supplies Kaggle credentials; PipelineError if none does."""
    return _credentials()[0]


def _scrub(text: str, secrets: list[str]) -> str:
    for secret in secrets:
        if len(secret) >= 4:  # a 1-3 character "secret" would mangle ordinary text
            text = text.replace(secret, "***")
    return text


DATASET_NOT_FOUND = "check data.kaggle_dataset (owner/name) and that you accepted the dataset's terms on kaggle.com."


def _classify(exc: BaseException, slug: str, kind: str = "dataset",
              not_found: str = DATASET_NOT_FOUND) -> tuple[bool, str]:
    """(worth retrying, actionable message) for a failed attempt at the `kind` (dataset, competition)
    `slug`; `not_found` says what to check on a 403 or 404."""
    import requests  # installed with kaggle; only needed once kaggle is in use

    if isinstance(exc, SystemExit):  # KaggleApi.authenticate() exits when every credential is refused
        return False, "Kaggle authentication failed: the API token was rejected (expired or revoked?)."
    if isinstance(exc, requests.HTTPError) and exc.response is not None:
        status = exc.response.status_code
        if status == 401:
            return False, "Kaggle rejected the credentials (HTTP 401): check the username/key or token."
        if status in (403, 404):
            return False, f"Kaggle {kind} {slug!r} not found or not accessible (HTTP {status}): {not_found}"
        transient = status == 429 or status >= 500
        return transient, f"Kaggle API returned HTTP error {status} for {slug!r}: {exc}"
    if isinstance(exc, (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError)):
        return True, (
            f"Network error: could not reach the Kaggle API ({type(exc).__name__}: {exc}). "
            "Check the internet connection / proxy settings, or set data.source: local with "
            "data.local_path pointing to a downloaded Kaggle zip."
        )
    if isinstance(exc, ValueError) and "does not match expected size" in str(exc):
        return True, f"Incomplete download of {slug!r}: {exc}"
    if isinstance(exc, OSError):
        return False, f"Could not write the Kaggle download: {exc}"
    raise exc  # a bug, not a download problem: keep its traceback


@contextlib.contextmanager
def _client_prints_to_log(secrets: list[str]):
    # The client print()s (dataset URL, auth help, headers when VERBOSE): route to our debug log, scrubbed.
    # Its download progress bar goes to stderr and stays visible.
    buffer = io.StringIO()
    try:
        with contextlib.redirect_stdout(buffer):
            yield
    finally:
        for line in buffer.getvalue().splitlines():
            if line.strip():
                log.debug("kaggle: %s", _scrub(line, secrets))


def _authenticated_api():
    from kaggle.api.kaggle_api_extended import KaggleApi  # runs kaggle/__init__, which authenticates

    api = KaggleApi()
    # KaggleApi fixes its config path when first imported; use the one valid now, as found above.
    api.config_dir = str(_config_dir())
    api.config = os.path.join(api.config_dir, "kaggle.json")
    api.authenticate()
    return api


def _dataset_version(api, slug: str) -> int | None:
    try:
        return json.loads(api.dataset_status(slug, format="json(current_version_number)"))["current_version_number"]
    except Exception as exc:  # the version is informative only; the archive is what matters
        log.debug("Could not read the version of %s: %s", slug, type(exc).__name__)
        return None


def _sha256(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()  # reads in chunks, never the whole file


def download_archive(slug: str, dest_dir: Path, retries: int = 3, *, backoff_s: float = 2.0) -> ArchiveInfo:
    """Download the dataset zip `owner/name` (current version) or `owner/name/N` (version N) into
    dest_dir as `<name>.zip` (retrying transient errors)."""
    parts = slug.split("/")
    if len(parts) not in (2, 3) or not all(parts) or (len(parts) == 3 and not parts[2].isdigit()):
        raise PipelineError(f"Kaggle dataset {slug!r} must have the form owner/name or owner/name/N (version N).")

    def fetch(api) -> int | None:
        # force=False: the client resumes a partial archive of the same remote file (checked by its
        # .kaggle-partial marker: ETag or Last-Modified, and size), else downloads it again whole.
        # A complete archive is only ever returned after the client's size check passed.
        api.dataset_download_files(slug, path=str(dest_dir), force=False, quiet=False, unzip=False)
        return int(parts[2]) if len(parts) == 3 else _dataset_version(api, slug)

    return _download(slug, "dataset", Path(dest_dir) / f"{parts[1]}.zip", fetch, DATASET_NOT_FOUND, retries,
                     backoff_s)


def download_competition(name: str, dest_dir: Path, retries: int = 3, *, backoff_s: float = 2.0) -> ArchiveInfo:
    """Download every file of the Kaggle competition `name` (e.g. rsna-pneumonia-detection-challenge) into
    dest_dir as `<name>.zip`, as download_archive does a dataset's. Kaggle serves them only to an account
    that accepted the competition's rules."""
    if not re.fullmatch(r"[\w.-]+", name):
        raise PipelineError(f"Kaggle competition {name!r} must be the name in the competition's address "
                            "(kaggle.com/competitions/<name>), e.g. rsna-pneumonia-detection-challenge.")

    def fetch(api) -> None:
        api.competition_download_files(name, path=str(dest_dir), force=False, quiet=False)  # resumed like a dataset

    return _download(name, "competition", Path(dest_dir) / f"{name}.zip", fetch,
                     "check the competition's name and that you accepted its rules on its Data page on kaggle.com.",
                     retries, backoff_s)


def _download(slug: str, kind: str, target: Path, fetch: Callable, not_found: str, retries: int,
              backoff_s: float) -> ArchiveInfo:
    """fetch(api) writes the `kind` `slug`'s `target` (retried on transient errors) and returns its
    version, if known."""
    method, secrets = _credentials()  # before importing kaggle, which would exit() without credentials
    target.parent.mkdir(parents=True, exist_ok=True)
    log.info("Downloading Kaggle %s %s to %s (credentials: %s)", kind, slug, target, method)

    retries = max(retries, 0)
    for attempt in range(retries + 1):
        try:
            with _client_prints_to_log(secrets):
                version = fetch(_authenticated_api())
            break
        except (Exception, SystemExit) as exc:
            transient, message = _classify(exc, slug, kind, not_found)
            message = _scrub(message, secrets)
            if not transient or attempt == retries:
                tries = f" (after {attempt + 1} attempts)" if attempt else ""
                raise PipelineError(message + tries) from None  # `from None`: the client's text may hold secrets
            delay = backoff_s * 2**attempt
            log.warning("%s; retrying in %.1f s (%d/%d)", message, delay, attempt + 1, retries)
            time.sleep(delay)

    info = ArchiveInfo(target, slug, version, target.stat().st_size, _sha256(target))
    log.info("Downloaded %s: %d bytes, version %s, sha256 %s", slug, info.size_bytes, info.version, info.sha256)
    return info
