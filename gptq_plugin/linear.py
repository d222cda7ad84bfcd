"""``QuantLinear``: an ``nn.Module`` holding one layer in the GPTQ checkpoint layout, running the kernel the
registry chooses for it."""

from __future__ import annotations

import logging

import torch
from torch import nn

from gptq_plugin.kernels.base import LayerSpec

from .config import QuantizeConfig
from .errors import CheckpointError
from .packing import num_groups, packed_rows, pack_qweight, pack_qzeros
from .plugins import choose_kernel, get_format
from .validate import check_internal

log = logging.getLogger(__name__)


class QuantLinear(nn.Module):
    """A GPTQ-quantized linear layer: ``y = x @ dequant(qweight, qzeros, scales, g_idx)ᵀ + bias``.

    Buffers (the standard GPTQ "gptq" v1 layout, so ``state_dict()`` is a GPTQ checkpoint):
        qweight: int32 ``[ceil(in * bits / 32), out]``; qzeros: int32 ``[G, ceil(out * bits / 32)]`` storing
        ``zero - 1``; scales: fp16 ``[G, out]``; g_idx: int32 ``[in]``; bias: ``[out]`` or absent.

    Args:
        in_features, out_features: ``K``, ``N``.
        bits: 2, 3, 4 or 8. group_size: -1 or a positive int.
        bias: whether the layer has a bias. sym: symmetric grid (a hint for kernels).
        dtype: dtype of ``scales`` and ``bias`` (fp16 in checkpoints). device: where buffers live.
    """

    def __init__(self, in_features: int, out_features: int, bits: int, group_size: int, bias: bool = False,
                 sym: bool = True, dtype: torch.dtype = torch.float16, device: torch.device | str | None = None):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.bits = bits
        self.group_size = group_size
        self.sym = sym
        G = num_groups(in_features, group_size)
        kw = dict(device=device)
        self.register_buffer("qweight", torch.zeros(packed_rows(in_features, bits), out_features, dtype=torch.int32, **kw))
        self.register_buffer("qzeros", torch.zeros(G, packed_rows(out_features, bits), dtype=torch.int32, **kw))
        self.register_buffer("scales", torch.zeros(G, out_features, dtype=dtype, **kw))
        self.register_buffer("g_idx", torch.zeros(in_features, dtype=torch.int32, **kw))
        if bias:
            self.register_buffer("bias", torch.zeros(out_features, dtype=dtype, **kw))
        else:
            self.bias = None
        self._kernel = None

    # --- construction ---------------------------------------------------------------------------------
    @classmethod
    def from_result(cls, result, group_size: int, bias: torch.Tensor | None = None, sym: bool = True
                    ) -> "QuantLinear":
        """Build from a :class:`gptq_plugin.solver.QuantResult` (``codes`` ``[out, in]``)."""
        out_features, in_features = result.codes.shape
        layer = cls(in_features, out_features, result.bits, group_size, bias is not None, sym)
        layer.qweight.copy_(pack_qweight(result.codes, result.bits))
        layer.qzeros.copy_(pack_qzeros(result.zeros, result.bits, "gptq"))
        layer.scales.copy_(result.scales)
        layer.g_idx.copy_(result.g_idx)
        if bias is not None:
            layer.bias.copy_(bias.to(layer.bias.dtype))
        return layer

    @classmethod
    def from_tensors(cls, qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, g_idx: torch.Tensor,
                     bits: int, group_size: int, sym: bool = True, bias: torch.Tensor | None = None, name: str = "",
                     n_groups: int | None = None, names: dict[str, str] | None = None) -> "QuantLinear":
        """The layer holding these in-memory GPTQ v1 tensors (not copies), checked by
        :func:`gptq_plugin.validate.check_internal` first; the kernel is chosen on the first forward (or
        :meth:`prepare`). ``K`` is ``g_idx``'s length, ``N`` ``scales``' columns.

        Args:
            qweight: int32 ``[ceil(K * bits / 32), N]``. qzeros: int32 ``[G, ceil(N * bits / 32)]``, v1 (``zero - 1``).
            scales: fp16/bf16/fp32 ``[G, N]`` (finite). g_idx: int32 ``[K]``, values in ``[0, G)``.
            bits, group_size, sym: the layer's config. bias: ``[N]`` floating point, or None.
            name: the layer's name, for messages.
            n_groups: ``G`` when it is not ``ceil(K / group_size)``: a tensor-parallel shard of the input channels that
                keeps every group of the layer (:mod:`gptq_plugin.sharding`).
            names: leaf -> the stored tensor it came from (a format handler's ``internal_names``), for messages.

        Raises:
            CheckpointError: a missing tensor, or a shape, dtype or value that does not fit, named.
        """
        tensors = {"qweight": qweight, "qzeros": qzeros, "scales": scales, "g_idx": g_idx}
        if bias is not None:
            tensors["bias"] = bias
        check_internal(name, tensors, bits, group_size, n_groups=n_groups, names=names)
        layer = cls(0, 0, bits, group_size, bias is not None, sym, dtype=scales.dtype, device="meta")
        layer.in_features, layer.out_features = int(g_idx.numel()), int(scales.shape[1])
        for leaf, t in tensors.items():
            setattr(layer, leaf, t)
        return layer

    @property
    def desc_act(self) -> bool:
        """True when ``g_idx`` is not the input-order ``i // group_size`` (act-order checkpoints)."""
        gs = self.in_features if self.group_size == -1 else self.group_size
        expected = torch.arange(self.in_features, device=self.g_idx.device) // gs
        return not torch.equal(self.g_idx.long(), expected)

    def spec(self, dtype: torch.dtype | None = None) -> LayerSpec:
        """What the kernel registry needs to choose this layer's kernel for activations in ``dtype``."""
        return LayerSpec.of(self, dtype)

    def expected_tensors(self, checkpoint_format: str | None = None
                         ) -> dict[str, tuple[tuple[int, ...], torch.dtype | None]]:
        """``{leaf: (shape, dtype or None)}`` of the GPTQ v1 tensors this layer's config implies (the buffers), or,
        with ``checkpoint_format`` (e.g. "compressed-tensors"), of the tensors that format stores for it."""
        if checkpoint_format is not None:
            cfg = QuantizeConfig(bits=self.bits, group_size=self.group_size, sym=self.sym)
            return get_format(checkpoint_format).expected_tensors(cfg, self.in_features, self.out_features)
        G = num_groups(self.in_features, self.group_size)
        return {
            "qweight": ((packed_rows(self.in_features, self.bits), self.out_features), torch.int32),
            "qzeros": ((G, packed_rows(self.out_features, self.bits)), torch.int32),
            "scales": ((G, self.out_features), None),
            "g_idx": ((self.in_features,), torch.int32),
        }

    def check_shape(self, key: str, shape, name: str = "", checkpoint_format: str | None = None) -> None:
        """Raise :class:`CheckpointError` unless tensor ``key`` of shape ``shape`` fits this layer's config (in
        ``checkpoint_format``'s layout when given, see :meth:`expected_tensors`)."""
        want = self.expected_tensors(checkpoint_format)[key][0]
        if tuple(shape) != want:
            where = f"{name}." if name else ""
            raise CheckpointError(f"{where}{key} has shape {tuple(shape)}, expected {want} for "
                                  f"bits={self.bits}, group_size={self.group_size}: the checkpoint does not "
                                  "match its quantization_config")

    def validate(self, name: str = "") -> None:
        """Check buffer shapes/dtypes against this layer's config, ``g_idx`` range and finite scales
        (:func:`gptq_plugin.validate.check_internal`). Raises :class:`CheckpointError` naming the tensor."""
        if self.g_idx is None or tuple(self.g_idx.shape) != (self.in_features,):
            shape = None if self.g_idx is None else tuple(self.g_idx.shape)
            raise CheckpointError(f"tensor {name + '.' if name else ''}g_idx has shape {shape}, expected "
                                  f"[{self.in_features}] (in_features)")
        if self.scales is not None and self.scales.dim() == 2 and self.scales.shape[1] != self.out_features:
            raise CheckpointError(f"tensor {name + '.' if name else ''}scales has shape {tuple(self.scales.shape)}, "
                                  f"expected {self.out_features} columns (out_features)")
        tensors = {leaf: getattr(self, leaf) for leaf in ("qweight", "qzeros", "scales", "g_idx")}
        if self.bias is not None:
            tensors["bias"] = self.bias
        check_internal(name, tensors, self.bits, self.group_size)

    # --- running --------------------------------------------------------------------------------------
    def reset_kernel(self) -> None:
        """Forget the prepared kernel (call after changing buffers or device)."""
        self._kernel = None

    def _apply(self, fn, *args, **kwargs):
        self.reset_kernel()  # `.to(device)`, `.half()`, ...: the prepared kernel holds the old tensors
        return super()._apply(fn, *args, **kwargs)

    def _load_from_state_dict(self, *args, **kwargs):
        self.reset_kernel()  # new buffers: repack on the next forward
        super()._load_from_state_dict(*args, **kwargs)

    @property
    def kernel_name(self) -> str | None:
        return None if self._kernel is None else self._kernel.name

    def prepare(self, dtype: torch.dtype | None = None) -> None:
        """Choose the kernel for this layer through the registry and let it repack the weights."""
        kernel_cls = choose_kernel(self.spec(dtype))
        self._kernel = kernel_cls(self)
        self._kernel_dtype = dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._kernel is None or getattr(self, "_kernel_dtype", None) != x.dtype:
            self.prepare(x.dtype)
        return self._kernel.forward(x)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"group_size={self.group_size}, bias={self.bias is not None}, kernel={self.kernel_name}")

