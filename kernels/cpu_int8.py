"""CPU fast path for 8-bit layers: the compiled GEMV and bf16 tiles of :mod:`gptq_plugin.kernels.cpu_native`, or,
without a C compiler, each code split into two 4-bit planes, both run through the int4 op in one call.

With the compiled helpers the GEMV (``M <=`` :data:`GEMV_MAX_M`) reads one byte per weight, 1.5-1.9x faster than
the op at ``M = 1`` (docs/kernels.md), and the tiles run prefill at ~0.95x a dense bf16 GEMM; the op is then never
used and its planes are never packed. Without them, the two-plane op below runs up to :data:`CHUNKED_ABOVE_M`.

An 8-bit code is ``q = 16 * hi + lo`` with ``hi, lo`` in ``[0, 16)``, so GPTQ's ``W = s * (q - z)`` is::

    W = 16 s * (hi - 8)  +  s * (lo - 8)  +  s * (136 - z)

two weights in the convention of ``_weight_int4pack_mm_for_cpu`` (``(q - 8) * scale + zero``,
:mod:`gptq_plugin.kernels.cpu_int4`): plane ``hi`` with scale ``16 s``, plane ``lo`` with scale ``s``, and the zero
term ``Z = s * (136 - z)`` split over the two planes' zeros (``Zh = bf16(Z)``, ``Zl = bf16(Z - Zh)``), so that it
is carried to ~16 significant bits in bf16 (and ``Z = 8 s``, exact, for a symmetric layer). The planes are stacked
along ``K`` (``[N, 2 Kp]`` codes: one byte per weight, as int8) and the op runs once on ``[x, x]``, accumulating
both planes in fp32 before its one rounding of the output.

Measured against the alternatives on the benchmark machine (docs/kernels.md, one thread): two op calls summed
(within 5% at ``M = 1``, two output roundings), ``_weight_int8pack_mm`` once per group (it has per-channel scales
only; within 10% at ``M = 1``, 10-15% faster for ``16 <= M <= 128`` but slower than a dense bf16 GEMM there
anyway) and the chunked dequantize-and-matmul (faster above ``M = 72``, which is why the kernel hands those to it).
All of them decode about as fast as the int4 op does twice, so at ``M = 1`` an 8-bit layer takes about twice a
4-bit one.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from gptq_plugin.errors import KernelError

from .cpu_int4 import OP_CENTRE, Int4OpKernel, op_groups, pack_int4_codes
from .layout import GroupOrder, group_order, unpack_codes, zeros_and_scales

CHUNKED_ABOVE_M = 72  # op vs chunked bf16 GEMM (no compiled helpers), measured: see docs/kernels.md
GEMV_MAX_M = 5  # with the compiled helpers: their GEMV up to here, their bf16 tiles above (docs/kernels.md)
TILES_ABOVE_M = GEMV_MAX_M  # (the int4 op is slower than both at every M: never used with the helpers)


def pack_int8_planes_for_cpu(layer, order: GroupOrder | None = None, dtype: torch.dtype = torch.float32
                             ) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    """Repack an 8-bit GPTQ layer as two int4 planes for ``_weight_int4pack_mm_for_cpu`` (module docstring).

    Args:
        layer: an 8-bit :class:`gptq_plugin.linear.QuantLinear` on CPU with ``N % 16 == 0``.
        order: its :class:`~gptq_plugin.kernels.layout.GroupOrder` (computed when None).
        dtype: the activation dtype the op will run in (``scale_and_zero`` is built in it).

    Returns:
        ``(w_packed, scale_and_zero, t, Kp)``: the op's uint8 ``[N, Kp]`` weight (plane ``hi`` in op channels
        ``[0, Kp)``, plane ``lo`` in ``[Kp, 2 Kp)``), ``[2 Kp / t, N, 2]`` in ``dtype``, the op group ``t`` and ``K``
        padded to a multiple of ``t``. The op is fed ``[x, x]`` (``[M, 2 Kp]``); in fp32, fed identity rows, it
        returns the reference's weight bit for bit.

    Raises:
        KernelError: ``bits != 8``, or no op group fits the layer's groups.
    """
    if layer.bits != 8:
        raise KernelError(f"cpu_int8 packs 8-bit layers, not bits={layer.bits}")
    order = order or group_order(layer.g_idx, layer.group_size)
    t, Kp, g = op_groups(layer, order, "cpu_int8")
    codes = unpack_codes(layer, order)  # int32 [K, N], group order
    hi = F.pad(codes >> 4, (0, 0, 0, Kp - codes.shape[0]), value=OP_CENTRE)
    w_packed = pack_int4_codes(torch.cat([hi, codes & 15]), 2 * Kp)
    zeros, scales = zeros_and_scales(layer)  # [G, N]
    s = scales[g].to(dtype).float()  # the scale the op will use, [Kp / t, N]
    Z = s * (2 * OP_CENTRE * OP_CENTRE + OP_CENTRE - zeros[g].float())  # s * (136 - z): exact in fp32
    Zh = Z.to(dtype).float()
    sz = torch.cat([torch.stack([16 * s, Zh], dim=-1), torch.stack([s, Z - Zh], dim=-1)])
    return w_packed, sz.to(dtype).contiguous(), t, Kp


class CpuInt8Kernel(Int4OpKernel):
    """8-bit GPTQ on CPU (bf16 activations, fp32 accumulation): with the compiled helpers of
    :mod:`~gptq_plugin.kernels.cpu_native`, their GEMV for ``M <=`` :data:`GEMV_MAX_M` and their bf16 tiles above
    (one copy of the codes, theirs); without them, the int4 op on two planes up to :data:`CHUNKED_ABOVE_M` and the
    chunked bf16 GEMM above. Each copy of the codes holds 8 bits per weight."""

    name = "cpu_int8"
    priority = 50
    bits_ok = (8,)
    chunked_above_m = CHUNKED_ABOVE_M
    tiles_above_m = TILES_ABOVE_M
    gemv_max_m = GEMV_MAX_M

    @classmethod
    def bits_reason(cls, bits: int) -> str:
        return f"bits={bits}: cpu_int8 runs 8-bit layers only (2-, 3- and 4-bit ones are cpu_int4's)"

    def pack(self, layer, order, dtype):
        return pack_int8_planes_for_cpu(layer, order, dtype)

    def op_input(self, x2: torch.Tensor) -> torch.Tensor:
        return torch.cat([x2, x2], dim=1)  # [M, 2 Kp]: one copy for each plane
