#!/usr/bin/env bash
# Installs (scripts/setup.sh) and runs flatlm's main job.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
flatlm compare --preset quick --out runs/quick "$@"
