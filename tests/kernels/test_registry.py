"""The built-in kernels in the registry: what is chosen by default, forced, disabled; QuantLinear end to end."""

from __future__ import annotations

import pytest
import torch

from gptq_plugin.errors import KernelError
from gptq_plugin.plugins import ENV_DISABLED_KERNELS, ENV_FORCE_KERNEL, choose_kernel, kernels
from kernel_harness import RTOL, make_input, make_layer, reference, rel_err


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    monkeypatch.delenv(ENV_FORCE_KERNEL, raising=False)
    monkeypatch.delenv(ENV_DISABLED_KERNELS, raising=False)


def test_builtins_registered_in_priority_order():
    names = [k.name for k in kernels()]
    for name in ("triton", "triton_gemm", "triton_gemv", "cpu_int4", "dequant_chunked", "reference"):
        assert name in names
    assert names.index("triton") < names.index("cpu_int4") < names.index("dequant_chunked") < names.index("reference")


@pytest.mark.parametrize("bits,group_size,dtype,expected", [
    (4, 128, torch.bfloat16, "cpu_int4"),  # the CPU fast path
    (4, 128, torch.float32, "dequant_chunked"),  # the op is slow in fp32
    (4, 100, torch.bfloat16, "dequant_chunked"),  # group size not a multiple of 32
    (3, 128, torch.bfloat16, "dequant_chunked"),
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
    with pytest.raises(KernelError, match="bits=3"):
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
