"""Kernel benchmark: every kernel that can run a layer, against a dense matmul measured in the same run.

    python benchmarks/kernel_bench.py [--quick] [--json] [--shapes 4096x4096 --m 1,16 ...]   # --help: options
    python benchmarks/kernel_bench.py --bits 2,3,4,8 --chosen ...     # the registry's choice for each bit width
    python benchmarks/kernel_bench.py --checkpoint DIR --windows 8 --kernels ...           # perplexity per kernel

``run_bench(...)`` returns one dict per (kernel, bits, shape, M); ``format_table(rows)`` prints them; ``main(argv)``
is the command line.

Timing: for one (shape, M) every candidate (the kernels of every bit width asked for, dense fp32/bf16, and on a GPU
dense fp16 cuBLAS and vLLM's Marlin when installed) runs once per round, round after round (side by side, so load
on a shared machine hits all of them alike), until ``iters`` rounds or ``budget_s`` seconds; the median of the
rounds is reported. Dense is ``F.linear(x, W)`` with ``W`` ``[N, K]``, what an unquantized ``nn.Linear`` runs.
GPU times are CUDA-event times of ``reps`` back-to-back calls. Weight traffic (GB/s) is the bytes of
``qweight + qzeros + scales + g_idx`` (dense: the weight) divided by the median time.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from typing import Callable

import torch
import torch.nn.functional as F

from gptq_plugin.checkpoint import load_quantized
from gptq_plugin.errors import GPTQPluginError, KernelError
from gptq_plugin.evaluate import eval_windows, perplexity
from gptq_plugin.linear import QuantLinear
from gptq_plugin.packing import num_groups, pack_qweight, pack_qzeros
from gptq_plugin.plugins import ENV_FORCE_KERNEL, choose_kernel, kernels as registered

SHAPES = ((576, 1536), (1536, 576), (4096, 4096), (4096, 14336), (14336, 4096))  # (K, N): in x out features
MS = (1, 4, 16, 128, 1024)
_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
_SLOW = {"reference"}  # dequantizes the whole weight per call: only when asked for by name


def random_layer(K: int, N: int, bits: int = 4, group_size: int = 128, act_order: bool = False,
                 device: str = "cpu", seed: int = 0) -> QuantLinear:
    """A :class:`QuantLinear` with random codes, zeros, fp16 scales and bias (act-order: shuffled ``g_idx``)."""
    g = torch.Generator().manual_seed(seed)
    G = num_groups(K, group_size)
    layer = QuantLinear(K, N, bits, group_size, bias=True, sym=False)
    layer.qweight.copy_(pack_qweight(torch.randint(0, 2**bits, (N, K), generator=g), bits))
    layer.qzeros.copy_(pack_qzeros(torch.randint(0, 2**bits, (G, N), generator=g), bits))
    layer.scales.copy_((torch.rand(G, N, generator=g) * 0.02 + 0.01).half())
    g_idx = torch.arange(K) // (K if group_size == -1 else group_size)
    if act_order:
        g_idx = g_idx[torch.randperm(K, generator=g)]
    layer.g_idx.copy_(g_idx.to(torch.int32))
    layer.bias.copy_(torch.randn(N, generator=g).half())
    return layer.to(device)


def _weight_bytes(layer: QuantLinear) -> int:
    return sum(t.numel() * t.element_size() for t in (layer.qweight, layer.qzeros, layer.scales, layer.g_idx))


def _time_side_by_side(fns: dict[str, Callable[[], object]], device: str, iters: int, budget_s: float,
                       reps: int = 1) -> dict[str, float]:
    """Median microseconds per call of each function, measured round-robin (see the module docstring)."""
    cuda = device == "cuda"
    for fn in fns.values():  # warm up: autotuning, packing caches, allocator
        fn(), fn()
    if cuda:
        torch.cuda.synchronize()
    times: dict[str, list[float]] = {k: [] for k in fns}
    start = time.perf_counter()
    for i in range(iters):
        for name, fn in fns.items():
            if cuda:
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                for _ in range(reps):
                    fn()
                b.record()
                b.synchronize()
                times[name].append(a.elapsed_time(b) * 1e3 / reps)
            else:
                t = time.perf_counter()
                fn()
                times[name].append((time.perf_counter() - t) * 1e6)
        if i >= 2 and time.perf_counter() - start > budget_s:
            break
    return {k: statistics.median(v) for k, v in times.items()}


def _marlin(layer: QuantLinear, M: int, x: torch.Tensor) -> tuple[Callable | None, str | None]:
    """vLLM's Marlin GPTQ GEMM on a same-shape weight (4/8-bit symmetric), or (None, why not).

    Best effort across vLLM versions (the op's name and signature changed): any failure is reported, not raised.
    """
    try:
        from vllm import _custom_ops as ops
        from vllm.model_executor.layers.quantization.utils.marlin_utils import (GPTQ_MARLIN_MAX_PARALLEL,
                                                                                GPTQ_MARLIN_MIN_THREAD_N)
        from vllm.model_executor.layers.quantization.utils.marlin_utils_test import MarlinWorkspace, marlin_quantize
        from vllm.scalar_type import scalar_types
    except Exception as e:  # noqa: BLE001 - optional comparison
        return None, f"vLLM Marlin not importable: {type(e).__name__}: {e}"
    try:
        K, N = layer.in_features, layer.out_features
        qtype = {4: scalar_types.uint4b8, 8: scalar_types.uint8b128}[layer.bits]
        b = torch.rand(K, N, dtype=torch.half, device=x.device)
        _, q_w, s, *_ = marlin_quantize(b, qtype, layer.group_size, False)
        ws = MarlinWorkspace(N, GPTQ_MARLIN_MIN_THREAD_N, GPTQ_MARLIN_MAX_PARALLEL)
        xh = x.half()
        if hasattr(ops, "marlin_gemm"):
            fn = lambda: ops.marlin_gemm(xh, None, q_w, None, s, None, None, None, ws.scratch, qtype,  # noqa: E731
                                         M, N, K, False, False, False)
        else:
            empty = torch.empty(0, dtype=torch.int, device=x.device)
            fn = lambda: ops.gptq_marlin_gemm(xh, None, q_w, None, s, None, empty, empty, empty,  # noqa: E731
                                              ws.scratch, qtype, M, N, K, True, False, False, False)
        fn()
        return fn, None
    except Exception as e:  # noqa: BLE001
        return None, f"vLLM Marlin failed: {type(e).__name__}: {e}"


def _kernels_for(layer: QuantLinear, act: torch.dtype, by_name: dict[str, type], kernels: list[str] | None,
                 chosen: bool) -> dict[str, object]:
    """The prepared kernels to time on ``layer``: the registry's choice (``chosen``), the named ones that can run it
    (``kernels``), or every one that can (except :data:`_SLOW`).

    Raises:
        KernelError: none of the named kernels can run the layer (the message gives each one's reason).
    """
    spec = layer.spec(act)
    if chosen:
        cls = choose_kernel(spec)
        return {cls.name: cls(layer)}
    out, reasons = {}, []
    for name, cls in by_name.items():
        if (kernels is None and name in _SLOW) or (kernels is not None and name not in kernels):
            continue
        ok, reason = cls.can_implement(spec)
        if ok:
            out[name] = cls(layer)
        else:
            reasons.append(f"{name}: {reason}")
    if kernels is not None and not out:
        raise KernelError(f"no kernel of {', '.join(kernels)} can run {layer.in_features}x{layer.out_features} "
                          f"bits={layer.bits} group_size={layer.group_size} {act}: " + "; ".join(reasons))
    return out


def run_bench(shapes=SHAPES, ms=MS, kernels: list[str] | None = None, bits: int | tuple[int, ...] = 4,
              group_size: int = 128, act_order: bool = False, dtype: str | None = None, device: str | None = None,
              iters: int = 15, budget_s: float = 3.0, progress: Callable[[str], None] | None = None,
              chosen: bool = False) -> list[dict]:
    """Time the kernels on random layers.

    Args:
        shapes: ``(K, N)`` pairs (in_features, out_features). ms: the ``M`` (rows of ``x``) to time.
        kernels: registered kernel names (default: every kernel that can run the layer, except ``reference``); a
            named kernel is skipped for a bit width it cannot run.
        bits: one bit width or several; the layers of every bit width are timed in the same rounds as the dense
            baselines. group_size, act_order: the layers' quantization.
        dtype: "bf16" (CPU default), "fp16" (GPU default) or "fp32". device: "cpu" or "cuda" (default: cuda when
            available).
        iters: rounds per (shape, M). budget_s: stop a (shape, M) after this many seconds (at least 3 rounds).
        progress: called with a line after each (shape, M).
        chosen: time only the kernel the registry chooses for each layer (``$GPTQ_PLUGIN_KERNEL`` and
            ``$GPTQ_PLUGIN_DISABLED_KERNELS`` apply), instead of ``kernels``.

    Returns:
        One dict per (kernel, bits, shape, M): ``kernel, path, M, K, N, bits, group_size, act_order, dtype, device,
        median_us, dense_fp32_us, dense_bf16_us, dense_fp16_us, marlin_us, speedup_fp32, speedup_bf16,
        weight_gb_s`` (GPU-only fields are None on CPU; ``path`` is what a kernel with ``path_for(M)`` runs, e.g.
        cpu_int4's "op" or "tiles", else None), plus ``note`` where a comparison was unavailable.

    Raises:
        KernelError: a named kernel does not exist, or none of the named kernels can run a layer.
    """
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    act = _DTYPES[dtype or ("fp16" if device == "cuda" else "bf16")]
    bit_widths = (bits,) if isinstance(bits, int) else tuple(bits)
    by_name = {k.name: k for k in registered()}
    unknown = [k for k in kernels or [] if k not in by_name]
    if unknown:
        raise KernelError(f"unknown kernel(s) {', '.join(unknown)}; registered: {', '.join(by_name)}")
    rows: list[dict] = []
    for K, N in shapes:
        layers = {b: random_layer(K, N, b, group_size, act_order, device) for b in bit_widths}
        prepared = {(name, b): kernel for b, layer in layers.items()
                    for name, kernel in _kernels_for(layer, act, by_name, kernels, chosen).items()}
        w32 = torch.randn(N, K, device=device)  # nn.Linear's layout
        dense = {"dense_fp32": (w32, torch.float32), "dense_bf16": (w32.bfloat16(), torch.bfloat16)}
        if device == "cuda":
            dense["dense_fp16"] = (w32.half(), torch.float16)
        for M in ms:
            x = torch.randn(M, K, device=device)
            xa = x.to(act)
            fns: dict[str | tuple[str, int], Callable] = {key: (lambda k=kernel: k.forward(xa)) for key, kernel in prepared.items()}
            for name, (w, dt) in dense.items():
                xd = x.to(dt)
                fns[name] = (lambda xd=xd, w=w: F.linear(xd, w))
            note = None
            if device == "cuda":
                for b in (b for b in bit_widths if b in (4, 8)):  # Marlin's GPTQ types
                    fn, note = _marlin(layers[b], M, x)
                    if fn is not None:
                        fns[("marlin", b)] = fn
            with torch.no_grad():
                t = _time_side_by_side(fns, device, iters, budget_s, reps=10 if device == "cuda" else 1)
            for name, b in prepared:
                us = t[(name, b)]
                path_for = getattr(prepared[(name, b)], "path_for", None)
                rows.append(dict(
                    kernel=name, path=path_for(M) if path_for else None, M=M, K=K, N=N, bits=b,
                    group_size=group_size, act_order=act_order,
                    dtype=str(act).removeprefix("torch."), device=device, median_us=round(us, 1),
                    dense_fp32_us=round(t["dense_fp32"], 1), dense_bf16_us=round(t["dense_bf16"], 1),
                    dense_fp16_us=round(t["dense_fp16"], 1) if "dense_fp16" in t else None,
                    marlin_us=round(t[("marlin", b)], 1) if ("marlin", b) in t else None,
                    speedup_fp32=round(t["dense_fp32"] / us, 2), speedup_bf16=round(t["dense_bf16"] / us, 2),
                    weight_gb_s=round(_weight_bytes(layers[b]) / us / 1e3, 1), **({"note": note} if note else {})))
            if progress:
                progress(f"{K}x{N} M={M}: " + ", ".join(
                    f"{k if isinstance(k, str) else f'{k[0]}/{k[1]}b'} {v:.0f}us" for k, v in t.items()))
    return rows


def run_perplexity(checkpoint: str, kernels: list[str] | None = None, dtype: str = "bf16", windows: int = 8,
                   seqlen: int = 512, dataset: str | None = None, tokenizer: str | None = None,
                   device: str = "cpu") -> list[dict]:
    """WikiText-2 perplexity of a GPTQ checkpoint with each kernel forced in turn (``$GPTQ_PLUGIN_KERNEL``).

    Args:
        checkpoint: a GPTQ checkpoint folder (read with :func:`~gptq_plugin.checkpoint.load_quantized`).
        kernels: kernel names (default: every registered kernel that can run every layer in ``dtype``).
        dtype: "bf16", "fp16" or "fp32" for the model and activations. windows, seqlen: the first ``windows``
            windows of ``seqlen`` tokens of ``dataset`` (default: the shared ``wiki.test.raw``).
        tokenizer: tokenizer folder when the checkpoint has none.

    Returns:
        One dict per kernel: ``kernel, dtype, windows, seqlen, perplexity, seconds, rel_to_reference``.
    """
    from transformers import AutoTokenizer

    act = _DTYPES[dtype]
    model = load_quantized(checkpoint, dtype=act, device=device)
    ids = eval_windows(AutoTokenizer.from_pretrained(tokenizer or checkpoint), dataset, seqlen, windows)
    layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
    names = kernels or [k.name for k in registered()
                        if all(k.can_implement(m.spec(act))[0] for m in layers)]
    rows, old = [], os.environ.get(ENV_FORCE_KERNEL)
    try:
        for name in names:
            os.environ[ENV_FORCE_KERNEL] = name
            for m in layers:
                m.reset_kernel()
            t = time.perf_counter()
            ppl = perplexity(model, ids, progress=False)
            rows.append(dict(kernel=name, dtype=dtype, windows=int(ids.shape[0]), seqlen=seqlen,
                             perplexity=round(ppl, 4), seconds=round(time.perf_counter() - t, 1)))
    finally:
        if old is None:
            os.environ.pop(ENV_FORCE_KERNEL, None)
        else:
            os.environ[ENV_FORCE_KERNEL] = old
    ref = next((r["perplexity"] for r in rows if r["kernel"] == "reference"), None)
    for r in rows:
        r["rel_to_reference"] = None if ref is None else round(r["perplexity"] / ref - 1, 6)
    return rows


def format_table(rows: list[dict]) -> str:
    """One fixed-width table, a row per (kernel, shape, M); GPU columns only when measured."""
    gpu = any(r.get("dense_fp16_us") is not None for r in rows)
    cols = [("kernel", "kernel", "<16"), ("path", "path", "<7"), ("M", "M", ">5"), ("KxN", None, ">11"),
            ("bits", "bits", ">4"), ("group", "group_size", ">5"), ("dtype", "dtype", ">8"),
            ("median_us", "median_us", ">10"),
            ("fp32_us", "dense_fp32_us", ">10"), ("bf16_us", "dense_bf16_us", ">10")]
    if gpu:
        cols += [("fp16_us", "dense_fp16_us", ">10"), ("marlin_us", "marlin_us", ">10")]
    cols += [("x_fp32", "speedup_fp32", ">7"), ("x_bf16", "speedup_bf16", ">7"), ("GB/s", "weight_gb_s", ">7")]
    lines = [" ".join(f"{h:{f}}" for h, _, f in cols)]
    for r in rows:
        cells = []
        for h, key, f in cols:
            v = f"{r['K']}x{r['N']}" if key is None else r.get(key)
            cells.append(f"{'-' if v is None else v:{f}}")
        lines.append(" ".join(cells))
    notes = sorted({r["note"] for r in rows if r.get("note")})
    return "\n".join(lines + [f"note: {n}" for n in notes])


def _plain_table(rows: list[dict]) -> str:
    keys = list(rows[0]) if rows else []
    width = {k: max(len(k), *(len(str(r[k])) for r in rows)) for k in keys}
    return "\n".join([" ".join(f"{k:>{width[k]}}" for k in keys)] +
                     [" ".join(f"{str(r[k]):>{width[k]}}" for k in keys) for r in rows])


def _ints(s: str) -> list[int]:
    return [int(v) for v in s.split(",") if v.strip()]


def _bits(s: str) -> list[int]:
    out = _ints(s)
    bad = [b for b in out if b not in (2, 3, 4, 8)]
    if bad or not out:
        raise argparse.ArgumentTypeError(f"bits {s!r}: use a comma-separated subset of 2,3,4,8")
    return out


def _shapes(s: str) -> list[tuple[int, int]]:
    out = []
    for item in s.split(","):
        k, _, n = item.strip().lower().partition("x")
        out.append((int(k), int(n)))
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python benchmarks/kernel_bench.py", description=__doc__.splitlines()[0])
    p.add_argument("--shapes", type=_shapes, default=list(SHAPES),
                   help="comma-separated KxN (in x out features), default: " + ",".join(f"{k}x{n}" for k, n in SHAPES))
    p.add_argument("--m", dest="ms", type=_ints, default=list(MS), help="comma-separated M, default 1,4,16,128,1024")
    p.add_argument("--kernels", type=lambda s: [v.strip() for v in s.split(",") if v.strip()], default=None,
                   help="comma-separated kernel names (default: all that can run the layer, except reference)")
    p.add_argument("--bits", type=_bits, default=[4],
                   help="comma-separated bit widths, timed in the same rounds (default 4; any of 2,3,4,8)")
    p.add_argument("--chosen", action="store_true",
                   help="time only the kernel the registry chooses for each layer (instead of --kernels)")
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--act-order", action="store_true")
    p.add_argument("--dtype", choices=sorted(_DTYPES), default=None, help="activations (default bf16 on CPU, fp16 on GPU)")
    p.add_argument("--device", choices=("cpu", "cuda"), default=None)
    p.add_argument("--iters", type=int, default=15, help="rounds per shape and M (default 15)")
    p.add_argument("--budget", type=float, default=3.0, help="seconds per shape and M (default 3)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--quick", action="store_true", help="shapes 576x1536,4096x4096 and M 1,16 (a smoke run)")
    p.add_argument("--checkpoint", default=None,
                   help="instead of timing layers: perplexity of this GPTQ checkpoint with each kernel")
    p.add_argument("--tokenizer", default=None, help="with --checkpoint: tokenizer folder if the checkpoint has none")
    p.add_argument("--windows", type=int, default=8, help="with --checkpoint: evaluation windows (default 8)")
    p.add_argument("--seqlen", type=int, default=512, help="with --checkpoint: tokens per window (default 512)")
    p.add_argument("--dataset", default=None, help="with --checkpoint: text file (default: shared wiki.test.raw)")
    p.add_argument("--json", action="store_true", help='print {"rows": [...]} instead of the table')
    return p


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv`` (default ``sys.argv[1:]``), run, print the table or JSON to stdout; returns the exit code."""
    args = build_parser().parse_args(argv)
    if args.quick:
        args.shapes, args.ms = [(576, 1536), (4096, 4096)], [1, 16]
    if args.threads:
        torch.set_num_threads(args.threads)
    log = (lambda line: print(line, file=sys.stderr, flush=True))
    try:
        if args.checkpoint:
            rows = run_perplexity(args.checkpoint, args.kernels, args.dtype or "bf16", args.windows, args.seqlen,
                                  args.dataset, args.tokenizer, args.device or "cpu")
            print(json.dumps({"rows": rows}, indent=1) if args.json else _plain_table(rows))
            return 0
        if args.chosen and args.kernels:
            raise GPTQPluginError("--chosen and --kernels exclude each other: --chosen times the registry's choice")
        rows = run_bench(args.shapes, args.ms, args.kernels, args.bits, args.group_size, args.act_order, args.dtype,
                         args.device, args.iters, args.budget, progress=log, chosen=args.chosen)
    except GPTQPluginError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps({"rows": rows}, indent=1) if args.json else format_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
