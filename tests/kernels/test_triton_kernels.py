"""The Triton kernels against the reference: on a GPU when present, else in the CPU interpreter
(``TRITON_INTERPRET=1``, small shapes). Skipped with the reason when Triton is not installed."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from gptq_plugin.kernels.triton_kernels import TritonGemmKernel, TritonGemvKernel, TritonKernel
from kernel_harness import SHAPES, KernelTests, grid, make_input, make_layer, poisoned, reference, rel_err, RTOL

# Interpreted Triton is slow: every configuration once, on shapes that still mask every dimension.
SMALL = ((1, 37, 13), (13, 257, 37), (3, 100, 1), (1, 576, 13))


class _TritonTests(KernelTests):
    @pytest.fixture(autouse=True)
    def _on_device(self, triton_device):
        self.device = triton_device

    def spec_device(self):
        return "cuda"

    @classmethod
    def cases(cls):
        return grid(SMALL if not torch.cuda.is_available() else SHAPES)

    def compute(self, kernel, x):
        out = poisoned((x.shape[0], kernel.weight.N), x.dtype, x.device)
        return kernel.run(kernel.weight.input(x), out)


class TestTritonGemm(_TritonTests):
    kernel_cls = TritonGemmKernel


class TestTritonGemv(_TritonTests):
    kernel_cls = TritonGemvKernel

    def compute(self, kernel, x):
        """Three K slices, with the fp32 workspace poisoned too."""
        out = poisoned((x.shape[0], kernel.weight.N), x.dtype, x.device)
        ws = poisoned((3, x.shape[0], kernel.weight.N), torch.float32, x.device)
        return kernel.run(kernel.weight.input(x), out, split_k=3, workspace=ws)


class TestTritonAuto(_TritonTests):
    """The dispatching kernel: GEMV path for M <= 16, GEMM above (both met by these shapes)."""

    kernel_cls = TritonKernel

    @classmethod
    def cases(cls):
        return grid(((1, 37, 13), (17, 64, 33)), bits=(3, 4), group_sizes=(32,))


@pytest.mark.parametrize("split_k", [1, 2, 5])
def test_splitk_factors(triton_device, split_k):
    layer = make_layer(257, 37, 4, 32, act_order=True, device=triton_device)
    kernel = TritonGemvKernel(layer)
    x = make_input(2, 257, torch.float16, device=triton_device)
    out = poisoned((2, 37), torch.float16, triton_device)
    y = kernel.run(kernel.weight.input(x), out, split_k=split_k)
    assert rel_err(y, reference(layer, x)) <= RTOL[torch.float16]


def test_triton_refuses_cpu_and_fp32():
    spec = make_layer(64, 16, 4, 32, False).spec(torch.float16)
    ok, reason = TritonKernel.can_implement(spec)
    assert not ok and ("cuda" in reason or "triton" in reason)
    ok, reason = TritonKernel.can_implement(dataclasses.replace(spec, device="cuda", dtype=torch.float32))
    assert not ok and ("fp16 or bf16" in reason or "triton" in reason)
