"""CPU fast path for 2-, 3- and 4-bit layers: PyTorch's native int4 weight-only matmul for CPU.

``torch.ops.aten._weight_int4pack_mm_for_cpu(x, w_packed, group, scale_and_zero)`` computes
``y = x @ Wᵀ`` with ``W[n, k] = (q[n, k] - 8) * scale[k // group, n] + zero[k // group, n]`` (the "tinygemm"
convention), decoding 4-bit codes inside the GEMM so only half a byte per weight is read. Its packing op
``_convert_weight_to_int4pack_for_cpu`` takes int32 codes ``[N, K]`` in ``[0, 16)``.

Constraints, checked on torch 2.13 (see docs/kernels.md): ``N % 16 == 0``; ``group`` in {32, 64, 128, 256} and
``K % group == 0``; ``scale_and_zero`` in the activation dtype. The op's bf16 path is vectorised, its fp16 and
fp32 paths are several times slower than a dense matmul, so these kernels take bf16 activations only.

Exact repacking from GPTQ (``W = s * (q - z)``, codes ``q`` and zeros ``z`` in ``[0, 2**bits)``): 2-, 3- and 4-bit
codes all fit the op's 4 bits. They are stored re-centred, ``q + 8 - c`` with ``c = 2**(bits - 1)`` (GPTQ's
symmetric zero point), so the op decodes ``q - c`` and ``zero = s * (c - z)``: zero for a symmetric layer, and
exact in fp32. In bf16 the scale is rounded once and ``zero`` is formed from the rounded scale, so the
dequantized weight is ``bf16(s) * (q - z)`` up to one rounding of ``zero``. The op's copy holds 4 bits per weight
whatever the checkpoint's bit width (3-bit layers keep their 3-bit packing on disk only; docs/kernels.md).

A GPTQ group is split into op groups of ``t`` channels (``t`` dividing the group size); group size -1, partial
last groups and ``K`` not a multiple of ``t`` are handled by zero-padding ``K`` (``x`` is padded at run time only
then). Act-order layers are permuted once at load (:mod:`gptq_plugin.kernels.layout`). For ``M`` above a
measured crossover a dense bf16 GEMM on dequantized weights is faster, and used: tiles dequantized by the compiled
helpers of :mod:`gptq_plugin.kernels.cpu_native`, or without them the chunked path (:class:`Int4OpKernel`).
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F

from gptq_plugin.errors import KernelError

from .base import LayerSpec, QuantKernel
from .cpu_native import NativeWeight, library, unavailable_reason
from .dequant_chunked import ChunkedWeight
from .layout import GroupOrder, group_order, unpack_codes, zeros_and_scales

OP_GROUPS = (256, 128, 64, 32)
OP_CENTRE = 8  # the op decodes ``q - 8``
CHUNKED_ABOVE_M = 640  # op vs chunked bf16 GEMM (no compiled helpers), measured: see docs/kernels.md
TILES_ABOVE_M = 12  # op vs compiled dequant + bf16 GEMM tiles, measured: see docs/kernels.md


def ops_available() -> bool:
    """Whether this torch has the int4 CPU weight-only matmul and its packing op (torch >= 2.6)."""
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


def op_groups(layer, order: GroupOrder, kernel: str) -> tuple[int, int, torch.Tensor]:
    """How a layer's groups map onto the op's (``kernel``: the name that errors give).

    Returns:
        ``(t, Kp, g)``: the op group, ``K`` padded to a multiple of ``t``, and int64 ``[Kp / t]``, the GPTQ group of
        each op group (the padding takes the last group's).

    Raises:
        KernelError: no op group fits the layer's groups (``can_implement`` declines such layers up front).
    """
    K = layer.in_features
    t = op_group(layer.group_size, K, order.g_idx)
    if t is None:
        raise KernelError(f"{kernel}: the groups of this layer (group_size={layer.group_size}) cannot be split into "
                          f"runs of {OP_GROUPS} channels; disable it with GPTQ_PLUGIN_DISABLED_KERNELS={kernel}")
    Kp = (K + t - 1) // t * t
    first = torch.arange(0, Kp, t)  # first channel of each op group
    return t, Kp, order.g_idx[first.clamp(max=K - 1)]


def pack_int4_codes(codes: torch.Tensor, Kp: int) -> torch.Tensor:
    """The op's packed weight from int codes ``[K, N]`` in ``[0, 16)``, ``K`` zero-padded to ``Kp`` with code 8
    (padded channels decode to ``zero`` and meet ``x = 0``). Returns uint8 ``[N, Kp / 2]``."""
    codes = F.pad(codes.to(torch.int32), (0, 0, 0, Kp - codes.shape[0]), value=OP_CENTRE)
    return torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.t().contiguous(), 1)


def pack_int4_for_cpu(layer, order: GroupOrder | None = None, dtype: torch.dtype = torch.float32
                      ) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    """Repack a 2-, 3- or 4-bit GPTQ layer for ``_weight_int4pack_mm_for_cpu`` (see the module docstring).

    Args:
        layer: a :class:`gptq_plugin.linear.QuantLinear` on CPU, ``bits <= 4``, ``N % 16 == 0``.
        order: its :class:`~gptq_plugin.kernels.layout.GroupOrder` (computed when None).
        dtype: the activation dtype the op will run in (``scale_and_zero`` is built in it).

    Returns:
        ``(w_packed, scale_and_zero, t, Kp)``: the op's uint8 ``[N, Kp / 2]`` weight, ``[Kp / t, N, 2]`` in
        ``dtype``, the op group ``t`` and padded ``K``. In fp32 the op's weight equals the reference's bit for bit.

    Raises:
        KernelError: ``bits > 4``, or no op group fits the layer's groups.
    """
    if layer.bits > 4:
        raise KernelError(f"cpu_int4 packs 2-, 3- and 4-bit layers, not bits={layer.bits}")
    order = order or group_order(layer.g_idx, layer.group_size)
    t, Kp, g = op_groups(layer, order, "cpu_int4")
    c = 2 ** (layer.bits - 1)
    w_packed = pack_int4_codes(unpack_codes(layer, order) + (OP_CENTRE - c), Kp)  # [K, N] group order
    zeros, scales = zeros_and_scales(layer)  # [G, N]
    s = scales[g].to(dtype).float()  # the scale the op will use
    zero = s * (c - zeros[g].float())  # exact in fp32: a scale times an integer of at most 4 bits
    return w_packed, torch.stack([s, zero], dim=-1).to(dtype).contiguous(), t, Kp


class Int4OpKernel(QuantKernel):
    """What ``cpu_int4`` and ``cpu_int8`` share: the checks of the int4 op's constraints and the choice of a path by
    the number of rows ``M`` of ``x`` (:meth:`path_for`):

    * ``"op"``: ``_weight_int4pack_mm_for_cpu`` (permute and pad ``x``, call the op, add the bias);
    * ``"gemv"``: the compiled GEMV of :mod:`~gptq_plugin.kernels.cpu_native` (8-bit decode);
    * ``"tiles"``: the compiled dequantizer feeding bf16 GEMMs tile by tile (prefill);
    * ``"chunked"``: the dense bf16 GEMM of :class:`~gptq_plugin.kernels.dequant_chunked.ChunkedWeight`, the
      prefill path when the compiled helpers are unavailable (no C compiler, or ``GPTQ_PLUGIN_CPU_NATIVE=0``).

    Subclasses set ``bits_ok`` and the crossovers, and implement :meth:`pack` (and :meth:`op_input` when they feed
    the op more than ``x``). The crossovers are measured on the benchmark machine (docs/kernels.md)."""

    bits_ok: ClassVar[tuple[int, ...]] = ()
    chunked_above_m: ClassVar[int] = CHUNKED_ABOVE_M  # without the compiled helpers: op up to here, then chunked
    tiles_above_m: ClassVar[int] = TILES_ABOVE_M  # with them: the small-M path up to here, then tiles
    gemv_max_m: ClassVar[int] = 0  # with them: the compiled GEMV for M <= this (0: never), else the op

    @classmethod
    def bits_reason(cls, bits: int) -> str:
        """Why ``bits`` is not this kernel's (names the kernel that takes it)."""
        raise NotImplementedError

    @classmethod
    def can_implement(cls, spec: LayerSpec) -> tuple[bool, str | None]:
        if spec.device != "cpu":
            return False, f"device {spec.device!r} is not cpu"
        if not ops_available():
            return False, f"torch {torch.__version__} has no aten._weight_int4pack_mm_for_cpu (needs torch >= 2.6)"
        if spec.bits not in cls.bits_ok:
            return False, cls.bits_reason(spec.bits)
        if spec.out_features % 16:
            return False, f"out_features={spec.out_features} is not a multiple of 16 (the op's packing)"
        if op_group(spec.group_size, spec.in_features) is None:
            return False, f"group_size={spec.group_size} is not -1 or a multiple of 32 (op groups are {OP_GROUPS})"
        if not any(spec.group_align % t == 0 for t in OP_GROUPS):
            return False, (f"group boundaries fall on multiples of {spec.group_align} channels only (groups of unequal "
                           f"lengths, e.g. a tensor-parallel shard): no run of {OP_GROUPS} channels stays in one group")
        if spec.dtype != torch.bfloat16:
            return False, (f"activation dtype {spec.dtype}: the op is only fast for bf16 (its fp16/fp32 paths are "
                           "slower than dequantize-and-matmul); run the model in bf16")
        return True, None

    def __init__(self, layer):
        super().__init__(layer)
        self.order = group_order(layer.g_idx, layer.group_size)
        self.perm = self.order.perm
        self.lib = library()  # None: pure-torch paths only
        self._op: tuple[torch.Tensor, torch.Tensor, int, int] | None = None
        self._native: NativeWeight | None = None
        self._chunked: ChunkedWeight | None = None
        if self.path_for(1) == "op":
            self._op = self.pack(layer, self.order, torch.bfloat16)
        else:  # the compiled helpers run every M: one copy of the codes, theirs
            self._native = NativeWeight(layer, self.order, self.lib)

    def path_for(self, M: int) -> str:
        """The path that runs ``M`` rows: "op", "gemv", "tiles" or "chunked" (class docstring)."""
        if self.lib is None:
            return "chunked" if M > self.chunked_above_m else "op"
        if M > self.tiles_above_m:
            return "tiles"
        return "gemv" if M <= self.gemv_max_m else "op"

    def pack(self, layer, order: GroupOrder, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, int, int]:
        """``(w_packed, scale_and_zero, t, Kp)`` for the op (see :func:`pack_int4_for_cpu`)."""
        raise NotImplementedError

    def op_input(self, x2: torch.Tensor) -> torch.Tensor:
        """The op's activations from ``x2`` ``[M, Kp]`` (group order, padded)."""
        return x2

    @property
    def w_packed(self) -> torch.Tensor:
        """The op's packed weight (packed on first use when the compiled helpers run every ``M``)."""
        return self._op_pack()[0]

    def _op_pack(self) -> tuple[torch.Tensor, torch.Tensor, int, int]:
        if self._op is None:
            self._op = self.pack(self.layer, self.order, torch.bfloat16)
        return self._op

    def native(self) -> NativeWeight:
        """The layer in the compiled helpers' layout (built on first use).

        Raises:
            KernelError: the compiled helpers are unavailable (:func:`~gptq_plugin.kernels.cpu_native.library`).
        """
        if self.lib is None:
            raise KernelError(f"{self.name}: the compiled CPU helpers are unavailable: "
                              f"{unavailable_reason()}")
        if self._native is None:
            self._native = NativeWeight(self.layer, self.order, self.lib)
        return self._native

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` bf16 ``[..., K]`` -> bf16 ``[..., N]``."""
        layer = self.layer
        x2 = x.reshape(-1, x.shape[-1])
        path = self.path_for(x2.shape[0])
        if path == "tiles":
            y = self.native().matmul_tiles(x2, layer.bias)
        elif path == "gemv":
            y = self.native().gemv(x2, layer.bias)
        elif path == "chunked":
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
        w_packed, scale_and_zero, t, Kp = self._op_pack()
        if self.perm is not None:
            x2 = x2.index_select(1, self.perm)
        if Kp != x2.shape[1]:
            x2 = F.pad(x2, (0, Kp - x2.shape[1]))
        return torch.ops.aten._weight_int4pack_mm_for_cpu(self.op_input(x2).contiguous(), w_packed, t,
                                                          scale_and_zero)


class CpuInt4Kernel(Int4OpKernel):
    """2-, 3- and 4-bit GPTQ on CPU through ``_weight_int4pack_mm_for_cpu`` (bf16 activations, fp32 accumulation);
    the codes are held 4 bits per weight."""

    name = "cpu_int4"
    priority = 50
    bits_ok = (2, 3, 4)

    @classmethod
    def bits_reason(cls, bits: int) -> str:
        return f"bits={bits}: the int4 op takes codes below 16 (2-, 3- and 4-bit layers; 8-bit ones are cpu_int8's)"

    def pack(self, layer, order, dtype):
        return pack_int4_for_cpu(layer, order, dtype)
