"""Tensor-parallel shards of one quantized layer, in the GPTQ and compressed-tensors layouts: which channels, words
and groups a rank holds. The serving adapters (vLLM, TGI) read their rank's tensors through their framework and ask
this module what to read.

A layer has ``K`` inputs, ``N`` outputs and ``G`` groups; :class:`StoredLayout` says where a format keeps them
(GPTQ: ``qweight [K*bits/32, N]``, ``scales [G, N]``, ``qzeros [G, N*bits/32]``, ``g_idx [K]``; compressed-tensors:
the same transposed, ``weight_packed [N, K*bits/32]``, ``weight_scale [N, G]``, ``weight_zero_point [N*bits/32, G]``).
With ``W`` ranks:

* column-parallel (q/k/v, gate/up): rank ``r`` takes the ``r``-th ``1/W`` of the output channels of every tensor
  (of every block, for outputs that stack several projections: :func:`block_ranges`); ``g_idx`` is whole. The
  zero points pack output channels: whole words when every cut falls on a word (:func:`word_ranges`), else
  unpacked, sliced and repacked (:func:`slice_codes`).
* row-parallel (o_proj, down_proj): rank ``r`` takes input channels ``[r*K/W, (r+1)*K/W)`` of the packed weight
  and of ``g_idx`` (:class:`RowShard`). When those channels are whole groups in input order (no act-order,
  ``K/W % group_size == 0``), scales and zero points split by group and ``g_idx`` is rebased to 0; otherwise
  (act-order, a group straddling a cut, ``group_size=-1``) every rank keeps every group and its ``g_idx`` names
  the layer's groups, which is exact for any ``g_idx``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import CheckpointError
from .packing import num_groups, pack_dim0, packed_rows, unpack_dim0


@dataclass(frozen=True)
class StoredLayout:
    """Where a checkpoint format keeps the parts of one quantized layer.

    Attributes:
        weight, scales, zeros, g_idx: the leaf names of the packed codes, the scales, the packed zero points and
            ``g_idx``.
        out_dim: the dim of ``weight``, ``scales`` and ``zeros`` that holds the output channels; the other holds
            the packed input channels (``weight``) or the groups (``scales``, ``zeros``).
    """

    weight: str
    scales: str
    zeros: str
    g_idx: str
    out_dim: int

    @property
    def in_dim(self) -> int:
        """The dim of ``weight`` packing the input channels (of ``scales``/``zeros``: the groups)."""
        return 1 - self.out_dim


GPTQ_LAYOUT = StoredLayout("qweight", "scales", "qzeros", "g_idx", out_dim=1)
CT_LAYOUT = StoredLayout("weight_packed", "weight_scale", "weight_zero_point", "weight_g_idx", out_dim=0)
_LAYOUTS = {"gptq": GPTQ_LAYOUT, "gptq_v2": GPTQ_LAYOUT, "compressed-tensors": CT_LAYOUT}


def layout_of(checkpoint_format: str) -> StoredLayout:
    """The :class:`StoredLayout` of a checkpoint format ("gptq", "gptq_v2", "compressed-tensors").

    Raises:
        CheckpointError: a format whose layout tensor parallelism does not know.
    """
    if checkpoint_format not in _LAYOUTS:
        raise CheckpointError(f"checkpoint format {checkpoint_format!r} cannot be split for tensor parallelism: "
                              f"known layouts {', '.join(_LAYOUTS)}")
    return _LAYOUTS[checkpoint_format]


def split_evenly(size: int, world: int, rank: int, name: str, what: str) -> tuple[int, int]:
    """``[lo, hi)``: rank ``rank``'s equal share of ``size`` channels over ``world`` ranks.

    Raises:
        CheckpointError: ``size`` is not a multiple of ``world`` (naming tensor ``name`` and ``what`` is split).
    """
    if size % world:
        raise CheckpointError(f"{name}: {size} {what} cannot be split evenly across {world} tensor-parallel "
                              f"shards; use a number of shards that divides {size}")
    part = size // world
    return rank * part, (rank + 1) * part


def block_ranges(n: int, parts: list[int], rank: int, world: int, name: str) -> list[tuple[int, int]]:
    """The ``[start, stop)`` ranges of ``n`` output channels that rank ``rank`` takes when they stack blocks
    proportional to ``parts`` (fused q/k/v or gate/up; ``[1]`` for one projection), each block split over
    ``world`` ranks.

    Raises:
        CheckpointError: ``n`` does not split into such blocks, or a block not over ``world`` ranks.
    """
    if n % sum(parts):
        raise CheckpointError(f"{name}: {n} output channels cannot be split in blocks proportional to {parts}")
    ranges, start = [], 0
    for p in parts:
        size = n // sum(parts) * p
        lo, hi = split_evenly(size, world, rank, name, "output channels of a packed block")
        ranges.append((start + lo, start + hi))
        start += size
    return ranges


def word_ranges(ranges: list[tuple[int, int]], n: int, bits: int) -> list[tuple[int, int]] | None:
    """The int32 words holding exactly the codes ``ranges`` of ``n`` codes packed ``bits`` wide along one dim, or
    None when a cut falls inside a word (the layer's last, partial word excepted)."""
    out = []
    for a, b in ranges:
        if (a * bits) % 32 or ((b * bits) % 32 and b != n):
            return None
        out.append((a * bits // 32, packed_rows(b, bits)))
    return out


def slice_codes(words: torch.Tensor, bits: int, n: int, ranges: list[tuple[int, int]], dim: int = 0) -> torch.Tensor:
    """The codes ``ranges`` (concatenated) of the ``n`` codes that int32 ``words`` packs ``bits`` wide along
    ``dim``, repacked the same way: exact for cuts inside words.

    Args:
        words: int32 ``[ceil(n * bits / 32), m]`` (``dim`` 0) or its transpose (``dim`` 1).
    """
    t = words if dim == 0 else words.t()
    codes = unpack_dim0(t.contiguous(), bits, n)
    packed = pack_dim0(torch.cat([codes[a:b] for a, b in ranges]), bits)
    return packed if dim == 0 else packed.t().contiguous()


def cat_packed(words: list[torch.Tensor], widths: list[int], bits: int, dim: int = 0) -> torch.Tensor:
    """Concatenate int32 tensors packing ``widths`` codes each ``bits`` wide along ``dim``: word by word when every
    one but the last fills whole words, else code by code (exact either way)."""
    if all(w * bits % 32 == 0 for w in widths[:-1]):
        return torch.cat(words, dim=dim)
    codes = [unpack_dim0((q if dim == 0 else q.t()).contiguous(), bits, w) for q, w in zip(words, widths)]
    packed = pack_dim0(torch.cat(codes), bits)
    return packed if dim == 0 else packed.t().contiguous()


@dataclass(frozen=True)
class RowShard:
    """One rank's input channels ``[lo, hi)`` of a row-parallel layer with ``in_features`` inputs.

    Attributes:
        in_features: ``K`` of the whole layer. group_size: the layer's (-1: one group). lo, hi: the channels.
    """

    in_features: int
    group_size: int
    lo: int
    hi: int

    @classmethod
    def of(cls, in_features: int, group_size: int, rank: int, world: int, name: str) -> "RowShard":
        """Rank ``rank``'s equal share of ``in_features`` over ``world`` ranks. Raises :class:`CheckpointError`
        (naming tensor ``name``) when they do not divide evenly."""
        return cls(in_features, group_size, *split_evenly(in_features, world, rank, name, "input channels"))

    @property
    def size(self) -> int:
        return self.hi - self.lo

    def word_aligned(self, bits: int) -> bool:
        """Whether every rank's cut falls on an int32 word of codes packed ``bits`` wide along the input (so the
        packed weight splits word by word)."""
        return (self.size * bits) % 32 == 0 or self.size == self.in_features

    def whole_groups(self) -> bool:
        """Whether the shard's channels are whole groups ``[lo / group_size, hi / group_size)`` in input order
        (then scales and zero points split with them, unless ``g_idx`` says act-order)."""
        gs = self.group_size
        return gs != -1 and self.size < self.in_features and self.lo % gs == 0 and self.size % gs == 0

    def groups(self, g_idx: torch.Tensor | None = None) -> slice | None:
        """The groups this shard stores: ``slice(lo / group_size, hi / group_size)`` when its channels are whole
        groups (:meth:`whole_groups`) and, when given, its ``g_idx`` slice (global groups, ``[hi - lo]``) is in input
        order; None when it keeps every group of the layer, its ``g_idx`` naming them."""
        if not self.whole_groups():
            return None
        gs = self.group_size
        if g_idx is not None and not torch.equal(g_idx.long().cpu(), torch.arange(self.lo, self.hi) // gs):
            return None
        return slice(self.lo // gs, self.hi // gs)

    def n_groups(self, split: bool) -> int:
        """Groups stored by the shard: its own when ``split`` (see :meth:`groups`), else the layer's."""
        if split:
            return self.size // self.group_size
        return num_groups(self.in_features, self.group_size)

    def local_g_idx(self, g_idx: torch.Tensor, split: bool) -> torch.Tensor:
        """The shard's ``g_idx`` slice as indices into the groups it stores: rebased to 0 when ``split``."""
        return g_idx - self.lo // self.group_size if split else g_idx
