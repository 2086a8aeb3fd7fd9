#!/usr/bin/env bash
# Creates .venv (if missing) and installs flatlm, editable, with the extras its tests and main job
# need: [dev,lm,sharpness,hf,bench,lightning,tensorboard,wandb,tune,tune-postgres] (docs/install.md says what each
# gives). Idempotent: a second run only re-checks. Needs Python >= 3.11 and pip; nothing else.
# curvlinops is not installed: it is an optional backend of flatlm.sharpness (the defaults need
# torch alone) and its tests skip without it; docs/install.md shows how to add it.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
export PIP_DISABLE_PIP_VERSION_CHECK=1
# Quiet pip, minus the notes about absent local index folders; a failing install stops the script.
pip_q() { pip install -q "$@" 2>&1 | { grep -v '^WARNING: Location' || true; }; }
# torch first, pinned: here 2.13.0 is a CPU build on local disk; the package's range keeps it.
python -c 'import torch' 2>/dev/null || pip_q torch==2.13.0
pip_q -e ".[dev,lm,sharpness,hf,bench,lightning,tensorboard,wandb,tune,tune-postgres]"
python - <<'EOF'
import importlib.util

import torch

import flatlm

curvlinops = "installed" if importlib.util.find_spec("curvlinops") else "not installed (optional)"
print(f"flatlm {flatlm.__version__}, torch {torch.__version__}, curvlinops backend: {curvlinops}")
EOF
