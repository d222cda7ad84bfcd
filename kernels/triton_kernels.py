"""Triton kernels for CUDA GPUs, as registry entries: ``triton`` (split-K GEMV for ``M <= 16``, tiled GEMM above),
``triton_gemv`` and ``triton_gemm`` (one path each, for benchmarks and to force a path).

This module does not import Triton: the jitted code lives in :mod:`gptq_plugin.kernels.triton_jit`, imported on
first use, so registering kernels never initialises Triton (and tests can pick ``TRITON_INTERPRET=1`` first).
"""

from __future__ import annotations

import importlib.util

import torch

from gptq_plugin.packing import pack_dim0

from .base import LayerSpec, QuantKernel
from .layout import group_order, unpack_codes, zeros_and_scales

GEMV_MAX_M = 16
_DTYPES = (torch.float16, torch.bfloat16)


def triton_available() -> tuple[bool, str | None]:
    """Whether Triton can be imported, with the pip command when it cannot."""
    if importlib.util.find_spec("triton") is None:
        return False, "triton is not installed (pip install 'gptq-plugin[triton]')"
    return True, None


class TritonWeight:
    """A layer prepared for the Triton kernels (see :mod:`gptq_plugin.kernels.triton_jit` for the operands).

    Act-order layers are repacked once with their input channels in group order (``perm``); otherwise the
    layer's ``qweight`` and ``scales`` are used as they are.

    Attributes:
        perm: int64 ``(K,)`` or None. qweight: int32 ``(ceil(K * bits / 32), N)``. scales: ``(G, N)``.
        zeros: uint8 ``(G, N)``. g_idx: int32 ``(K,)`` non-decreasing. bits, K, N.
    """

    def __init__(self, layer):
        self.bits, self.K, self.N = layer.bits, layer.in_features, layer.out_features
        device = layer.qweight.device
        order = group_order(layer.g_idx, layer.group_size)
        if order.perm is None:
            self.perm = None
            self.qweight = layer.qweight
        else:
            self.perm = order.perm.to(device)
            codes = unpack_codes(layer, order)
            self.qweight = pack_dim0(codes, self.bits)  # GPTQ's layout, in group order
        zeros, _ = zeros_and_scales(layer)
        self.zeros = zeros.to(device=device, dtype=torch.uint8).contiguous()
        self.scales = layer.scales
        self.g_idx = order.g_idx.to(device=device, dtype=torch.int32)

    def input(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` ``[..., K]`` -> ``(M, K)`` in group order."""
        x2 = x.reshape(-1, self.K)
        return x2 if self.perm is None else x2.index_select(1, self.perm)


class _TritonBase(QuantKernel):
    """Shared ``can_implement``/``__init__``; subclasses pick the path in :meth:`run`."""

    priority = 0

    @classmethod
    def can_implement(cls, spec: LayerSpec) -> tuple[bool, str | None]:
        ok, reason = triton_available()
        if not ok:
            return ok, reason
        if spec.device != "cuda":
            return False, f"device {spec.device!r} is not cuda (TRITON_INTERPRET=1 runs these on CPU only in tests)"
        if spec.dtype not in _DTYPES:
            return False, f"activation dtype {spec.dtype} is not fp16 or bf16"
        if spec.bits not in (2, 3, 4, 8):
            return False, f"bits={spec.bits} is not 2, 3, 4 or 8"
        return True, None

    def __init__(self, layer):
        super().__init__(layer)
        self.weight = TritonWeight(layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` fp16/bf16 ``[..., K]`` -> ``[..., N]`` in the same dtype."""
        x2 = self.weight.input(x)
        out = torch.empty(x2.shape[0], self.weight.N, device=x.device, dtype=x.dtype)
        self.run(x2, out)
        return out.view(*x.shape[:-1], self.weight.N)

    def run(self, x2: torch.Tensor, out: torch.Tensor, **kw) -> torch.Tensor:
        """``out (M, N) = x2 (M, K, group order) @ W + bias``; writes every element of ``out``."""
        raise NotImplementedError


class TritonGemmKernel(_TritonBase):
    """Tiled fused dequant-GEMM (prefill, large ``M``)."""

    name = "triton_gemm"
    priority = 90

    def run(self, x2, out, **kw):
        from .triton_jit import launch_gemm

        return launch_gemm(x2, self.weight, self.layer.bias, out)


class TritonGemvKernel(_TritonBase):
    """Split-K fused dequant-GEMV (decode, small ``M``); correct for any ``M``."""

    name = "triton_gemv"
    priority = 80

    def run(self, x2, out, split_k: int | None = None, workspace: torch.Tensor | None = None, **kw):
        from .triton_jit import launch_splitk

        return launch_splitk(x2, self.weight, self.layer.bias, out, split_k, workspace)


class TritonKernel(_TritonBase):
    """The default on CUDA: split-K GEMV for ``M <=`` :data:`GEMV_MAX_M`, the tiled GEMM above."""

    name = "triton"
    priority = 100

    def run(self, x2, out, **kw):
        path = TritonGemvKernel.run if x2.shape[0] <= GEMV_MAX_M else TritonGemmKernel.run
        return path(self, x2, out, **kw)
