#!/usr/bin/env bash
# The wheels the GPU check's JAX mode (benchmarks/gpu_check_jax.py) needs on a GPU machine that has JAX with CUDA,
# NumPy, Pillow, h5py, scikit-learn, PyYAML, tqdm, rich and psutil, but neither TensorFlow nor a package index (the
# lent machine of docs/accelerators.md): Keras and the project's small dependencies, at requirements.lock's
# versions, for that machine's Python (3.12, or PYTHON_VERSION), downloaded here, where pip works.
#
#   bash benchmarks/gpu_check_wheels.sh DIR
#
# Then there, from the repository root (the project imported from src/, not installed):
#   python3 -m pip install --no-index --no-deps --target /tmp/site DIR/*.whl
#   PYTHONPATH=/tmp/site:src python3 -m benchmarks.gpu_check --jax --out OUT
set -euo pipefail

[ $# -eq 1 ] || { echo "usage: bash benchmarks/gpu_check_wheels.sh DIR" >&2; exit 2; }
mkdir -p "$1" && out=$(cd "$1" && pwd)
cd "$(dirname "$0")/.."
# Keras and what it needs beyond that machine's packages; pydantic and its own for pneumonia.config
packages=(keras namex optree pydantic pydantic-core annotated-types typing-inspection typing-extensions)
pins=()
for name in "${packages[@]}"; do
  pin=$(grep -i "^${name}==" requirements.lock) || { echo "gpu_check_wheels.sh: no $name in requirements.lock" >&2; exit 1; }
  pins+=("$pin")
done
python3 -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
  --python-version "${PYTHON_VERSION:-3.12}" --implementation cp --platform manylinux_2_28_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any -d "$out" "${pins[@]}"
echo "in $out, for Python ${PYTHON_VERSION:-3.12}: ${pins[*]}"
