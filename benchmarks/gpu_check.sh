#!/usr/bin/env bash
# The GPU check on a bare Linux machine with an NVIDIA GPU (benchmarks/gpu_check.py, docs/accelerators.md
# "GPU check"): a venv (.venv-gpu, or $VENV) with the project and the CUDA build of TensorFlow (the `gpu`
# extra, tensorflow[and-cuda]) within requirements.lock, then the check, its report written to OUTDIR.
#
#   bash benchmarks/gpu_check.sh OUTDIR [--wheels DIR] [-- ARGS for gpu_check.py, e.g. --cpu]
#
# --wheels DIR: install from the wheels in DIR alone (pip --no-index), for a machine without a package
# index. Make DIR where pip works, with the GPU machine's Python version (e.g. 3.12):
#   python3.12 -m pip download -d DIR -c requirements.lock '.[gpu]' setuptools
# pip's own settings (PIP_INDEX_URL, PIP_FIND_LINKS: more wheels beside the index) apply as usual.
set -euo pipefail

usage() { echo "usage: bash benchmarks/gpu_check.sh OUTDIR [--wheels DIR] [-- ARGS for gpu_check.py]" >&2; exit 2; }
[ $# -ge 1 ] && [ "${1#-}" = "$1" ] || usage
mkdir -p "$1" && out=$(cd "$1" && pwd)
shift
wheels=
while [ $# -gt 0 ]; do
  case $1 in
    --wheels) [ $# -ge 2 ] || usage; wheels=$2; shift 2 ;;
    --) shift; break ;;
    *) usage ;;
  esac
done
if [ -n "$wheels" ]; then
  [ -d "$wheels" ] || { echo "gpu_check.sh: --wheels $wheels is not a folder" >&2; exit 2; }
  wheels=$(cd "$wheels" && pwd)
fi
cd "$(dirname "$0")/.."

python=${PYTHON:-python3}
"$python" -c 'import sys; assert sys.version_info[:2] in ((3, 11), (3, 12)), f"Python 3.11 or 3.12 needed, found {sys.version}"'
version=$("$python" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
venv=${VENV:-.venv-gpu}
[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"

if [ -n "$wheels" ]; then
  source_args=(--no-index --find-links "$wheels")
  from="the wheels in $wheels"
else
  source_args=(--retries 1 --timeout 20)  # fail in seconds, not minutes, without a network
  from="the package index"
fi
echo "installing the project with tensorflow[and-cuda] into $venv from $from" >&2
if ! "$venv/bin/python" -m pip install --quiet --disable-pip-version-check "${source_args[@]}" \
    -c requirements.lock -e ".[gpu]"; then
  cat >&2 <<EOF
gpu_check.sh: could not install the project with tensorflow[and-cuda] from $from (pip's message above).
Without a network, download the wheels where pip works, for this machine's Python $version:
  python$version -m pip download -d DIR -c requirements.lock '.[gpu]' setuptools
then copy DIR here and run: bash benchmarks/gpu_check.sh OUTDIR --wheels DIR
EOF
  exit 1
fi
PYTHONUNBUFFERED=1 exec "$venv/bin/python" -m benchmarks.gpu_check --out "$out" "$@"
