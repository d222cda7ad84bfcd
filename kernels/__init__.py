"""Fused dequantize + matmul kernels for GPTQ layers, chosen per layer through the kernel registry.

``reference`` defines the math; every other kernel is tested against it.
"""

from .base import LayerSpec, QuantKernel
from .reference import ReferenceKernel, dequantize_weight, gemm

__all__ = ["LayerSpec", "QuantKernel", "ReferenceKernel", "dequantize_weight", "gemm"]
