"""The built-in kernels in the registry: what is chosen by default, forced, disabled; QuantLinear end to end."""

from __future__ import annotations

import pytest
import torch

from gptq_plugin.errors import KernelError
from gptq_plugin.kernels import CpuInt4Kernel
from gptq_plugin.plugins import ENV_DISABLED_KERNELS, ENV_FORCE_KERNEL, choose_kernel, kernels
from gptq_plugin.sharding import RowShard
from kernel_harness import RTOL, make_input, make_layer, reference, rel_err


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    monkeypatch.delenv(ENV_FORCE_KERNEL, raising=False)
    monkeypatch.delenv(ENV_DISABLED_KERNELS, raising=False)


def test_builtins_registered_in_priority_order():
    names = [k.name for k in kernels()]
    for name in ("triton", "triton_gemm", "triton_gemv", "cpu_int4", "cpu_int8", "dequant_chunked", "reference"):
        assert name in names
    assert names.index("triton") < names.index("cpu_int4") < names.index("dequant_chunked") < names.index("reference")
    assert names.index("cpu_int8") < names.index("dequant_chunked")


@pytest.mark.parametrize("bits,group_size,dtype,expected", [
    (4, 128, torch.bfloat16, "cpu_int4"),  # the CPU fast path
    (3, 128, torch.bfloat16, "cpu_int4"),
    (2, 64, torch.bfloat16, "cpu_int4"),
    (8, 128, torch.bfloat16, "cpu_int8"),
    (8, -1, torch.bfloat16, "cpu_int8"),
    (4, 128, torch.float32, "dequant_chunked"),  # the op is slow in fp32
    (4, 100, torch.bfloat16, "dequant_chunked"),  # group size not a multiple of 32
    (3, 100, torch.bfloat16, "dequant_chunked"),
    (8, -1, torch.float16, "dequant_chunked"),
])
def test_default_choice_on_cpu(bits, group_size, dtype, expected):
    assert choose_kernel(make_layer(256, 48, bits, group_size, True).spec(dtype)).name == expected


def test_force_and_disable(monkeypatch):
    spec = make_layer(256, 48, 4, 128, False).spec(torch.bfloat16)
    monkeypatch.setenv(ENV_DISABLED_KERNELS, "cpu_int4, dequant_chunked")
    assert choose_kernel(spec).name == "reference"
    monkeypatch.setenv(ENV_FORCE_KERNEL, "dequant_chunked")
    assert choose_kernel(spec).name == "dequant_chunked"
    monkeypatch.setenv(ENV_FORCE_KERNEL, "cpu_int4")
    with pytest.raises(KernelError, match="bits=8.*cpu_int8"):
        choose_kernel(make_layer(256, 48, 8, 128, False).spec(torch.bfloat16))
    monkeypatch.setenv(ENV_FORCE_KERNEL, "cpu_int8")
    with pytest.raises(KernelError, match="bits=3.*cpu_int4"):
        choose_kernel(make_layer(256, 48, 3, 128, False).spec(torch.bfloat16))
    monkeypatch.setenv(ENV_FORCE_KERNEL, "triton")
    with pytest.raises(KernelError, match="cuda|triton"):
        choose_kernel(spec)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_quant_linear_end_to_end(dtype):
    """QuantLinear picks a kernel per activation dtype, matches the reference, and re-prepares after .to()."""
    layer = make_layer(257, 48, 4, 64, act_order=True)
    x = make_input(3, 257, dtype).view(1, 3, 257)
    y = layer(x)
    assert layer.kernel_name == ("cpu_int4" if dtype == torch.bfloat16 else "dequant_chunked")
    assert rel_err(y.view(3, -1), reference(layer, x.view(3, -1))) <= RTOL[dtype]
    layer.to("cpu", torch.float16)  # any _apply forgets the prepared kernel
    assert layer.kernel_name is None
    state = {k: v.clone() for k, v in layer.state_dict().items()}
    layer(x)
    layer.load_state_dict(state)
    assert layer.kernel_name is None


def test_unequal_groups_are_decided_from_the_spec():
    """A tensor-parallel row shard of an act-order layer keeps a subset of each group's channels: its spec says the
    groups are not uniform, so cpu_int4 declines in ``can_implement`` (not later, while repacking) and the registry
    picks the next kernel, with no environment variable involved."""
    full = make_layer(256, 48, 4, 64, act_order=True)
    shard = RowShard.of(256, 64, 1, 2, "probe")
    g_idx = full.g_idx[shard.lo:shard.hi]
    assert shard.groups(g_idx) is None  # act-order: every rank keeps all groups, g_idx names them
    codes = full.qweight[shard.lo * 4 // 32: shard.hi * 4 // 32]
    layer = type(full).from_tensors(codes, full.qzeros, full.scales, g_idx, 4, 64, sym=False, n_groups=4)
    spec = layer.spec(torch.bfloat16)
    assert not spec.uniform_groups and full.spec(torch.bfloat16).uniform_groups
    ok, reason = CpuInt4Kernel.can_implement(spec)
    assert not ok and "unequal" in reason
    x = make_input(3, 128, torch.bfloat16)
    y = layer(x)
    assert layer.kernel_name == "dequant_chunked"
    assert rel_err(y, reference(layer, x)) <= RTOL[torch.bfloat16]


@pytest.mark.parametrize("K,group_size,act_order,rank,tp", [
    (320, 64, False, 1, 2),   # the cut at 160 falls inside group 2: its first run is 32 channels long
    (512, 128, False, 1, 2),  # rank 1 starts at group 2, not 0 (also act-order with static groups: g_idx = i // gs)
    (1024, 128, False, 3, 4),
])
def test_row_shards_whose_groups_stay_aligned_keep_cpu_int4(K, group_size, act_order, rank, tp):
    """A row shard of a layer in input order keeps runs of 32 channels inside one group even when it starts inside
    a group or at group 2: ``LayerSpec.group_align`` lets cpu_int4 take it (it used to go to dequant_chunked)."""
    full = make_layer(K, 48, 4, group_size, act_order=act_order)
    shard = RowShard.of(K, group_size, rank, tp, "probe")
    g_idx = full.g_idx[shard.lo:shard.hi]
    codes = full.qweight[shard.lo * 4 // 32: shard.hi * 4 // 32]
    layer = type(full).from_tensors(codes, full.qzeros, full.scales, g_idx, 4, group_size, sym=False,
                                    n_groups=full.scales.shape[0])
    spec = layer.spec(torch.bfloat16)
    assert spec.group_align % 32 == 0, spec
    assert CpuInt4Kernel.can_implement(spec) == (True, None)
    x = make_input(3, shard.hi - shard.lo, torch.bfloat16)
    y = layer(x)
    assert layer.kernel_name == "cpu_int4"
    assert rel_err(y, reference(layer, x)) <= RTOL[torch.bfloat16]
