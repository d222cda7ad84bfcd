"""Chunked dequantize-and-matmul: runs every layer on every device, never holding a whole fp32 weight.

At load, the codes are re-laid out in chunks of ``kc`` input channels (whole groups, in group order), each chunk
as byte planes that unpack with one shift and one mask per code position (:func:`pack_chunk`; same memory as
GPTQ's packing). At run time each chunk is unpacked, dequantized in fp32 (``code * scale - zero * scale``,
exactly the reference's value) and multiplied into an fp32 accumulator: ``y += x[:, chunk] @ W[chunk]``. For
bf16 activations and larger ``M`` the loop runs over blocks of output columns instead, each one bf16 GEMM over
all of ``K`` with the weight split into two bf16 halves (:meth:`ChunkedWeight._matmul_bf16`). Only one chunk or
block of fp32 weight (about :data:`CHUNK_ELEMS` elements) exists at a time.

It is the fallback for the layers the faster kernels do not take (2/3/8-bit, odd group sizes, odd ``N``, fp32
activations on CPU) and the large-``M`` path of ``cpu_int4``.
"""

from __future__ import annotations

import threading

import torch

from .base import LayerSpec, QuantKernel
from .layout import group_order, plane_bits, unpack_codes, zeros_and_scales

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
CHUNK_ELEMS = 1 << 20  # fp32 weight elements per chunk (4 MiB)
FP32_MATMUL_MAX_M = 16  # small M: fp32 GEMV (exact products); above, bf16 activations use bf16 GEMMs


def pack_chunk(codes: torch.Tensor, bits: int) -> list[torch.Tensor]:
    """Byte planes of one chunk of codes.

    Args:
        codes: int ``[kc, N]`` with values in ``[0, 2**bits)``.

    Returns:
        For each width ``w`` of :func:`~gptq_plugin.kernels.layout.plane_bits` (low bits first), uint8
        ``[kc8 * w / 8, N]`` with ``kc8 = ceil(kc / 8) * 8``: byte row ``j`` holds, at bit ``i * w``, the ``w`` bits
        of code row ``i * kc8 * w / 8 + j``.
    """
    kc, N = codes.shape
    kc8 = (kc + 7) // 8 * 8
    c = torch.zeros(kc8, N, dtype=torch.int32, device=codes.device)
    c[:kc] = codes
    planes, shift = [], 0
    for w in plane_bits(bits):
        per, rows = 8 // w, kc8 * w // 8
        part = (c >> shift) & ((1 << w) - 1)
        plane = torch.zeros(rows, N, dtype=torch.int32, device=codes.device)
        for i in range(per):
            plane |= part[i * rows:(i + 1) * rows] << (i * w)
        planes.append(plane.to(torch.uint8).contiguous())
        shift += w
    return planes


def unpack_chunk(planes: list[torch.Tensor], bits: int, out: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_chunk` into ``out`` uint8 ``[kc8, N]`` (for 8 bits: the plane itself)."""
    if bits == 8:
        return planes[0]
    shift = 0
    for n, (plane, w) in enumerate(zip(planes, plane_bits(bits))):
        per, rows, mask = 8 // w, plane.shape[0], (1 << w) - 1
        tmp = None if n == 0 else torch.empty_like(plane)
        for i in range(per):
            dst = out[i * rows:(i + 1) * rows] if n == 0 else tmp
            torch.bitwise_right_shift(plane, i * w, out=dst)  # uint8: a logical shift
            if i < per - 1:
                dst &= mask
            if n:
                out[i * rows:(i + 1) * rows] |= tmp << shift
        shift += w
    return out


_local = threading.local()


def _workspace(nbytes: int, device: torch.device) -> torch.Tensor:
    """A uint8 scratch buffer reused across calls and layers (per thread and device): fresh large allocations
    cost a page fault per 4 KiB on first touch, more than the arithmetic on them."""
    cache = _local.__dict__.setdefault("buffers", {})
    buf = cache.get(device)
    if buf is None or buf.numel() < nbytes:
        buf = cache[device] = torch.empty(nbytes, dtype=torch.uint8, device=device)
    return buf


class ChunkedWeight:
    """A layer's weight laid out for chunked dequantization.

    Args:
        layer: a :class:`gptq_plugin.linear.QuantLinear`.

    Attributes:
        perm: int64 ``[K]`` input permutation (act-order) or None. bounds: ``(k0, k1)`` channel range of each chunk.
        chunks: the byte planes of each chunk. scales, nzs: fp32 ``[G, N]`` (``nzs = -zero * scale``).
    """

    def __init__(self, layer):
        self.K, self.N, self.bits = layer.in_features, layer.out_features, layer.bits
        order = group_order(layer.g_idx, layer.group_size)
        device = layer.qweight.device
        self.perm = None if order.perm is None else order.perm.to(device)
        self.group_size = order.group_size  # None: unequal groups
        self.g_idx = order.g_idx.to(device)
        gs = self.group_size
        align = 8 if gs is None or gs >= self.K else gs  # chunks of whole groups
        kc = max(align, CHUNK_ELEMS // max(self.N, 1) // align * align)
        codes = unpack_codes(layer, order)  # int32 [K, N], group order; freed after packing
        self.bounds = [(k0, min(k0 + kc, self.K)) for k0 in range(0, self.K, kc)]
        self.chunks = [pack_chunk(codes[k0:k1], self.bits) for k0, k1 in self.bounds]
        zeros, scales = zeros_and_scales(layer)
        self.scales = scales
        self.nzs = -zeros.float() * scales  # exact in fp32: an 11-bit mantissa times an integer below 256

    def dequantize(self, c: int, n0: int = 0, n1: int | None = None, out: torch.Tensor | None = None,
                   scratch: torch.Tensor | None = None) -> torch.Tensor:
        """fp32 ``[k1 - k0, n1 - n0]``: rows ``k0:k1`` (chunk ``c``, group order), columns ``n0:n1`` of
        ``dequant(W)ᵀ``, bit-equal to the reference's (``code * s + (-zero * s)``: both terms and the sum are
        exact in fp32).

        Args:
            out: fp32 ``[k1 - k0, n1 - n0]`` to write into. scratch: uint8 ``[ceil((k1 - k0) / 8) * 8, n1 - n0]``
                for the codes. Both are allocated when None.
        """
        k0, k1 = self.bounds[c]
        n1 = self.N if n1 is None else n1
        kc, nc = k1 - k0, n1 - n0
        if scratch is None:
            scratch = torch.empty((kc + 7) // 8 * 8, nc, dtype=torch.uint8, device=self.scales.device)
        planes = [p[:, n0:n1] for p in self.chunks[c]]
        codes = unpack_chunk(planes, self.bits, scratch)[:kc]
        w = out if out is not None else torch.empty(kc, nc, device=codes.device)
        w.copy_(codes)
        s, nzs, gs = self.scales[:, n0:n1], self.nzs[:, n0:n1], self.group_size
        if gs is None:  # unequal groups: one scale row per channel
            g = self.g_idx[k0:k1]
            return torch.addcmul(nzs.index_select(0, g), w, s.index_select(0, g), out=w)
        if gs >= self.K:  # one group
            return torch.addcmul(nzs[0], w, s[0], out=w)
        g0, n = k0 // gs, kc // gs  # chunks start on a group boundary
        if n:
            wv = w[:n * gs].view(n, gs, nc)
            torch.addcmul(nzs[g0:g0 + n, None], wv, s[g0:g0 + n, None], out=wv)
        if n * gs != kc:  # the layer's partial last group
            torch.addcmul(nzs[g0 + n], w[n * gs:], s[g0 + n], out=w[n * gs:])
        return w

    def matmul(self, x2: torch.Tensor, bias: torch.Tensor | None, out: torch.Tensor | None = None) -> torch.Tensor:
        """``x2 @ dequant(W)ᵀ + bias``.

        Args:
            x2: ``[M, K]`` fp16/bf16/fp32 in input order (permuted here). bias: ``[N]`` or None.
            out: ``[M, N]`` in ``x2.dtype`` to write into (allocated when None; every element is written).

        Returns:
            ``[M, N]`` in ``x2.dtype``. Products and accumulation are fp32 (chunk by chunk of ``K``), except for
            bf16 activations with ``M >`` :data:`FP32_MATMUL_MAX_M`: see :meth:`_matmul_bf16`.
        """
        if self.perm is not None:
            x2 = x2.index_select(1, self.perm)
        M = x2.shape[0]
        if not self.bounds:  # K == 0
            acc = torch.zeros(M, self.N, device=x2.device)
            return self._finish(acc if bias is None else acc + bias.float(), x2.dtype, out)
        if x2.dtype == torch.bfloat16 and M > FP32_MATMUL_MAX_M:
            return self._matmul_bf16(x2, bias, out)
        xs = x2.float()
        kmax = max(k1 - k0 for k0, k1 in self.bounds)
        n32, n8 = kmax * self.N * 4, (kmax + 7) // 8 * 8 * self.N
        ws = _workspace(n32 + n8, x2.device)  # fp32 chunk | uint8 codes
        wbuf, scratch = ws[:n32].view(torch.float32), ws[n32:n32 + n8]
        b32 = None if bias is None else bias.float()
        acc = None
        for c, (k0, k1) in enumerate(self.bounds):
            kc = k1 - k0
            w = self.dequantize(c, out=wbuf[:kc * self.N].view(kc, self.N),
                                scratch=scratch[:(kc + 7) // 8 * 8 * self.N].view(-1, self.N))
            xc = xs[:, k0:k1]
            if acc is None:  # the first chunk's GEMM adds the bias
                acc = torch.mm(xc, w) if b32 is None else torch.addmm(b32, xc, w)
                b32 = None
            else:
                acc.addmm_(xc, w)
        return self._finish(acc, x2.dtype, out)

    def _matmul_bf16(self, x2: torch.Tensor, bias: torch.Tensor | None, out: torch.Tensor | None) -> torch.Tensor:
        """bf16 ``x2 [M, K] @ W + bias`` for larger ``M``, by blocks of output columns: each block is ONE bf16 GEMM
        over all of ``K`` (fp32 accumulation inside) of ``[x, x, 1, 1]`` with ``[hi; lo; bias_hi; bias_lo]``, where
        ``hi + lo`` is the fp32 weight to 16 significant bits. The output is rounded once, like the reference's."""
        M, K, N = x2.shape[0], self.K, self.N
        nc = min(N, max(16, CHUNK_ELEMS // K // 16 * 16))
        kmax = max(k1 - k0 for k0, k1 in self.bounds)
        n32, n16, n8 = K * nc * 4, (2 * K + 2) * nc * 2, (kmax + 7) // 8 * 8 * nc
        ws = _workspace(n32 + n16 + n8, x2.device)  # fp32 block | bf16 hi/lo block | uint8 codes
        wbuf = ws[:n32].view(torch.float32)
        wb = ws[n32:n32 + n16].view(torch.bfloat16)
        scratch = ws[n32 + n16:n32 + n16 + n8]
        ones = x2.new_ones(M, 2) if bias is not None else x2.new_zeros(M, 2)
        xcat = torch.cat([x2, x2, ones], 1)  # [M, 2K + 2]
        y = out if out is not None else x2.new_empty(M, N)
        for n0 in range(0, N, nc):
            n1 = min(n0 + nc, N)
            w = wbuf[:K * (n1 - n0)].view(K, n1 - n0)
            b = wb[:(2 * K + 2) * (n1 - n0)].view(2 * K + 2, n1 - n0)
            for c, (k0, k1) in enumerate(self.bounds):
                kc8 = (k1 - k0 + 7) // 8 * 8
                self.dequantize(c, n0, n1, out=w[k0:k1], scratch=scratch[:kc8 * (n1 - n0)].view(kc8, n1 - n0))
            b[:K].copy_(w)  # hi
            b[K:2 * K].copy_(w.sub_(b[:K]))  # lo = w - hi, exact in fp32
            if bias is not None:
                b32 = bias[n0:n1].float()
                b[2 * K].copy_(b32)
                b[2 * K + 1].copy_(b32 - b[2 * K].float())
            else:
                b[2 * K:].zero_()
            if n1 - n0 == N and y.is_contiguous():
                torch.mm(xcat, b, out=y)
            else:
                y[:, n0:n1] = xcat @ b
        return y

    @staticmethod
    def _finish(acc: torch.Tensor, dtype: torch.dtype, out: torch.Tensor | None) -> torch.Tensor:
        return acc.to(dtype) if out is None else out.copy_(acc)


class DequantChunkedKernel(QuantKernel):
    """Pure torch, any device, every bit width, group size and act-order; faster than the reference because it
    reads compact chunks and never materialises (or gathers) a whole fp32 weight."""

    name = "dequant_chunked"
    priority = 10

    @classmethod
    def can_implement(cls, spec: LayerSpec) -> tuple[bool, str | None]:
        if spec.dtype not in _DTYPES:
            return False, f"activation dtype {spec.dtype} is not fp16, bf16 or fp32"
        return True, None

    def __init__(self, layer):
        super().__init__(layer)
        self.weight = ChunkedWeight(layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` ``[..., K]`` -> ``[..., N]`` in ``x.dtype``."""
        y = self.weight.matmul(x.reshape(-1, x.shape[-1]), self.layer.bias)
        return y.view(*x.shape[:-1], y.shape[-1])
