"""The pure-torch kernels against the reference: dequant_chunked (everything) and cpu_int4 (4-bit, bf16)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from gptq_plugin.kernels.cpu_int4 import CpuInt4Kernel, pack_int4_for_cpu
from gptq_plugin.kernels import dequant_chunked
from gptq_plugin.kernels.dequant_chunked import ChunkedWeight, DequantChunkedKernel, pack_chunk, unpack_chunk
from gptq_plugin.kernels.layout import group_order
from gptq_plugin.kernels.reference import ReferenceKernel, dequantize_weight, gemm
from kernel_harness import (BITS, GROUP_SIZES, RTOL, SHAPES, KernelTests, grid, make_input, make_layer, poisoned,
                            reference, rel_err)


def _unpack_bitstream(words: torch.Tensor, bits: int, count: int) -> list[int]:
    """The first ``count`` ``bits``-wide fields of one column of int32 words read as a little-endian bit stream
    (word 0's low bit first): the GPTQ packing written out with Python integers, independently of
    :mod:`gptq_plugin.packing`."""
    stream = 0
    for i, w in enumerate(words.tolist()):
        stream |= (w & 0xFFFFFFFF) << (32 * i)
    return [(stream >> (bits * j)) & ((1 << bits) - 1) for j in range(count)]


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("group_size", [-1, 32, 100])
@pytest.mark.parametrize("act_order", [False, True])
def test_reference_matches_scalar_definition(bits, group_size, act_order):
    """The reference kernel against the format's definition evaluated element by element in float64 from the
    packed words (``W[n, k] = scales[g_idx[k], n] * (code[k, n] - (qzeros_field + 1) % 2**bits)``, v1 zeros)."""
    K, N, M = 67, 11, 3
    layer = make_layer(K, N, bits, group_size, act_order)
    x = make_input(M, K, torch.float32)
    W = torch.empty(N, K, dtype=torch.float64)
    G = layer.scales.shape[0]
    zeros = [_unpack_bitstream(layer.qzeros[g], bits, N) for g in range(G)]
    for n in range(N):
        codes = _unpack_bitstream(layer.qweight[:, n], bits, K)
        for k in range(K):
            g = int(layer.g_idx[k])
            W[n, k] = float(layer.scales[g, n]) * (codes[k] - (zeros[g][n] + 1) % (1 << bits))
    want = x.double() @ W.t() + layer.bias.double()
    got = ReferenceKernel(layer).forward(x)
    assert rel_err(got, want) <= 1e-6
    assert torch.equal(dequantize_weight(layer.qweight, layer.qzeros, layer.scales, layer.g_idx, bits, K),
                       W.float())


@pytest.fixture
def small_chunks(monkeypatch):
    """A few hundred weight elements per chunk: many chunks, a partial last one, chunks of one group."""
    monkeypatch.setattr(dequant_chunked, "CHUNK_ELEMS", 300)


@pytest.mark.usefixtures("small_chunks")
class TestDequantChunked(KernelTests):
    kernel_cls = DequantChunkedKernel

    @classmethod
    def cases(cls):
        return grid(SHAPES, dtypes=(torch.float16, torch.bfloat16, torch.float32))

    def compute(self, kernel, x):
        out = poisoned((x.shape[0], kernel.weight.N), x.dtype, x.device)
        return kernel.weight.matmul(x, kernel.layer.bias, out=out)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("group_size", GROUP_SIZES)
@pytest.mark.parametrize("act_order", [False, True])
def test_chunked_dequantize_is_exact(bits, group_size, act_order, small_chunks):
    """The chunks, stacked, equal the reference's fp32 weight bit for bit (in group order)."""
    layer = make_layer(257, 37, bits, group_size, act_order)
    w = ChunkedWeight(layer)
    assert len(w.bounds) > 2
    ref = dequantize_weight(layer.qweight, layer.qzeros, layer.scales, layer.g_idx, bits, 257).t()  # [K, N]
    if w.perm is not None:
        ref = ref[w.perm]
    assert torch.equal(torch.cat([w.dequantize(c) for c in range(len(w.bounds))]), ref)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("kc", [1, 7, 8, 13, 64])
def test_chunk_planes_round_trip(bits, kc):
    codes = torch.randint(0, 2**bits, (kc, 5))
    planes = pack_chunk(codes, bits)
    assert sum(p.numel() for p in planes) == (kc + 7) // 8 * bits * 5  # as compact as GPTQ's packing
    out = torch.empty((kc + 7) // 8 * 8, 5, dtype=torch.uint8)
    assert torch.equal(unpack_chunk(planes, bits, out)[:kc].long(), codes)


def test_chunked_unequal_groups(small_chunks):
    """A g_idx whose groups have unequal lengths (not produced by GPTQ, but legal) takes the gather path."""
    layer = make_layer(37, 13, 4, 8, act_order=False)
    layer.g_idx.copy_(torch.tensor([0] * 3 + [1] * 10 + [2] * 24, dtype=torch.int32)[torch.randperm(37)])
    kernel = DequantChunkedKernel(layer)
    assert kernel.weight.group_size is None
    x = make_input(5, 37, torch.float32)
    assert rel_err(kernel.forward(x), reference(layer, x)) <= RTOL[torch.float32]


def test_harness_rejects_off_by_one_zero():
    """The bounds catch a zero point off by one (v1 read as v2) at every bit width: these tests can fail."""
    for bits in BITS:
        layer = make_layer(257, 37, bits, 64, act_order=True)
        for dtype in (torch.float32, torch.float16):
            x = make_input(13, 257, dtype)
            wrong = gemm(x, layer.qweight, layer.qzeros, layer.scales, layer.g_idx, bits, layer.bias, "gptq_v2")
            assert rel_err(wrong, reference(layer, x)) > 2 * RTOL[dtype], (bits, dtype)


# --- cpu_int4 -------------------------------------------------------------------------------------------------
INT4_SHAPES = ((1, 257, 48), (13, 576, 16), (37, 37, 576), (1, 4096 // 8, 64))


class TestCpuInt4(KernelTests):
    kernel_cls = CpuInt4Kernel

    @classmethod
    def cases(cls):
        return grid(INT4_SHAPES, bits=(4,), group_sizes=(-1, 32, 64, 128, 96, 256), dtypes=(torch.bfloat16,))


@pytest.mark.parametrize("group_size", [-1, 32, 64, 128, 96, 512])
@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("K", [37, 257, 576])
def test_int4_repacking_is_exact(group_size, act_order, K):
    """The op, fed fp32 identity rows, returns the reference's dequantized weight exactly: the repacking
    (codes, op groups, ``zero = s * (8 - z)``, padding, act-order) loses nothing before the bf16 cast."""
    layer = make_layer(K, 32, 4, group_size, act_order)
    w_packed, sz, t, Kp = pack_int4_for_cpu(layer)
    w = torch.ops.aten._weight_int4pack_mm_for_cpu(torch.eye(Kp), w_packed, t, sz)[:K]  # [K, N], group order
    ref = dequantize_weight(layer.qweight, layer.qzeros, layer.scales, layer.g_idx, 4, K).t()
    perm = group_order(layer.g_idx, group_size).perm
    assert torch.equal(w, ref if perm is None else ref[perm])


def test_int4_large_m_uses_chunked_path():
    """Above CHUNKED_ABOVE_M rows the kernel switches to the dense bf16 GEMM; both paths agree with the reference."""
    from gptq_plugin.kernels import cpu_int4

    layer = make_layer(256, 48, 4, 128, act_order=True)
    kernel = CpuInt4Kernel(layer)
    for M in (cpu_int4.CHUNKED_ABOVE_M, cpu_int4.CHUNKED_ABOVE_M + 1):
        x = make_input(M, 256, torch.bfloat16)
        assert rel_err(kernel.forward(x), reference(layer, x)) <= RTOL[torch.bfloat16]
    assert kernel._chunked is not None


@pytest.mark.parametrize("change,needle", [
    (dict(bits=3), "bits=3"), (dict(out_features=40), "multiple of 16"), (dict(group_size=100), "group_size=100"),
    (dict(dtype=torch.float16), "bf16"), (dict(dtype=torch.float32), "bf16"), (dict(device="cuda"), "cpu"),
])
def test_int4_can_implement_reasons(change, needle):
    spec = dataclasses.replace(make_layer(256, 48, 4, 128, False).spec(torch.bfloat16), **change)
    ok, reason = CpuInt4Kernel.can_implement(spec)
    assert not ok and needle in reason
    assert CpuInt4Kernel.can_implement(make_layer(256, 48, 4, 128, False).spec(torch.bfloat16)) == (True, None)
