#!/usr/bin/env bash
# Creates .venv (if missing) and installs flatlm with everything its tests and main job need.
# Idempotent: a second run only re-checks. Needs Python >= 3.11 and pip; nothing else.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
export PIP_DISABLE_PIP_VERSION_CHECK=1
pip_q() { pip install -q "$@" 2>&1 | grep -v '^WARNING: Location' || true; }
# torch first, pinned: here 2.13.0 is a CPU build on local disk; the package's range keeps it.
python -c 'import torch' 2>/dev/null || pip_q torch==2.13.0
# curvlinops without its declared dependencies: backpack-for-pytorch -> torchvision would replace
# torch with a CUDA build. The operators flatlm uses need only these.
python -c 'import curvlinops' 2>/dev/null || pip_q --no-deps curvlinops-for-pytorch==3.0.1 einconv linear_operator
pip_q -e ".[dev,hf,bench]"
python -c 'import torch, flatlm, curvlinops; print(f"flatlm {flatlm.__version__}, torch {torch.__version__}")'
