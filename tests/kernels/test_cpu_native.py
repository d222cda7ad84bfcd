"""The compiled CPU helpers (kernels/cpu_native.py) against the reference, in both builds of their C code: the
AVX-512 BF16 path (when this CPU has it) and the portable path (``-DGP_PORTABLE``)."""

from __future__ import annotations

import pytest
import torch

from gptq_plugin.errors import KernelError
from gptq_plugin.kernels import cpu_native
from gptq_plugin.kernels.layout import group_order
from gptq_plugin.kernels.reference import dequantize_weight
from kernel_harness import RTOL, make_input, make_layer, reference, rel_err

BUILDS = {"native": (), "portable": ("-DGP_PORTABLE",)}


@pytest.fixture(params=list(BUILDS), scope="module")
def lib(request):
    lib = cpu_native.library(BUILDS[request.param])
    if lib is None:
        pytest.skip(f"compiled CPU helpers unavailable: {cpu_native.unavailable_reason(BUILDS[request.param])}")
    if request.param == "native" and not lib.gp_has_avx512():
        pytest.skip("this CPU has no AVX-512 BF16: the native build is the portable one")
    return lib


def _weight(layer, bits, K):
    """The reference's fp32 weight ``[N, K]``, input channels in group order."""
    W = dequantize_weight(layer.qweight, layer.qzeros, layer.scales, layer.g_idx, bits, K)
    perm = group_order(layer.g_idx, layer.group_size).perm
    return W if perm is None else W[:, perm]


@pytest.mark.parametrize("bits", (2, 3, 4, 8))
@pytest.mark.parametrize("group_size", (-1, 32, 128, 96))
@pytest.mark.parametrize("act_order", (False, True))
@pytest.mark.parametrize("sym", (False, True))
@pytest.mark.parametrize("K,N", [(37, 16), (289, 48), (1001, 40)])
def test_dequantize_rows_is_the_reference_weight_in_bf16(lib, bits, group_size, act_order, sym, K, N):
    """Every element of a dequantized tile is the reference's fp32 weight rounded to bf16 (nearest even), bit for
    bit; the padded channels are finite. Any error in a code, zero point, scale or group fails it."""
    layer = make_layer(K, N, bits, group_size, act_order, sym=sym)
    w = cpu_native.NativeWeight(layer, group_order(layer.g_idx, group_size), lib)
    assert w.Kp % 32 == 0 and w.Kp - K < 32
    out = torch.full((N - 3, w.Kp), float("nan"), dtype=torch.bfloat16)
    got = w.dequantize_rows(3, N, out)
    assert torch.equal(got[:, :K], _weight(layer, bits, K)[3:].bfloat16())
    assert torch.isfinite(got).all()


@pytest.mark.parametrize("bits", (2, 3, 4, 8))
@pytest.mark.parametrize("group_size,act_order", [(-1, False), (32, True), (128, False), (64, True), (96, True)])
@pytest.mark.parametrize("M,K,N", [(1, 289, 48), (3, 37, 16), (4, 1001, 64), (9, 577, 32), (45, 129, 48)])
def test_gemv_and_tiles_match_reference(lib, bits, group_size, act_order, M, K, N, monkeypatch):
    """Both products agree with the reference, on M both sides of ``ROW_MAJOR_MAX_M`` (the tiles' two GEMM
    orientations), in tiles of a few output channels (many tiles per layer)."""
    assert 9 <= cpu_native.ROW_MAJOR_MAX_M < 45
    monkeypatch.setattr(cpu_native, "TILE_ELEMS", 16 * 1024)
    monkeypatch.setattr(cpu_native, "TILE_MIN_ROWS", 16)
    layer = make_layer(K, N, bits, group_size, act_order)
    w = cpu_native.NativeWeight(layer, group_order(layer.g_idx, group_size), lib)
    x = make_input(M, K, torch.bfloat16)
    ref = reference(layer, x)
    for y in (w.gemv(x, layer.bias), w.matmul_tiles(x, layer.bias)):
        assert y.shape == (M, N) and y.dtype == torch.bfloat16 and y.is_contiguous()
        assert rel_err(y, ref) <= RTOL[torch.bfloat16] / 2


@pytest.mark.parametrize("bits", (4, 8))
def test_tiles_partial_last_tile_and_no_bias(lib, bits, monkeypatch):
    """``N`` not a multiple of the tile (40 rows in tiles of 16), no bias."""
    monkeypatch.setattr(cpu_native, "TILE_ELEMS", 16 * 320)
    monkeypatch.setattr(cpu_native, "TILE_MIN_ROWS", 16)
    layer = make_layer(300, 40, bits, 32, True, bias=False)
    w = cpu_native.NativeWeight(layer, group_order(layer.g_idx, 32), lib)
    assert w.tile_n == 16
    x = make_input(21, 300, torch.bfloat16)
    assert rel_err(w.matmul_tiles(x, None), reference(layer, x)) <= RTOL[torch.bfloat16] / 2


@pytest.mark.parametrize("bits", (3, 8))
def test_products_tell_an_off_by_one_zero(lib, bits):
    """The bound used above (half the harness's bf16 bound) is passed by the helpers and failed by the reference
    with every zero point off by one: the product tests can fail."""
    K, N = 1024, 64
    layer = make_layer(K, N, bits, 128, act_order=True)
    w = cpu_native.NativeWeight(layer, group_order(layer.g_idx, 128), lib)
    x = make_input(16, K, torch.bfloat16)
    W = dequantize_weight(layer.qweight, layer.qzeros, layer.scales, layer.g_idx, bits, K)
    wrong = (x.float() @ (W + layer.scales.float()[layer.g_idx.long()].t()).t() + layer.bias.float()).bfloat16()
    for y in (w.gemv(x, layer.bias), w.matmul_tiles(x, layer.bias)):
        assert rel_err(y, reference(layer, x)) <= RTOL[torch.bfloat16] / 2
        assert rel_err(y, wrong) > RTOL[torch.bfloat16] / 2


def test_native_weight_rejects_what_it_cannot_run(lib):
    layer = make_layer(96, 16, 4, 48, False)  # groups of 48: runs of 32 channels cross a group boundary
    with pytest.raises(KernelError, match="runs of 32"):
        cpu_native.NativeWeight(layer, group_order(layer.g_idx, 48), lib)
    w = cpu_native.NativeWeight(make_layer(64, 16, 4, 32, False), group_order(torch.arange(64) // 32, 32), lib)
    with pytest.raises(ValueError, match="bf16"):
        w.dequantize_rows(0, 16, torch.empty(16, 64))
    with pytest.raises(ValueError, match="outside"):
        w.dequantize_rows(8, 24, torch.empty(16, 64, dtype=torch.bfloat16))


def test_library_disabled_or_unbuildable(monkeypatch, tmp_path):
    """``GPTQ_PLUGIN_CPU_NATIVE=0`` or a failing compiler give None and a reason, never an exception."""
    monkeypatch.setenv(cpu_native.ENV_NATIVE, "0")
    assert cpu_native.library(("-DGP_TEST_DISABLED",)) is None
    assert "GPTQ_PLUGIN_CPU_NATIVE" in cpu_native.unavailable_reason(("-DGP_TEST_DISABLED",))
    monkeypatch.delenv(cpu_native.ENV_NATIVE)
    monkeypatch.setenv(cpu_native.ENV_CACHE, str(tmp_path))
    monkeypatch.setenv("CC", "false")  # a "compiler" that always fails
    flags = ("-DGP_TEST_BROKEN_CC",)
    assert cpu_native.library(flags) is None
    assert "failed" in cpu_native.unavailable_reason(flags)


def test_library_is_built_once_into_the_cache(monkeypatch, tmp_path):
    monkeypatch.setenv(cpu_native.ENV_CACHE, str(tmp_path))
    flags = ("-DGP_TEST_CACHE",)
    lib = cpu_native.library(flags)
    if lib is None:
        pytest.skip(f"no C compiler: {cpu_native.unavailable_reason(flags)}")
    assert cpu_native.library(flags) is lib
    assert len(list((tmp_path / "cpu_native").glob("*.so"))) == 1
