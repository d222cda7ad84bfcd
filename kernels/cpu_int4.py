"""CPU fast path for 4-bit layers: PyTorch's native int4 weight-only matmul for CPU.

``torch.ops.aten._weight_int4pack_mm_for_cpu(x, w_packed, group, scale_and_zero)`` computes
``y = x @ Wᵀ`` with ``W[n, k] = (q[n, k] - 8) * scale[k // group, n] + zero[k // group, n]`` (the "tinygemm"
convention), decoding 4-bit codes inside the GEMM so only half a byte per weight is read. Its packing op
``_convert_weight_to_int4pack_for_cpu`` takes int32 codes ``[N, K]``.

Constraints, checked on torch 2.13 (see docs/kernels.md): ``N % 16 == 0``; ``group`` in {32, 64, 128, 256} and
``K % group == 0``; ``scale_and_zero`` in the activation dtype. The op's bf16 path is vectorised, its fp16 and
fp32 paths are several times slower than a dense matmul, so this kernel takes bf16 activations only.

Exact repacking from GPTQ: with GPTQ's ``W = s * (q - z)``, ``zero = s * (8 - z)`` (exact in fp32, rounded once
to bf16 with ``s``). A GPTQ group is split into op groups of ``t`` channels (``t`` dividing the group size);
group size -1, partial last groups and ``K`` not a multiple of ``t`` are handled by zero-padding ``K`` (``x`` is
padded at run time only then). Act-order layers are permuted once at load (:mod:`gptq_plugin.kernels.layout`).
For ``M`` above :data:`CHUNKED_ABOVE_M` the dense bf16 GEMM on chunk-dequantized weights is faster, and used.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from gptq_plugin.errors import KernelError

from .base import LayerSpec, QuantKernel
from .dequant_chunked import ChunkedWeight
from .layout import group_order, unpack_codes, zeros_and_scales

OP_GROUPS = (256, 128, 64, 32)
CHUNKED_ABOVE_M = 128  # crossover measured on a 2-core Sapphire Rapids VM: see docs/kernels.md


def _ops_available() -> bool:
    aten = torch.ops.aten
    return hasattr(aten, "_weight_int4pack_mm_for_cpu") and hasattr(aten, "_convert_weight_to_int4pack_for_cpu")


def op_group(group_size: int, K: int, g_sorted: torch.Tensor | None = None) -> int | None:
    """The largest op group ``t`` in :data:`OP_GROUPS` such that every run of ``t`` channels (after padding ``K`` to
    a multiple of ``t``) lies in one GPTQ group; None when there is none.

    Args:
        group_size: the layer's group size (-1: one group). K: in_features.
        g_sorted: int64 ``[K]`` group of each channel in group order; when given, checked element-wise (this also
            covers act-order checkpoints whose groups have unequal lengths).
    """
    for t in OP_GROUPS:
        if g_sorted is None:
            if group_size == -1 or group_size % t == 0:
                return t
            continue
        Kp = (K + t - 1) // t * t
        g = torch.cat([g_sorted, g_sorted[-1:].expand(Kp - K)]).view(-1, t)
        if bool((g == g[:, :1]).all()):
            return t
    return None


def pack_int4_for_cpu(layer, order=None) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    """Repack a 4-bit GPTQ layer for ``_weight_int4pack_mm_for_cpu``.

    Args:
        layer: a 4-bit :class:`gptq_plugin.linear.QuantLinear` on CPU with ``N % 16 == 0``.
        order: its :class:`~gptq_plugin.kernels.layout.GroupOrder` (computed when None).

    Returns:
        ``(w_packed, scale_and_zero, t, Kp)``: the op's uint8 ``[N, Kp / 2]`` weight, fp32 ``[Kp / t, N, 2]``
        (cast it to the activation dtype), the op group ``t`` and padded ``K``.

    Raises:
        KernelError: no op group fits the layer's groups.
    """
    K = layer.in_features
    order = order or group_order(layer.g_idx, layer.group_size)
    t = op_group(layer.group_size, K, order.g_idx)
    if t is None:
        raise KernelError(f"cpu_int4: the groups of this layer (group_size={layer.group_size}) cannot be split into "
                          f"runs of {OP_GROUPS} channels; disable it with GPTQ_PLUGIN_DISABLED_KERNELS=cpu_int4")
    Kp = (K + t - 1) // t * t
    codes = unpack_codes(layer, order)  # [K, N], group order
    codes = F.pad(codes, (0, 0, 0, Kp - K), value=8)  # padded channels decode to `zero` and meet x = 0
    w_packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.t().contiguous(), 1)
    zeros, scales = zeros_and_scales(layer)  # [G, N]
    first = torch.arange(0, Kp, t)  # first channel of each op group
    g = order.g_idx[first.clamp(max=K - 1)]
    s = scales[g]
    scale_and_zero = torch.stack([s, s * (8 - zeros[g].float())], dim=-1).contiguous()
    return w_packed, scale_and_zero, t, Kp


class CpuInt4Kernel(QuantKernel):
    """4-bit GPTQ on CPU through ``_weight_int4pack_mm_for_cpu`` (bf16 activations, fp32 accumulation)."""

    name = "cpu_int4"
    priority = 50

    @classmethod
    def can_implement(cls, spec: LayerSpec) -> tuple[bool, str | None]:
        if spec.device != "cpu":
            return False, f"device {spec.device!r} is not cpu"
        if not _ops_available():
            return False, f"torch {torch.__version__} has no aten._weight_int4pack_mm_for_cpu (needs torch >= 2.6)"
        if spec.bits != 4:
            return False, f"bits={spec.bits}: the int4 op needs 4-bit weights"
        if spec.out_features % 16:
            return False, f"out_features={spec.out_features} is not a multiple of 16 (the op's packing)"
        if op_group(spec.group_size, spec.in_features) is None:
            return False, f"group_size={spec.group_size} is not -1 or a multiple of 32 (op groups are {OP_GROUPS})"
        if not spec.uniform_groups:
            return False, ("groups of unequal lengths (a tensor-parallel shard of an act-order layer) cannot be split "
                           f"into runs of {OP_GROUPS} channels")
        if spec.dtype != torch.bfloat16:
            return False, (f"activation dtype {spec.dtype}: the op is only fast for bf16 (its fp16/fp32 paths are "
                           "slower than dequantize-and-matmul); run the model in bf16")
        return True, None

    def __init__(self, layer):
        super().__init__(layer)
        order = group_order(layer.g_idx, layer.group_size)
        self.perm = order.perm
        self.w_packed, sz, self.t, self.Kp = pack_int4_for_cpu(layer, order)
        self.scale_and_zero = sz.to(torch.bfloat16)
        self._chunked = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` bf16 ``[..., K]`` -> bf16 ``[..., N]``."""
        layer = self.layer
        x2 = x.reshape(-1, x.shape[-1])
        if x2.shape[0] > CHUNKED_ABOVE_M:  # compute-bound: the dense bf16 GEMM wins
            if self._chunked is None:
                self._chunked = ChunkedWeight(layer)
            y = self._chunked.matmul(x2, layer.bias)
        else:
            y = self.matmul(x2)
            if layer.bias is not None:
                y += layer.bias.to(y.dtype)
        return y.view(*x.shape[:-1], y.shape[-1])

    def matmul(self, x2: torch.Tensor) -> torch.Tensor:
        """``x2`` bf16 ``[M, K]`` in input order -> ``x2 @ dequant(W)ᵀ`` bf16 ``[M, N]`` through the int4 op."""
        if self.perm is not None:
            x2 = x2.index_select(1, self.perm)
        if self.Kp != x2.shape[1]:
            x2 = F.pad(x2, (0, self.Kp - x2.shape[1]))
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x2.contiguous(), self.w_packed, self.t,
                                                          self.scale_and_zero)
