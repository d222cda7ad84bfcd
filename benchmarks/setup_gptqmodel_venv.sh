#!/usr/bin/env bash
# Create the separate virtual environment that benchmarks/gptqmodel_baseline.py runs in:
#   /work/main/.venv-gptqmodel  (git-ignored by `.venv*/`)
# with GPTQModel 7.7.0 on a CPU-only torch. Kept apart from the project's own .venv so that
# GPTQModel's pins (transformers>=5.20.2, ...) do not touch it.
#
# Usage: bash benchmarks/setup_gptqmodel_venv.sh [VENV_DIR]
#
# Why the install is done in steps:
#  * gptqmodel 7.7.0 is an sdist (pure Python; its C++/CUDA extensions are built lazily at run time)
#    and declares torch>=2.14.1. The torch 2.14.1 that the index serves is the CUDA build (with the
#    nvidia-* wheels). We want the CPU wheel torch==2.13.0 (on this machine's local wheel dir), so
#    gptqmodel is installed with --no-deps and its other requirements are installed explicitly, with
#    torch pinned by a constraints file so that nothing can upgrade it.
#  * torchvision/torchaudio/torchcodec are not needed; if anything pulls them in and they fail to
#    import beside the CPU torch, they are removed.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${1:-$ROOT/.venv-gptqmodel}"
PY="${PYTHON:-python3}"          # Python 3.11 was used for the recorded results
TORCH_VERSION="${TORCH_VERSION:-2.13.0}"
GPTQMODEL_VERSION="${GPTQMODEL_VERSION:-7.7.0}"

"$PY" -m venv "$VENV"
PIP="$VENV/bin/pip"
"$VENV/bin/python" -m pip install --upgrade pip

CONSTRAINTS="$(mktemp)"
trap 'rm -f "$CONSTRAINTS"' EXIT
echo "torch==$TORCH_VERSION" > "$CONSTRAINTS"

# 1. CPU torch first (2.13.0+cpu is on local disk here; elsewhere add
#    --index-url https://download.pytorch.org/whl/cpu to get the CPU build).
"$PIP" install "torch==$TORCH_VERSION"

# 2. gptqmodel itself, without its dependency list (it would replace torch with a CUDA 2.14.1).
"$PIP" install --no-deps "gptqmodel==$GPTQMODEL_VERSION"

# 3. gptqmodel 7.7.0's requirements.txt (Python 3.11 markers resolved), minus torch.
"$PIP" install -c "$CONSTRAINTS" \
    "accelerate>=1.15.0" \
    "numpy>=2.4.6" \
    "safetensors>=0.8.0" \
    "filelock>=4.2.4" \
    "transformers>=5.20.2" \
    "threadpoolctl>=3.7.0" \
    "packaging>=26.3" \
    "device-smi>=0.5.7" \
    "protobuf>=7.36.2" \
    "pillow>=13.0.0" \
    "requests>=2.34.2" \
    "pypcre>=0.6.4" \
    "tokenicer>=0.0.14" \
    "logbar>=0.4.15" \
    "jinja2>=3.1.6" \
    "ninja>=1.13.2" \
    "maturin>=1.15.0" \
    "datasets>=5.1.0" \
    "pyarrow>=26.0.0" \
    "dill>=0.4.1" \
    "torchao>=0.18.0" \
    "defuser>=0.0.28" \
    psutil

# 4. Drop torch companions that do not import beside the CPU torch (none are needed).
for pkg in torchvision torchaudio torchcodec; do
    if "$PIP" show "$pkg" >/dev/null 2>&1; then
        if ! "$VENV/bin/python" -c "import $pkg" >/dev/null 2>&1; then
            echo "removing $pkg (does not import beside torch $TORCH_VERSION)"
            "$PIP" uninstall -y "$pkg"
        fi
    fi
done

# 5. Check.
"$PIP" check || true   # reports gptqmodel's torch>=2.14.1 pin as unmet; that is expected
HF_HUB_OFFLINE=1 GPTQMODEL_CPU_WORKERS="${GPTQMODEL_CPU_WORKERS:-2}" "$VENV/bin/python" - <<'EOF'
import torch, transformers, gptqmodel
print("torch", torch.__version__, "cuda", torch.cuda.is_available())
print("transformers", transformers.__version__)
print("gptqmodel", gptqmodel.__version__)
assert "+cpu" in torch.__version__ or not torch.cuda.is_available()
EOF
