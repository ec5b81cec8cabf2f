#!/usr/bin/env bash
# One-time set-up on a fresh machine: .venv with the project, its dependencies and the test tools.
set -euo pipefail
cd "$(dirname "$0")"

python=${PYTHON:-python3.11}
command -v "$python" >/dev/null || python=python3
"$python" -c 'import sys; assert sys.version_info[:2] in ((3, 11), (3, 12)), f"Python 3.11 or 3.12 needed, found {sys.version}"'

# Headless Chromium: the tests open the HTML evaluation report in it.
if ! command -v chromium >/dev/null; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium
  else
    echo "note: install Chromium (e.g. sudo apt-get install chromium) to run the report's browser test"
  fi
fi

[ -x .venv/bin/python ] || "$python" -m venv .venv
# The exact versions the project was last tested with (requirements.lock, made by `uv pip compile`;
# docs/decisions.md "Dependency versions" says how to refresh it). uv, itself pinned there, installs the
# project within them: the same packages as pip, in a quarter of the time (it downloads and unpacks in parallel).
[ -x .venv/bin/uv ] || .venv/bin/python -m pip install --quiet -c requirements.lock uv
# uv reads no pip configuration: a mirror in PIP_INDEX_URL is handed on (a pip.conf one is not: set UV_DEFAULT_INDEX)
if [ -n "${PIP_INDEX_URL:-}" ] && [ -z "${UV_DEFAULT_INDEX:-}" ]; then export UV_DEFAULT_INDEX=$PIP_INDEX_URL; fi
.venv/bin/uv pip install --quiet --python .venv/bin/python --compile-bytecode -c requirements.lock -e ".[dev]"
# jax (the `jax` extra, the GPU check's JAX mode) apart, its dependencies being TensorFlow's: with jax importable,
# every TensorFlow import takes 0.7 s more (pyproject.toml). Its test puts .venv/jax on PYTHONPATH.
.venv/bin/uv pip install --quiet --python .venv/bin/python --compile-bytecode -c requirements.lock --no-deps \
  --target .venv/jax jax jaxlib
echo "set-up done: activate with  . .venv/bin/activate"
