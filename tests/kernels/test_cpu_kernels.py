"""The CPU kernels against the reference: dequant_chunked (everything), cpu_int4 (2/3/4-bit, bf16) and cpu_int8
(8-bit, bf16), each path they choose by M (the compiled helpers' own tests: test_cpu_native.py)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from gptq_plugin.kernels import cpu_int4, cpu_int8, cpu_native
from gptq_plugin.kernels.cpu_int4 import CpuInt4Kernel, pack_int4_for_cpu
from gptq_plugin.kernels.cpu_int8 import CpuInt8Kernel, pack_int8_planes_for_cpu
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


# --- the int4 op: cpu_int4 (2/3/4-bit) and cpu_int8 (8-bit as two 4-bit planes) ----------------------------------
# M = 1, 7, 128, 129: with the compiled helpers cpu_int4 runs the op, then tiles (both GEMM orientations), cpu_int8
# its GEMV, then tiles; without them the op, and cpu_int8 the chunked path at 128/129. Every crossover's two sides:
# test_int4_op_paths_on_both_sides_of_each_crossover. Odd K (37: one partial group of 32), N % 16 == 0
INT4OP_SHAPES = ((1, 257, 48), (7, 575, 16), (128, 37, 576), (129, 513, 32), (1, 1001, 64))
INT4OP_GROUP_SIZES = (-1, 32, 64, 128, 96, 256)  # with the odd K above, every group size meets a partial last group


class TestCpuInt4(KernelTests):
    kernel_cls = CpuInt4Kernel

    @classmethod
    def cases(cls):
        return grid(INT4OP_SHAPES, bits=(2, 3, 4), group_sizes=INT4OP_GROUP_SIZES, dtypes=(torch.bfloat16,),
                    syms=(False, True))


class TestCpuInt8(KernelTests):
    kernel_cls = CpuInt8Kernel

    @classmethod
    def cases(cls):
        return grid(INT4OP_SHAPES, bits=(8,), group_sizes=INT4OP_GROUP_SIZES, dtypes=(torch.bfloat16,),
                    syms=(False, True))


@pytest.fixture
def without_compiled_helpers(monkeypatch):
    """The kernels as on a machine without a C compiler: the int4 op and the chunked path only."""
    monkeypatch.setenv(cpu_native.ENV_NATIVE, "0")


@pytest.mark.usefixtures("without_compiled_helpers")
class TestCpuInt4WithoutCompiledHelpers(TestCpuInt4):
    pass


@pytest.mark.usefixtures("without_compiled_helpers")
class TestCpuInt8WithoutCompiledHelpers(TestCpuInt8):
    pass


def _op_weight(layer) -> torch.Tensor:
    """The weight the int4 op computes with, fp32 ``[K, N]`` in group order: the op, with ``scale_and_zero`` in
    fp32, fed identity rows (8-bit: ``[I, I]``, one copy per plane)."""
    pack = pack_int4_for_cpu if layer.bits <= 4 else pack_int8_planes_for_cpu
    w_packed, sz, t, Kp = pack(layer)
    assert sz.dtype == torch.float32
    eye = torch.eye(Kp)
    if layer.bits == 8:
        eye = torch.cat([eye, eye], dim=1)
    return torch.ops.aten._weight_int4pack_mm_for_cpu(eye, w_packed, t, sz)[:layer.in_features]


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("group_size", [-1, 32, 64, 128, 96, 512])
@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("sym", [False, True])
@pytest.mark.parametrize("K", [37, 257, 576])
def test_int4_op_repacking_is_exact(bits, group_size, act_order, sym, K):
    """The op, fed fp32 identity rows, returns the reference's dequantized weight exactly: the repacking (codes
    re-centred or split into planes, op groups, zero points, padding, act-order) loses nothing before the bf16
    cast. Any error in a zero point (off by one, or by one scale of a plane) fails this bit-for-bit check."""
    layer = make_layer(K, 32, bits, group_size, act_order, sym=sym)
    ref = dequantize_weight(layer.qweight, layer.qzeros, layer.scales, layer.g_idx, bits, K).t()
    perm = group_order(layer.g_idx, group_size).perm
    assert torch.equal(_op_weight(layer), ref if perm is None else ref[perm])


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("sym", [False, True])
def test_int4_op_tells_an_off_by_one_zero(bits, sym):
    """In bf16 the kernels stay within a bound that a zero point off by one exceeds. 8-bit is the tight case: on
    codes spread over [0, 256) an off-by-one zero moves the output by ~1% only, inside the harness's bf16 bound
    (1e-2), so this test takes a bound of half that on a layer large enough for the error to be a stable mean."""
    K, N, M, bound = 1024, 256, 16, RTOL[torch.bfloat16] / 2
    layer = make_layer(K, N, bits, 128, act_order=True, sym=sym)
    kernel = (CpuInt8Kernel if bits == 8 else CpuInt4Kernel)(layer)
    x = make_input(M, K, torch.bfloat16)
    y = kernel.forward(x)
    W = dequantize_weight(layer.qweight, layer.qzeros, layer.scales, layer.g_idx, bits, K)  # [N, K]
    off_by_one = W + layer.scales.float()[layer.g_idx.long()].t()  # s * (q - (z - 1))
    for w, want_close in ((W, True), (off_by_one, False)):
        ref = (x.float() @ w.t() + layer.bias.float()).to(torch.bfloat16)
        err = rel_err(y, ref)
        assert (err <= bound) == want_close, (bits, sym, want_close, err)


def _crossover_cases():
    """(kernel, bits, native, M, path): M on both sides of every crossover of both kernels, with and without the
    compiled helpers."""
    out = []
    for cls, bits_list in ((CpuInt4Kernel, (2, 3, 4)), (CpuInt8Kernel, (8,))):
        for native in (True, False):
            if native:
                small = "gemv" if cls.gemv_max_m >= 1 else "op"
                edges = [(cls.tiles_above_m, "gemv" if cls.tiles_above_m <= cls.gemv_max_m else "op"),
                         (cls.tiles_above_m + 1, "tiles"), (1, small)]
                if cls.gemv_max_m:
                    edges += [(cls.gemv_max_m, "gemv"), (cls.gemv_max_m + 1, "op" if cls.gemv_max_m < cls.tiles_above_m
                                                          else "tiles")]
            else:
                edges = [(1, "op"), (cls.chunked_above_m, "op"), (cls.chunked_above_m + 1, "chunked")]
            for i, (M, path) in enumerate(edges):
                out.append((cls, bits_list[i % len(bits_list)], native, M, path))
    return out


@pytest.mark.parametrize("kernel_cls,bits,native,M,path", _crossover_cases(),
                         ids=lambda v: v.name if isinstance(v, type) else str(v))
@pytest.mark.parametrize("group_size,act_order", [(-1, False), (32, True), (128, True), (64, False)])
def test_int4_op_paths_on_both_sides_of_each_crossover(kernel_cls, bits, native, M, path, group_size, act_order,
                                                       monkeypatch):
    """Each path the kernels choose by M (op, compiled GEMV, compiled tiles, chunked) agrees with the reference on
    an odd K (a partial last group), at the crossover M and one above."""
    if native and cpu_native.library() is None:
        pytest.skip(f"compiled CPU helpers unavailable: {cpu_native.unavailable_reason()}")
    if not native:
        monkeypatch.setenv(cpu_native.ENV_NATIVE, "0")
    layer = make_layer(289, 48, bits, group_size, act_order)
    kernel = kernel_cls(layer)
    assert kernel.path_for(M) == path
    x = make_input(M, 289, torch.bfloat16)
    y = kernel.forward(x)
    assert y.shape == (M, 48) and torch.isfinite(y).all()
    assert rel_err(y, reference(layer, x)) <= RTOL[torch.bfloat16] / 2
    assert (kernel._chunked is not None) == (path == "chunked")


def test_int4_op_crossovers():
    assert CpuInt4Kernel.chunked_above_m == cpu_int4.CHUNKED_ABOVE_M
    assert CpuInt8Kernel.chunked_above_m == cpu_int8.CHUNKED_ABOVE_M
    assert CpuInt4Kernel.tiles_above_m == cpu_int4.TILES_ABOVE_M and CpuInt4Kernel.gemv_max_m == 0
    assert CpuInt8Kernel.tiles_above_m == cpu_int8.TILES_ABOVE_M
    assert CpuInt8Kernel.gemv_max_m == cpu_int8.GEMV_MAX_M


@pytest.mark.parametrize("kernel_cls,bits,change,needle", [
    (CpuInt4Kernel, 4, dict(bits=8), "cpu_int8"), (CpuInt8Kernel, 8, dict(bits=4), "cpu_int4"),
    (CpuInt8Kernel, 8, dict(bits=2), "bits=2"),
    (CpuInt4Kernel, 3, dict(out_features=40), "multiple of 16"), (CpuInt8Kernel, 8, dict(out_features=40), "16"),
    (CpuInt4Kernel, 2, dict(group_size=100), "group_size=100"), (CpuInt8Kernel, 8, dict(group_size=48), "48"),
    (CpuInt4Kernel, 4, dict(uniform_groups=False, group_align=48), "unequal"),
    (CpuInt8Kernel, 8, dict(uniform_groups=False, group_align=16), "unequal"),
    (CpuInt4Kernel, 3, dict(dtype=torch.float16), "bf16"), (CpuInt8Kernel, 8, dict(dtype=torch.float32), "bf16"),
    (CpuInt4Kernel, 4, dict(device="cuda"), "cpu"), (CpuInt8Kernel, 8, dict(device="cuda"), "cpu"),
])
def test_int4_op_can_implement_reasons(kernel_cls, bits, change, needle):
    spec = make_layer(256, 48, bits, 128, False).spec(torch.bfloat16)
    assert kernel_cls.can_implement(spec) == (True, None)
    ok, reason = kernel_cls.can_implement(dataclasses.replace(spec, **change))
    assert not ok and needle in reason, reason


@pytest.mark.parametrize("bits", (2, 3, 4))
def test_cpu_int4_runs_2_3_4_bit(bits):
    assert CpuInt4Kernel.can_implement(make_layer(64, 16, bits, -1, True).spec(torch.bfloat16)) == (True, None)


def test_int4_op_memory(monkeypatch):
    """Bytes per weight of the kernels' copies of the codes: the op's holds 4 bits for 2/3/4-bit layers and 8 for
    8-bit ones (two planes); the compiled helpers' holds as many. An 8-bit kernel with the helpers keeps theirs only
    (they run every M), a 4-bit one keeps the op's and builds theirs on the first batch above the crossover."""
    for bits, per_weight in ((2, 0.5), (3, 0.5), (4, 0.5), (8, 1)):
        monkeypatch.setenv(cpu_native.ENV_NATIVE, "0")
        kernel = (CpuInt8Kernel if bits == 8 else CpuInt4Kernel)(make_layer(256, 64, bits, 128, False))
        assert kernel._native is None
        assert kernel.w_packed.numel() * kernel.w_packed.element_size() == 256 * 64 * per_weight
        monkeypatch.delenv(cpu_native.ENV_NATIVE)
        if cpu_native.library() is None:
            continue
        kernel = (CpuInt8Kernel if bits == 8 else CpuInt4Kernel)(make_layer(256, 64, bits, 128, False))
        assert (kernel._op is None) == (bits == 8) and (kernel._native is None) == (bits != 8)
        kernel.forward(make_input(kernel.tiles_above_m + 1, 256, torch.bfloat16))
        packed = kernel._native.packed
        assert packed.numel() * packed.element_size() == 256 * 64 * per_weight
        assert (kernel._op is None) == (bits == 8)
