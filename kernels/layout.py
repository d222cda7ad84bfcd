"""Load-time preparation shared by the kernels: act-order permutation, group structure, code planes.

Everything here runs once per layer (in a kernel's ``__init__``), is pure torch and exact.

Act-order (``desc_act``) checkpoints store ``g_idx`` in input order, so the channels of one group are scattered
over ``K``. Kernels sort the input channels by group once (:func:`group_order`), repack ``qweight`` in that order
and permute ``x`` at run time (``x[..., perm]``): every group is then a contiguous run of channels and scales
are read one row per group, never gathered per element.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from gptq_plugin.packing import unpack_qweight, unpack_qzeros


@dataclass
class GroupOrder:
    """Input channels sorted by group.

    Attributes:
        perm: int64 ``[K]`` so that ``x[..., perm]`` is in group order, or None when ``g_idx`` is already sorted.
        g_idx: int64 ``[K]``, the group of each channel *after* the permutation (non-decreasing).
        group_size: the uniform group length when ``g_idx == arange(K) // group_size`` after sorting (the last
            group may be partial); ``K`` for one group; None when groups have unequal lengths.
    """

    perm: torch.Tensor | None
    g_idx: torch.Tensor
    group_size: int | None


def group_order(g_idx: torch.Tensor, group_size: int) -> GroupOrder:
    """Sort the input channels by group (stable, so the order inside a group is kept).

    Args:
        g_idx: int ``[K]``, the checkpoint's group of each input channel.
        group_size: the layer's ``group_size`` (-1 for one group).

    Returns:
        :class:`GroupOrder`.
    """
    g = g_idx.detach().to(device="cpu", dtype=torch.int64)
    K = g.numel()
    if K and bool((g[1:] >= g[:-1]).all()):
        perm, g_sorted = None, g
    else:
        g_sorted, perm = torch.sort(g, stable=True)
    gs = K if group_size == -1 else group_size
    uniform = None
    if gs > 0 and torch.equal(g_sorted, torch.arange(K) // gs):
        uniform = max(gs, 1)
    elif K and bool((g_sorted == g_sorted[0]).all()):
        uniform = K
    return GroupOrder(perm, g_sorted, uniform)


def unpack_codes(layer, order: GroupOrder) -> torch.Tensor:
    """The layer's integer codes in group order, int32 ``[K, N]`` (on the layer's device)."""
    codes = unpack_qweight(layer.qweight, layer.bits, layer.in_features)  # [K, N]
    if order.perm is not None:
        codes = codes.index_select(0, order.perm.to(codes.device))
    return codes


def zeros_and_scales(layer) -> tuple[torch.Tensor, torch.Tensor]:
    """True zero points int32 ``[G, N]`` and scales fp32 ``[G, N]`` of a GPTQ v1 layer."""
    zeros = unpack_qzeros(layer.qzeros, layer.bits, layer.out_features, getattr(layer, "checkpoint_format", "gptq"))
    return zeros, layer.scales.float()


# --- bit planes ----------------------------------------------------------------------------------------------
def plane_bits(bits: int) -> tuple[int, ...]:
    """Widths of the planes a ``bits``-bit code is split into: powers of two, so every plane packs whole codes
    into a byte or word (3-bit codes become a 2-bit and a 1-bit plane; same memory as the 3-bit layout)."""
    return {2: (2,), 3: (2, 1), 4: (4,), 8: (8,)}[bits]
