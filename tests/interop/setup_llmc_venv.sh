#!/usr/bin/env bash
# Create the separate virtual environment the llm-compressor cross-tool tests run in:
#   .venv-llmc  (git-ignored by `.venv*/`), llm-compressor 0.14.0.1 + compressed-tensors 0.19.0 on CPU torch.
# Then: GPTQ_PLUGIN_LLMC_PYTHON=$PWD/.venv-llmc/bin/python python -m pytest tests/interop/test_llmcompressor.py
#
# Usage: bash tests/interop/setup_llmc_venv.sh [VENV_DIR]
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
VENV="${1:-$ROOT/.venv-llmc}"
PY="${PYTHON:-python3}"
TORCH_VERSION="${TORCH_VERSION:-2.13.0}"          # a CPU wheel (elsewhere add --index-url https://download.pytorch.org/whl/cpu)
LLMC_VERSION="${LLMC_VERSION:-0.14.0.1}"
"$PY" -m venv "$VENV"
"$VENV/bin/pip" install -q "torch==$TORCH_VERSION"
"$VENV/bin/pip" install -q -c <(echo "torch==$TORCH_VERSION") "llmcompressor==$LLMC_VERSION"
HF_HUB_OFFLINE=1 "$VENV/bin/python" -c "import torch, llmcompressor, compressed_tensors, transformers; print('torch', torch.__version__, 'llmcompressor', llmcompressor.__version__, 'compressed-tensors', compressed_tensors.__version__, 'transformers', transformers.__version__)"
