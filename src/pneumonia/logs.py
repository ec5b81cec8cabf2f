"""Logging set-up and the error boundary shared by every stage script and CLI command."""

import logging
import os
import sys
from collections.abc import Callable

from pneumonia.errors import PipelineError


def run_stage(main: Callable[[], object]) -> None:
    """Run a stage: INFO logging, and a PipelineError becomes a message and exit code 2, no traceback."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow's C++ start-up chatter
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        main()
    except PipelineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
