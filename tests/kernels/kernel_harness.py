"""The shared test base of every kernel: random GPTQ layers of odd shapes, checked against the reference.

A kernel's test class inherits :class:`KernelTests`, names ``kernel_cls`` and returns its ``cases()``; conftest's
``pytest_generate_tests`` parametrises ``case`` from them. Data is random (codes over the whole range, asymmetric
zeros, positive scales, never zeros), outputs are poisoned with NaN before a kernel writes them, and the error is
``|y - ref| / |ref|`` (Frobenius) against :data:`RTOL` of the activation dtype.
"""

from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass

import pytest
import torch

from gptq_plugin.kernels.reference import gemm
from gptq_plugin.linear import QuantLinear
from gptq_plugin.packing import num_groups, pack_qweight, pack_qzeros

# Relative error bounds per activation dtype: a few roundings of the output and of a dequantized weight
# (fp16: 2**-11 per rounding, bf16: 2**-8). A zero point off by one (v1 read as v2) exceeds them: see
# test_harness_rejects_off_by_one_zero.
RTOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}

BITS = (2, 3, 4, 8)
GROUP_SIZES = (-1, 32, 64, 128, 100)  # 100 divides none of the shapes' K: a partial last group
SHAPES = ((1, 257, 37), (13, 37, 576), (37, 576, 13), (1, 576, 257), (257, 13, 1), (4, 100, 48))


@dataclass(frozen=True)
class Case:
    M: int
    K: int
    N: int
    bits: int
    group_size: int
    act_order: bool
    dtype: torch.dtype
    bias: bool = True
    sym: bool = False

    def __str__(self) -> str:
        return (f"M{self.M}-K{self.K}-N{self.N}-b{self.bits}-g{self.group_size}-{'act' if self.act_order else 'seq'}-"
                f"{str(self.dtype).removeprefix('torch.')}{'-bias' if self.bias else ''}{'-sym' if self.sym else ''}")


def grid(shapes, bits=BITS, group_sizes=GROUP_SIZES, dtypes=(torch.float16, torch.bfloat16), syms=(False,)
         ) -> list[Case]:
    """Every (bits, group size, act-order, dtype, sym), shapes taken in turn so each shape meets many configs."""
    combos = itertools.product(bits, group_sizes, (False, True), dtypes, syms)
    return [Case(*shapes[i % len(shapes)], b, g, a, d, bias=i % 3 != 2, sym=s)
            for i, (b, g, a, d, s) in enumerate(combos)]


def make_layer(K: int, N: int, bits: int, group_size: int, act_order: bool, bias: bool = True, seed: int = 0,
               device: str = "cpu", sym: bool = False) -> QuantLinear:
    """A random GPTQ layer in the v1 checkpoint layout, built with the project's own packing.

    Codes cover ``[0, 2**bits)``; zeros too (asymmetric), or all ``2**(bits - 1)`` with ``sym`` (GPTQ's symmetric
    grid); scales are fp16 in ``[0.01, 0.03)``; with ``act_order`` ``g_idx`` is a random permutation of
    ``i // group_size`` (groups scattered over K).
    """
    g = torch.Generator().manual_seed(seed)
    G = num_groups(K, group_size)
    layer = QuantLinear(K, N, bits, group_size, bias=bias, sym=sym)
    codes = torch.randint(0, 2**bits, (N, K), generator=g)
    zeros = torch.randint(0, 2**bits, (G, N), generator=g)
    if sym:
        zeros.fill_(2 ** (bits - 1))
    gs = K if group_size == -1 else group_size
    g_idx = torch.arange(K) // gs
    if act_order:
        g_idx = g_idx[torch.randperm(K, generator=g)]
    layer.qweight.copy_(pack_qweight(codes, bits))
    layer.qzeros.copy_(pack_qzeros(zeros, bits))
    layer.scales.copy_((torch.rand(G, N, generator=g) * 0.02 + 0.01).half())
    layer.g_idx.copy_(g_idx.to(torch.int32))
    if bias:
        layer.bias.copy_(torch.randn(N, generator=g).half())
    return layer.to(device)


def make_input(M: int, K: int, dtype: torch.dtype, seed: int = 1, device: str = "cpu") -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(M, K, generator=g).to(device=device, dtype=dtype)


def reference(layer: QuantLinear, x: torch.Tensor) -> torch.Tensor:
    return gemm(x, layer.qweight, layer.qzeros, layer.scales, layer.g_idx, layer.bits, layer.bias)


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    ref = ref.double()
    return float((y.double() - ref).norm() / ref.norm().clamp_min(1e-30))


def poisoned(shape, dtype, device) -> torch.Tensor:
    return torch.full(shape, float("nan"), dtype=dtype, device=device)


class KernelTests:
    """Inherit, set ``kernel_cls`` (and ``device``), and return the kernel's ``cases()``."""

    kernel_cls: type
    device = "cpu"

    @classmethod
    def cases(cls) -> list[Case]:
        raise NotImplementedError

    def spec_device(self) -> str:
        """The device ``can_implement`` is asked about (the interpreted Triton tests ask about cuda)."""
        return self.device

    def compute(self, kernel, x: torch.Tensor) -> torch.Tensor:
        """Run the kernel; kernels that write into a buffer get a NaN-poisoned one (override to do so)."""
        return kernel.forward(x)

    def test_matches_reference(self, case: Case):
        layer = make_layer(case.K, case.N, case.bits, case.group_size, case.act_order, case.bias, device=self.device,
                           sym=case.sym)
        spec = dataclasses.replace(layer.spec(case.dtype), device=self.spec_device())
        ok, reason = self.kernel_cls.can_implement(spec)
        assert ok, f"{self.kernel_cls.name} refuses {case}: {reason}"
        kernel = self.kernel_cls(layer)
        x = make_input(case.M, case.K, case.dtype, device=self.device)
        y = self.compute(kernel, x)
        assert y.shape == (case.M, case.N) and y.dtype == case.dtype
        assert torch.isfinite(y).all(), f"{self.kernel_cls.name} left unwritten (NaN) outputs for {case}"
        err = rel_err(y, reference(layer, x))
        assert err <= RTOL[case.dtype], f"{self.kernel_cls.name} {case}: relative error {err:.2e} > {RTOL[case.dtype]}"

    def test_leading_dims_and_repeat(self):
        """``x`` of shape ``[b, s, K]``; a second call (prepared state reused) gives the same result."""
        case = self.cases()[0]
        layer = make_layer(case.K, case.N, case.bits, case.group_size, case.act_order, device=self.device)
        kernel = self.kernel_cls(layer)
        x = make_input(2 * 3, case.K, case.dtype, seed=5, device=self.device).view(2, 3, case.K)
        y1 = kernel.forward(x)
        y2 = kernel.forward(x)
        assert y1.shape == (2, 3, case.N)
        assert torch.equal(y1, y2)
        assert rel_err(y1.view(6, -1), reference(layer, x.view(6, -1))) <= RTOL[case.dtype]


def require_cuda():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
