"""Logging set-up and the error boundary shared by every stage script and CLI command."""

import logging
import os
import re
import sys
import tempfile
import traceback
from collections.abc import Callable

from pneumonia.errors import PipelineError

# The password of `scheme://user:password@host` (MLflow tracking URIs: http, postgresql, mysql+pymysql, ...):
# up to the last "@" before the query, so a raw "@", ":" or "/" in a password leaves no part of it shown
# (HTTP clients split user info from host on the last "@" too); an "@" in a path is hidden with it.
_PASSWORD = re.compile(r"(\b[A-Za-z][A-Za-z0-9+.-]*://[^/\s:@]*:)[^\s?#]*@")
_record_factory = logging.getLogRecordFactory()


def redact(text: str) -> str:
    """`text` with the password of every URL in it replaced by ***."""
    return _PASSWORD.sub(r"\1***@", text)


def _redacted_record(*args, **kwargs) -> logging.LogRecord:
    # At creation, so every logger's records are covered, also those of libraries with handlers of
    # their own (MLflow's do not propagate to the root logger).
    record = _record_factory(*args, **kwargs)
    try:
        message = record.getMessage()
    except Exception:  # noqa: BLE001 - a malformed record is logging's to report, as it would anyway
        return record
    if (redacted := redact(message)) != message:
        record.msg, record.args = redacted, None
    return record


def _redacted_excepthook(kind, value, trace) -> None:
    sys.stderr.write(redact("".join(traceback.format_exception(kind, value, trace))))


def hide_secrets() -> None:
    """Passwords in URLs never reach a log line, an error message or a traceback of this process."""
    logging.setLogRecordFactory(_redacted_record)
    sys.excepthook = _redacted_excepthook


def run_stage(main: Callable[[], object]) -> None:
    """Run a stage: INFO logging, and a PipelineError becomes a message and exit code 2, no traceback."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow's C++ start-up chatter
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    hide_secrets()
    try:
        main()
    except PipelineError as exc:
        print(f"error: {redact(str(exc))}", file=sys.stderr)
        sys.exit(2)


def import_tensorflow_quietly() -> None:
    """Import TensorFlow with its native start-up lines held back: oneDNN's notice and "Could not find cuda
    drivers" are written to file descriptor 2 before TF_CPP_MIN_LOG_LEVEL applies to them. They are shown
    when the import fails."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), 2)
        try:
            import tensorflow  # noqa: F401
        except BaseException:
            os.dup2(saved, 2)
            held.seek(0)
            sys.stderr.write(held.read().decode(errors="replace"))
            raise
        finally:
            os.dup2(saved, 2)
            os.close(saved)
