#!/usr/bin/env bash
# The test command of the README: set up (or reuse) the virtual environment and run the test suite.
# Usage: bash tests/run.sh [pytest args...]     (VENV=path to use another environment)
set -euo pipefail
cd "$(dirname "$0")/.."
source examples/setup_env.sh test
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
python -m pytest -q -rs --timeout 900 "$@"
