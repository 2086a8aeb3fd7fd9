#!/usr/bin/env bash
# Installs (scripts/setup.sh) and runs the whole test suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
ruff check src tests benchmarks examples
ruff format --check src tests benchmarks examples
python -m pytest -q "$@"
