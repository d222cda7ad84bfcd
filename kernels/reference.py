"""The definition every kernel is tested against: dequantize, then matmul with fp32 accumulation.

Format: GPTQ (AutoGPTQ/GPTQModel "gptq" v1 and "gptq_v2"), see :mod:`gptq_plugin.packing`::

    W[n, k] = scales[g_idx[k], n] * (code[k, n] - zero[g_idx[k], n])
    y = x @ Wᵀ + bias
"""

from __future__ import annotations

import torch

from gptq_plugin.packing import unpack_qweight, unpack_qzeros

from .base import LayerSpec, QuantKernel


def dequantize_weight(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, g_idx: torch.Tensor,
                      bits: int, in_features: int, checkpoint_format: str = "gptq") -> torch.Tensor:
    """Dequantize a GPTQ layer.

    Args:
        qweight: int32 ``[ceil(K * bits / 32), N]``.
        qzeros: int32 ``[G, ceil(N * bits / 32)]``.
        scales: fp16/bf16/fp32 ``[G, N]``.
        g_idx: int ``[K]``, values in ``[0, G)``.
        bits: 2, 3, 4 or 8. in_features: ``K``.
        checkpoint_format: "gptq" (zeros stored as ``zero - 1``) or "gptq_v2".

    Returns:
        fp32 ``[N, K]`` (the ``nn.Linear.weight`` layout).
    """
    n = scales.shape[1]
    codes = unpack_qweight(qweight, bits, in_features)  # [K, N]
    zeros = unpack_qzeros(qzeros, bits, n, checkpoint_format)  # [G, N]
    g = g_idx.long()
    w = scales.float()[g] * (codes.float() - zeros.float()[g])  # [K, N]
    return w.t()


def gemm(x: torch.Tensor, qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, g_idx: torch.Tensor,
         bits: int, bias: torch.Tensor | None = None, checkpoint_format: str = "gptq") -> torch.Tensor:
    """``y = x @ dequant(W)ᵀ + bias`` computed in fp32, returned in ``x.dtype``.

    Args:
        x: ``[..., K]`` activations. Other arguments as :func:`dequantize_weight`.

    Returns:
        ``[..., N]`` in ``x.dtype``.
    """
    w = dequantize_weight(qweight, qzeros, scales, g_idx, bits, x.shape[-1], checkpoint_format)
    y = x.float() @ w.t()
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


class ReferenceKernel(QuantKernel):
    """Pure torch: dequantize the whole weight on every call, then an fp32 matmul. Runs everything, slowly."""

    name = "reference"
    priority = 0

    @classmethod
    def can_implement(cls, spec: LayerSpec) -> tuple[bool, str | None]:
        return True, None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        layer = self.layer
        return gemm(x, layer.qweight, layer.qzeros, layer.scales, layer.g_idx, layer.bits, layer.bias)
