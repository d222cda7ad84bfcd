"""What a kernel is: ``y = x @ dequant(W)ᵀ + b`` for one GPTQ layer, and what it can implement."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch

from .layout import group_order

if TYPE_CHECKING:  # pragma: no cover
    from gptq_plugin.linear import QuantLinear


@dataclass(frozen=True)
class LayerSpec:
    """What a kernel needs to know to decide whether it can run a layer.

    Attributes:
        in_features: ``K``. out_features: ``N``.
        bits: 2, 3, 4 or 8. group_size: -1 or a positive int (may not divide ``K``).
        sym: symmetric grid. desc_act: ``g_idx`` is not ``i // group_size`` (act-order).
        has_bias: the layer adds a bias. dtype: activation dtype. device: ``"cpu"``, ``"cuda"``, ...
        uniform_groups: sorted by group, channel ``i`` is in group ``i // group_size`` (every group holds
            ``group_size`` channels, the last may hold fewer), or every channel is in one group; False for groups
            of unequal lengths, e.g. a tensor-parallel shard of an act-order layer (:mod:`gptq_plugin.sharding`).
        group_align: sorted by group, the greatest common divisor of the channel positions where a new group starts
            (0: one group). A kernel that needs every run of ``t`` channels inside one group can run the layer when
            ``group_align % t == 0``, uniform groups or not (e.g. a row shard that starts inside a group).
    """

    in_features: int
    out_features: int
    bits: int
    group_size: int
    sym: bool = True
    desc_act: bool = False
    has_bias: bool = False
    dtype: torch.dtype = torch.float32
    device: str = "cpu"
    uniform_groups: bool = True
    group_align: int = 0

    @classmethod
    def of(cls, layer: "QuantLinear", dtype: torch.dtype | None = None) -> "LayerSpec":
        """The spec of a :class:`~gptq_plugin.linear.QuantLinear` run in ``dtype`` (default: its scales' dtype)."""
        order = group_order(layer.g_idx, layer.group_size)
        starts = (torch.nonzero(order.g_idx[1:] != order.g_idx[:-1]).flatten() + 1).tolist()
        return cls(layer.in_features, layer.out_features, layer.bits, layer.group_size, layer.sym, layer.desc_act,
                   layer.bias is not None, dtype or layer.scales.dtype, layer.qweight.device.type,
                   order.group_size is not None, math.gcd(*starts))


class QuantKernel:
    """Base class of kernels. Subclasses set ``name`` and ``priority`` (higher wins) and implement
    :meth:`can_implement`, :meth:`__init__` (prepare/repack from the layer's GPTQ buffers) and
    :meth:`forward`. Register them through the ``gptq_plugin_kernels`` hook."""

    name: ClassVar[str] = "base"
    priority: ClassVar[int] = 0

    @classmethod
    def can_implement(cls, spec: LayerSpec) -> tuple[bool, str | None]:
        """``(True, None)`` when this kernel runs ``spec``; otherwise ``(False, reason)``."""
        raise NotImplementedError

    def __init__(self, layer: "QuantLinear"):
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` ``[..., K]`` in ``spec.dtype`` -> ``[..., N]`` in the same dtype."""
        raise NotImplementedError
