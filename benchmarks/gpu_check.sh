#!/usr/bin/env bash
# On a CUDA machine: the kernel test-suite against the reference, then the benchmark table; both written to
# one file (default gpu_check_<date>.txt, or $1). Sized to finish in under 5 minutes on one H200: tests with
# one Triton config per kernel (no autotuning; the compiles dominate), the benchmark autotuned on every
# default shape with M in 1,16,128,1024. Without CUDA it prints why and exits 0 (nothing to check).
#
#   bash benchmarks/gpu_check.sh [OUT_FILE]        # PYTHON=/path/to/python to pick the interpreter
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
OUT=${1:-gpu_check_$(date +%Y%m%d_%H%M%S).txt}

if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
    echo "gpu_check: skipped: no CUDA device visible to torch ($("$PY" -c 'import torch; print(torch.__version__)' 2>&1))"
    exit 0
fi
if ! "$PY" -c 'import triton' 2>/dev/null; then
    echo "gpu_check: triton is not importable: pip install 'gptq-plugin[triton]'" >&2
    exit 1
fi

start=$(date +%s)
status=0
{
    echo "# gptq-plugin gpu_check $(date -u +%FT%TZ)"
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null || true
    "$PY" -c 'import torch, triton; print("torch", torch.__version__, "cuda", torch.version.cuda, "triton", triton.__version__)'
    echo
    echo "## kernel tests (tests/kernels, against kernels/reference.py)"
} >"$OUT"

GPTQ_PLUGIN_TRITON_AUTOTUNE=0 timeout 200 "$PY" -m pytest tests/kernels -q -p no:cacheprovider -rs >>"$OUT" 2>&1 \
    || { rc=$?; status=1; echo "(kernel tests failed or timed out: exit $rc)" >>"$OUT"; }

{
    echo
    echo "## benchmark (fp16 activations, 4-bit, group 128; dense fp32/bf16/fp16 and Marlin measured alongside)"
} >>"$OUT"
timeout 150 "$PY" benchmarks/kernel_bench.py --device cuda --dtype fp16 --m 1,16,128,1024 --iters 20 --budget 2 \
    >>"$OUT" 2>/dev/null || { rc=$?; status=1; echo "(benchmark failed or timed out: exit $rc)" >>"$OUT"; }

echo "took $(( $(date +%s) - start )) s; exit status $status" >>"$OUT"
cat "$OUT"
echo "gpu_check: written to $OUT"
exit $status
