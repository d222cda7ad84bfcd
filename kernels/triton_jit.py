"""Triton fused dequantize-GEMM kernels for GPTQ layers, and one launcher per kernel.

Imported lazily (by :mod:`gptq_plugin.kernels.triton_kernels` on first use), never by the registry: ``@triton.jit``
reads ``TRITON_INTERPRET`` when this module is imported, and the CPU interpreter must be chosen before that.

Operands (prepared once per layer by :class:`~gptq_plugin.kernels.triton_kernels.TritonWeight`):

* ``x`` ``(M, K)`` fp16/bf16, input channels already in group order (``x[:, perm]`` for act-order);
* ``qweight`` ``(ceil(K * BITS / 32), N)`` int32, GPTQ's layout in group order (3-bit codes straddle words);
* ``scales`` ``(G, N)`` fp16/bf16; ``zeros`` ``(G, N)`` uint8 true zero points;
* ``g_idx`` ``(K,)`` int32, non-decreasing: the group of each channel (contiguous groups, any lengths);
* ``bias`` ``(N,)`` or a dummy pointer; ``y`` ``(M, N)`` in ``x``'s dtype (GEMM) or fp32 partial sums
  ``(SPLIT_K, M, N)`` (split-K).

``W[k, n] = scales[g_idx[k], n] * (code[k, n] - zeros[g_idx[k], n])`` is computed in fp32, cast to ``x``'s dtype
and fed to ``tl.dot`` with fp32 accumulation. Every dimension is masked; nothing needs to divide anything.
"""

from __future__ import annotations

import contextlib
import os

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
AUTOTUNE = os.environ.get("GPTQ_PLUGIN_TRITON_AUTOTUNE", "1") != "0"  # 0: first config only (fast test compiles)


@contextlib.contextmanager
def _same_mode():
    """Keep ``TRITON_INTERPRET`` as it was at import while launching: Triton reads it again lazily (e.g. when it
    first imports its Gluon frontend), and a mismatch with the already-decorated kernels fails."""
    old = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1" if INTERPRET else "0"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = old


@triton.jit
def _dequant_tile(q_ptr, s_ptr, z_ptr, g_ptr, offs_k, offs_n, mask_k, mask_n,
                  stride_qk, stride_qn, stride_sg, stride_sn, stride_zg, stride_zn,
                  BITS: tl.constexpr):
    """fp32 ``[BLOCK_K, BLOCK_N]`` tile of ``W`` (rows ``offs_k``, columns ``offs_n``); 0 where masked."""
    mask = mask_k[:, None] & mask_n[None, :]
    bitpos = offs_k * BITS
    word = bitpos // 32
    shift = (bitpos % 32).to(tl.uint32)
    lo = tl.load(q_ptr + word[:, None] * stride_qk + offs_n[None, :] * stride_qn, mask=mask, other=0)
    code = (lo.to(tl.uint32, bitcast=True) >> shift[:, None]) & ((1 << BITS) - 1)
    if BITS == 3:  # codes 10 and 21 of each 32 straddle two words: take their high bits from the next word
        straddle = (shift + BITS) > 32
        hi = tl.load(q_ptr + (word + 1)[:, None] * stride_qk + offs_n[None, :] * stride_qn,
                     mask=mask & straddle[:, None], other=0)
        up = tl.where(straddle, 32 - shift, 0).to(tl.uint32)
        code = code | ((hi.to(tl.uint32, bitcast=True) << up[:, None]) & ((1 << BITS) - 1))
    g = tl.load(g_ptr + offs_k, mask=mask_k, other=0)
    s = tl.load(s_ptr + g[:, None] * stride_sg + offs_n[None, :] * stride_sn, mask=mask, other=0.0)
    z = tl.load(z_ptr + g[:, None] * stride_zg + offs_n[None, :] * stride_zn, mask=mask, other=0)
    return (code.to(tl.float32) - z.to(tl.float32)) * s.to(tl.float32)


@triton.jit
def _dot(x, w, acc, DOT_FP32: tl.constexpr):
    """``acc + x @ w`` (fp32 accumulation). ``DOT_FP32`` multiplies in fp32 (the CPU interpreter's bf16 dot is
    wrong in Triton 3.x); otherwise ``w`` is cast to ``x``'s fp16/bf16 for the tensor cores."""
    if DOT_FP32:
        return tl.dot(x.to(tl.float32), w, acc, input_precision="ieee")
    return tl.dot(x, w.to(x.dtype), acc)


@triton.jit
def gptq_gemm_kernel(
    x_ptr, q_ptr, s_ptr, z_ptr, g_ptr, bias_ptr, y_ptr,
    M, N, K,
    stride_xm, stride_xk, stride_qk, stride_qn, stride_sg, stride_sn, stride_zg, stride_zn, stride_ym, stride_yn,
    M_BUCKET,  # autotune key only
    BITS: tl.constexpr, HAS_BIAS: tl.constexpr, DOT_FP32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """Tiled GEMM (prefill): one program per ``BLOCK_M x BLOCK_N`` tile of ``y``, grouped launch order for L2 reuse."""
    pid = tl.program_id(0)
    grid_m = tl.cdiv(M, BLOCK_M)
    grid_n = tl.cdiv(N, BLOCK_N)
    width = GROUP_M * grid_n
    first_m = (pid // width) * GROUP_M
    group_m = tl.minimum(grid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % group_m
    pid_n = (pid % width) // group_m

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                    mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        w = _dequant_tile(q_ptr, s_ptr, z_ptr, g_ptr, offs_k, offs_n, mask_k, mask_n,
                          stride_qk, stride_qn, stride_sg, stride_sn, stride_zg, stride_zn, BITS)
        acc = _dot(x, w, acc, DOT_FP32)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :] * stride_yn, acc.to(y_ptr.dtype.element_ty),
             mask=mask_m[:, None] & mask_n[None, :])


@triton.jit
def gptq_splitk_kernel(
    x_ptr, q_ptr, s_ptr, z_ptr, g_ptr, ws_ptr,
    M, N, K, K_PER_SPLIT,
    stride_xm, stride_xk, stride_qk, stride_qn, stride_sg, stride_sn, stride_zg, stride_zn,
    stride_wk, stride_wm, stride_wn,
    M_BUCKET,  # autotune key only
    BITS: tl.constexpr, DOT_FP32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Split-K GEMV (decode, small ``M``): program ``(n, s, m)`` reduces channels
    ``[s * K_PER_SPLIT, (s + 1) * K_PER_SPLIT)`` of one ``BLOCK_M x BLOCK_N`` tile into ``ws[s]`` (fp32); the
    launcher sums the splits (deterministic, no atomics)."""
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    pid_m = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    k_start = pid_s * K_PER_SPLIT
    k_end = tl.minimum(k_start + K_PER_SPLIT, K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_start, k_end, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < k_end
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                    mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        w = _dequant_tile(q_ptr, s_ptr, z_ptr, g_ptr, offs_k, offs_n, mask_k, mask_n,
                          stride_qk, stride_qn, stride_sg, stride_sn, stride_zg, stride_zn, BITS)
        acc = _dot(x, w, acc, DOT_FP32)
    tl.store(ws_ptr + pid_s * stride_wk + offs_m[:, None] * stride_wm + offs_n[None, :] * stride_wn, acc,
             mask=mask_m[:, None] & mask_n[None, :])


# --- launch configurations -----------------------------------------------------------------------------------
def gemm_configs() -> list[triton.Config]:
    """Autotune space of :func:`gptq_gemm_kernel`, keyed on ``(M_BUCKET, N, K)``; one small tile when interpreted."""
    if INTERPRET:
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 4})]
    configs = [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, num_warps=w, num_stages=st)
               for bm, bn, bk, w, st in [(64, 64, 64, 4, 4), (128, 128, 64, 8, 3), (128, 64, 64, 4, 4),
                                         (64, 128, 64, 4, 4), (128, 256, 64, 8, 3), (32, 64, 128, 4, 4),
                                         (256, 128, 64, 8, 3)]]
    return configs if AUTOTUNE else configs[:1]


def splitk_configs() -> list[triton.Config]:
    """Autotune space of :func:`gptq_splitk_kernel` (``BLOCK_M = 16``, the smallest tensor-core tile)."""
    if INTERPRET:
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32})]
    configs = [triton.Config({"BLOCK_M": 16, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=st)
               for bn, bk, w, st in [(64, 128, 4, 3), (128, 128, 4, 3), (64, 256, 4, 3), (128, 64, 4, 4),
                                     (256, 64, 8, 3), (32, 256, 4, 3)]]
    return configs if AUTOTUNE else configs[:1]


_MAX_SPLITK_BLOCK_K = max(c.kwargs["BLOCK_K"] for c in splitk_configs())
_gemm = triton.autotune(configs=gemm_configs(), key=["M_BUCKET", "N", "K"])(gptq_gemm_kernel)
_splitk = triton.autotune(configs=splitk_configs(), key=["M_BUCKET", "N", "K", "K_PER_SPLIT"])(gptq_splitk_kernel)


def _m_bucket(M: int) -> int:
    return triton.next_power_of_2(max(M, 1))


def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def launch_gemm(x: torch.Tensor, w, bias: torch.Tensor | None, out: torch.Tensor) -> torch.Tensor:
    """``out = x @ W + bias`` with the tiled kernel.

    Args:
        x: ``(M, K)`` fp16/bf16, group order. w: a prepared ``TritonWeight``. bias: ``(N,)`` or None.
        out: ``(M, N)`` in ``x.dtype``; every element is written.

    Returns:
        ``out``.
    """
    M, K = x.shape
    N = w.N
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)  # noqa: E731
    with _same_mode():
        _gemm[grid](x, w.qweight, w.scales, w.zeros, w.g_idx, bias if bias is not None else out, out,
                    M, N, K,
                    x.stride(0), x.stride(1), w.qweight.stride(0), w.qweight.stride(1), w.scales.stride(0),
                    w.scales.stride(1), w.zeros.stride(0), w.zeros.stride(1), out.stride(0), out.stride(1),
                    _m_bucket(M), BITS=w.bits, HAS_BIAS=bias is not None, DOT_FP32=INTERPRET)
    return out


def splitk_factor(M: int, N: int, K: int, device: torch.device, block_n: int = 64, block_k: int = 128) -> int:
    """How many K slices keep every SM busy: about 4 programs per SM, at most one slice per ``block_k`` channels."""
    tiles = triton.cdiv(N, block_n) * triton.cdiv(M, 16)
    return max(1, min(triton.cdiv(4 * _sm_count(device), tiles), triton.cdiv(K, block_k)))


def launch_splitk(x: torch.Tensor, w, bias: torch.Tensor | None, out: torch.Tensor, split_k: int | None = None,
                  workspace: torch.Tensor | None = None) -> torch.Tensor:
    """``out = x @ W + bias`` with the split-K kernel, then a sum over splits.

    Args:
        x: ``(M, K)`` fp16/bf16, group order. w: a prepared ``TritonWeight``. bias: ``(N,)`` or None.
        out: ``(M, N)`` in ``x.dtype``. split_k: number of K slices (default :func:`splitk_factor`).
        workspace: fp32 ``(split_k, M, N)`` for the partial sums (allocated when None; every element is written).

    Returns:
        ``out``.
    """
    M, K = x.shape
    N = w.N
    split_k = split_k or splitk_factor(M, N, K, x.device)
    # every slice but possibly the last is a whole number of the largest BLOCK_K, so no K tile spans two slices
    k_per_split = triton.cdiv(triton.cdiv(K, split_k), _MAX_SPLITK_BLOCK_K) * _MAX_SPLITK_BLOCK_K
    split_k = triton.cdiv(K, k_per_split)
    if workspace is None:
        workspace = torch.empty(split_k, M, N, device=x.device, dtype=torch.float32)
    grid = lambda meta: (triton.cdiv(N, meta["BLOCK_N"]), split_k, triton.cdiv(M, meta["BLOCK_M"]))  # noqa: E731
    with _same_mode():
        _splitk[grid](x, w.qweight, w.scales, w.zeros, w.g_idx, workspace,
                      M, N, K, k_per_split,
                      x.stride(0), x.stride(1), w.qweight.stride(0), w.qweight.stride(1), w.scales.stride(0),
                      w.scales.stride(1), w.zeros.stride(0), w.zeros.stride(1),
                      workspace.stride(0), workspace.stride(1), workspace.stride(2),
                      _m_bucket(M), BITS=w.bits, DOT_FP32=INTERPRET)
    y = workspace[:split_k].sum(0)
    if bias is not None:
        y += bias.float()
    return out.copy_(y)
