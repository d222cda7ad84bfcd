"""The Hessian's Gram matrix ``xᵀ x``: one GEMM against :func:`gptq_plugin.solver.gram_matrix` (upper tiles only,
mirrored), side by side in one run, and whether the two agree bit for bit.

    python benchmarks/gram_bench.py --threads 1 --tokens 4096

Prints one row per width ``K`` (the layer inputs of the panel models: 576/1536 SmolLM2, 640/2048 Gemma3-270M,
896/4864 Qwen2.5-0.5B, and a 7B-sized 4096/11008): best-of-``--repeats`` milliseconds of each, their ratio and
``bit-equal``.
"""
from __future__ import annotations

import argparse
import time

import torch

from gptq_plugin.solver import gram_matrix


def best_ms(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--tokens", type=int, default=4096, help="rows of x: one calibration batch (8 x 512 tokens)")
    ap.add_argument("--widths", default="576,1536,640,2048,896,4864,4096,11008")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    print(f"torch {torch.__version__}, {args.threads} thread(s), x: [{args.tokens}, K] fp32")
    print("| K | x.t() @ x ms | gram_matrix ms | speed-up | bit-equal |")
    print("| ---: | ---: | ---: | ---: | --- |")
    for K in (int(k) for k in args.widths.split(",")):
        x = torch.randn(args.tokens, K, generator=gen) * 2 + 0.3
        full = best_ms(lambda: x.t() @ x, args.repeats)
        tiled = best_ms(lambda: gram_matrix(x), args.repeats)
        equal = torch.equal(gram_matrix(x), x.t() @ x)
        print(f"| {K} | {full:.1f} | {tiled:.1f} | {full / tiled:.2f}x | {equal} |")


if __name__ == "__main__":
    main()
