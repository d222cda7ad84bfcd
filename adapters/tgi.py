"""Text Generation Inference (TGI): a ``WeightsLoader`` that loads GPTQ layers for TGI's server through
gptq-plugin's kernel registry.

TGI's Python server (``text_generation_server``, the ``server/`` folder of huggingface/text-generation-inference)
asks a ``WeightsLoader`` (``utils/weights.py``) for every linear layer of a model; the one it uses comes from
``utils/quantization.py:get_loader()``. :class:`GPTQPluginWeightsLoader` reads each layer's tensors through TGI's
``Weights`` object, sharded for tensor parallelism the way TGI's own GPTQ loader shards them, and returns
:class:`GPTQPluginWeight` objects whose ``get_linear(bias)`` is a :class:`gptq_plugin.QuantLinear` (so every forward
runs the kernel gptq-plugin's registry chooses: 2/3/4/8 bits, act-order, asymmetric).
:mod:`gptq_plugin.adapters.tgi_launcher` routes TGI's ``get_loader(quantize="gptq", ...)`` here.

Nothing here imports TGI: the loader only calls methods of the ``Weights`` object it is given (``get_tensor``,
``get_sharded``, ``get_packed_sharded``, ``has_tensor``, ``get_shape``, ``process_group``).

Formats: GPTQ (``quant_method: "gptq"``, v1 and v2 zero points) and compressed-tensors ``pack-quantized`` (the GPTQ
tensors transposed). Which channels, words and groups a rank reads is :mod:`gptq_plugin.sharding`'s (column-parallel
layers: a slice of the output channels of every tensor, ``g_idx`` whole; row-parallel layers: a slice of the input
channels, scales and zero points split by group when the slice holds whole groups in input order, else kept whole
with ``g_idx`` naming the layer's groups, as TGI does for act-order); each rank's tensors are then converted to the
in-memory GPTQ v1 layout by the core's format handler (``to_internal``) and checked by the core's validator.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from gptq_plugin.config import QuantizeConfig
from gptq_plugin.errors import CheckpointError, ConfigError
from gptq_plugin.linear import QuantLinear
from gptq_plugin.packing import default_g_idx, num_groups, packed_rows
from gptq_plugin.plugins import detect_format, get_format
from gptq_plugin.sharding import RowShard, block_ranges, cat_packed, layout_of, slice_codes, word_ranges
from gptq_plugin.validate import check_g_idx_range, check_internal

_CT = "compressed-tensors"  # the core's compressed-tensors pack-quantized format handler
_LEAVES = ("qweight", "qzeros", "scales", "g_idx")


# --- the Weight ------------------------------------------------------------------------------------------
@dataclass
class GPTQPluginWeight:
    """One GPTQ linear layer (or one tensor-parallel shard of it) as loaded for TGI; a TGI ``Weight``.

    Attributes:
        qweight: int32 ``[ceil(K * bits / 32), N]``. qzeros: int32 ``[G, ceil(N * bits / 32)]``, format "gptq"
            (v1, stores ``zero - 1``). scales: ``[G, N]`` in the checkpoint's dtype. g_idx: int32 ``[K]`` with
            values in ``[0, G)``; ``G`` may exceed ``ceil(K / group_size)`` for a row-parallel shard that keeps
            the full ``scales`` (act-order).
        bits, group_size, sym: from the checkpoint's ``quantization_config``.
        dtype: the activation dtype TGI runs the model in (the kernel is chosen for it at ``get_linear``).
    """

    qweight: torch.Tensor
    qzeros: torch.Tensor
    scales: torch.Tensor
    g_idx: torch.Tensor
    bits: int
    group_size: int
    sym: bool = True
    dtype: torch.dtype | None = None

    @property
    def in_features(self) -> int:
        return int(self.g_idx.numel())

    @property
    def out_features(self) -> int:
        return int(self.scales.shape[1])

    @property
    def device(self) -> torch.device:
        return self.qweight.device

    def get_linear(self, bias: torch.Tensor | None) -> QuantLinear:
        """The layer TGI runs: a :class:`QuantLinear` holding these tensors (not copies) and ``bias``, with its
        kernel chosen through gptq-plugin's registry for ``dtype``.

        Raises:
            CheckpointError: ``bias`` does not fit the layer.
            KernelError: no registered kernel can run the layer (the message lists every kernel's reason).
        """
        layer = QuantLinear.from_tensors(self.qweight, self.qzeros, self.scales, self.g_idx, self.bits,
                                         self.group_size, self.sym, bias, n_groups=int(self.scales.shape[0]))
        layer.prepare(self.dtype or self.scales.dtype)
        return layer


# --- the WeightsLoader -----------------------------------------------------------------------------------
class GPTQPluginWeightsLoader:
    """A TGI ``WeightsLoader`` for GPTQ checkpoints (``quant_method: "gptq"``, format "gptq" or "gptq_v2") and
    compressed-tensors ``pack-quantized`` ones.

    Registered as a virtual subclass of TGI's ``WeightsLoader`` by :func:`.tgi_launcher.install`. Exposes the
    attributes TGI code reads from its own GPTQ loader (``bits``, ``groupsize``, ``desc_act``, ``sym``,
    ``quant_method``, ``quantize``).

    Args:
        config (`QuantizeConfig`): the checkpoint's quantization config.
        modules_to_not_convert (`Sequence[str]`, *optional*, defaults to ()): layers stored unquantized, which load
            as plain tensors (TGI turns them into its own unquantized linear layers). GPTQ: its
            ``quantization_config.modules_to_not_convert``, matched as TGI's own GPTQ loader matches them (a part of
            the layer's name); compressed-tensors: its ``ignore`` list (full module names, ``re:`` patterns), matched
            by the format handler as compressed-tensors matches it.
        checkpoint_format (`str`, *optional*): the on-disk format ("gptq", "gptq_v2", "compressed-tensors");
            defaults to ``config.checkpoint_format``.
    """

    quant_method = "gptq"
    quantize = "gptq"

    def __init__(self, config: QuantizeConfig, modules_to_not_convert: Sequence[str] = (),
                 checkpoint_format: str | None = None):
        self.config = config
        self.modules_to_not_convert = list(modules_to_not_convert or ())
        # the on-disk format, whose handler converts each layer to the in-memory v1 layout
        self.checkpoint_format = checkpoint_format or config.checkpoint_format
        self.handler = get_format(self.checkpoint_format)
        self.layout = layout_of(self.checkpoint_format)

    @classmethod
    def from_quantization_config(cls, d: dict[str, Any]) -> GPTQPluginWeightsLoader:
        """From a checkpoint's ``quantization_config`` object, parsed by the core's format handler. Raises
        :class:`ConfigError` for an invalid one or a format other than GPTQ v1/v2 and compressed-tensors
        pack-quantized (:class:`CheckpointError` for a compressed-tensors scheme that is not integer weight-only)."""
        handler = detect_format(d, "quantization_config")
        if handler.name not in ("gptq", "gptq_v2", _CT):
            raise ConfigError(f"quantization_config is a {handler.name} checkpoint: the gptq-plugin TGI route serves "
                              "GPTQ (v1, v2) and compressed-tensors pack-quantized checkpoints; convert it with "
                              "`gptq-plugin convert SRC DST --to gptq`")
        skip = d.get("ignore") if handler.name == _CT else d.get("modules_to_not_convert")
        return cls(handler.parse_config(d), skip or (), handler.name)

    # TGI code reads these from `weights.loader`.
    @property
    def bits(self) -> int:
        return self.config.bits

    @property
    def groupsize(self) -> int:
        return self.config.group_size

    @property
    def desc_act(self) -> bool:
        return self.config.desc_act

    @property
    def sym(self) -> bool:
        return self.config.sym

    def __repr__(self) -> str:
        c = self.config
        return (f"GPTQPluginWeightsLoader(bits={c.bits}, group_size={c.group_size}, desc_act={c.desc_act}, "
                f"sym={c.sym}, checkpoint_format={self.checkpoint_format!r})")

    # --- TGI's WeightsLoader interface ----------------------------------------------------------------------
    def get_weights(self, weights, prefix: str):
        """The whole layer ``prefix``, unsharded."""
        if self._skipped(prefix):
            return weights.get_tensor(f"{prefix}.weight")
        return self._weight(weights, prefix, self._read(weights, prefix))

    def get_weights_col_packed(self, weights, prefix: str, block_sizes: int | list[int]):
        """Layer ``prefix`` holding several layers stacked along the output dim (QKV, gate/up), each split
        across ranks: rank ``r`` takes the ``r``-th ``1/W`` of every block (``block_sizes`` as in TGI's
        ``Weights.get_packed_sharded``: a number of equal blocks or their proportions)."""
        if self._skipped(prefix):
            return weights.get_packed_sharded(f"{prefix}.weight", dim=0, block_sizes=block_sizes)
        parts = block_sizes if isinstance(block_sizes, list) else [1] * block_sizes

        def read(name, **kw):
            return weights.get_packed_sharded(name, dim=self.layout.out_dim, block_sizes=block_sizes, **kw)

        return self._weight(weights, prefix, self._read(weights, prefix, (read, parts)))

    def get_weights_col(self, weights, prefix: str):
        """Layer ``prefix`` split across ranks along the output dim."""
        return self.get_multi_weights_col(weights, [prefix], 0)

    def get_multi_weights_col(self, weights, prefixes: list[str], dim: int):
        """Layers ``prefixes`` (sharing their input, e.g. q/k/v), each split across ranks along the output dim,
        concatenated along the output dim. ``dim`` is the concatenation dim of unquantized ``[out, in]``
        weights (``qweight`` is ``[in, out]``, so quantized tensors are concatenated along dim 1)."""
        if self._skipped(prefixes[0]):
            return torch.cat([weights.get_sharded(f"{p}.weight", dim=0) for p in prefixes], dim=dim)

        def read(name, **kw):
            return weights.get_sharded(name, dim=self.layout.out_dim, **kw)

        layers = [self._read(weights, p, (read, [1])) for p in prefixes]
        for p, t in zip(prefixes[1:], layers[1:]):
            if not torch.equal(t["g_idx"], layers[0]["g_idx"]):
                raise CheckpointError(f"{p}.{self.layout.g_idx} differs from {prefixes[0]}.{self.layout.g_idx}: layers "
                                      "loaded as one fused layer must share their input-channel grouping; re-quantize "
                                      "them together")
        widths = [int(t["scales"].shape[1]) for t in layers]
        fused = {"qweight": torch.cat([t["qweight"] for t in layers], dim=1),
                 "qzeros": cat_packed([t["qzeros"] for t in layers], widths, self.config.bits, dim=1),
                 "scales": torch.cat([t["scales"] for t in layers], dim=1), "g_idx": layers[0]["g_idx"]}
        return self._weight(weights, ",".join(prefixes), fused)

    def get_weights_row(self, weights, prefix: str):
        """Layer ``prefix`` split across ranks along the input dim (each rank's output is a partial sum)."""
        if self._skipped(prefix):
            return weights.get_sharded(f"{prefix}.weight", dim=1)
        return self._weight(weights, prefix, self._read(weights, prefix, row=True))

    # --- helpers ---------------------------------------------------------------------------------------------
    def _skipped(self, prefix: str) -> bool:
        if self.checkpoint_format == _CT:
            return self.handler.is_ignored(self.modules_to_not_convert, prefix)
        return any(re.match(m[3:], prefix) if m.startswith("re:") else m in prefix
                   for m in self.modules_to_not_convert)

    def _require(self, weights, prefix: str) -> None:
        name = f"{prefix}.{self.handler.marker}"
        if not weights.has_tensor(name):
            ct = self.checkpoint_format == _CT
            hint = (f"; the checkpoint has {prefix}.weight: an unquantized layer (list it in "
                    f"quantization_config.{'ignore' if ct else 'modules_to_not_convert'} or quantize it)"
                    if weights.has_tensor(f"{prefix}.weight") else "")
            raise CheckpointError(f"{name} is missing from the checkpoint loaded with --quantize gptq{hint}")

    def _features(self, weights, prefix: str) -> tuple[int, int]:
        """``(K, N)`` of layer ``prefix`` from what is stored (compressed-tensors: ``weight_shape``; GPTQ: ``g_idx``,
        else the packed words, then the scales), after checking the packed weight's shape against them: TGI shards
        it by word, so it must hold the format's dense packing of ``K`` codes at the config's bit width."""
        L, bits = self.layout, self.config.bits
        if self.checkpoint_format == _CT:
            n, k = (int(v) for v in weights.get_tensor(f"{prefix}.weight_shape", to_dtype=False).reshape(-1).tolist())
        else:
            g_idx = f"{prefix}.{L.g_idx}"
            k = (weights.get_shape(g_idx)[0] if weights.has_tensor(g_idx)
                 else weights.get_shape(f"{prefix}.{L.weight}")[0] * 32 // bits)  # exact for whole words only
            n = weights.get_shape(f"{prefix}.{L.scales}")[L.out_dim]
        shape, want = list(weights.get_shape(f"{prefix}.{L.weight}")), [packed_rows(k, bits), n]
        if L.out_dim == 0:
            want.reverse()
        if shape != want:
            name = self.handler.config_names[0]
            raise CheckpointError(
                f"{prefix}.{L.weight} has shape {shape}, expected {want} for {k} input and {n} output channels at "
                f"{name}={bits}: the config's {name} does not match the tensors, or (3 bits) the codes use "
                f"compressed-tensors' older packing; rewrite it with `gptq-plugin convert SRC DST --to "
                f"{self.checkpoint_format}`")
        return k, n

    def _read(self, weights, prefix: str, col: tuple[Callable, list[int]] | None = None, row: bool = False
              ) -> dict[str, torch.Tensor]:
        """This rank's shard of layer ``prefix`` in the in-memory GPTQ v1 layout (``qweight``, ``qzeros``, ``scales``,
        ``g_idx``), read in the checkpoint's layout (:mod:`gptq_plugin.sharding`) and converted by its handler.

        Args:
            col: column-parallel: ``(read, parts)``, ``read(name, **kw)`` reading a tensor's output channels the
                way the caller's TGI method shards them, and the proportions of the blocks stacked along them.
            row: row-parallel: split the input channels. Neither: the whole layer.
        """
        self._require(weights, prefix)
        L, bits, gs = self.layout, self.config.bits, self.config.group_size
        rank, world = _rank_world(weights)
        k, n = self._features(weights, prefix)
        weight, scales, zeros, g_leaf = (f"{prefix}.{leaf}" for leaf in (L.weight, L.scales, L.zeros, L.g_idx))
        has_zeros = weights.has_tensor(zeros)
        g_idx = weights.get_tensor(g_leaf) if weights.has_tensor(g_leaf) else default_g_idx(k, gs)
        t: dict[str, torch.Tensor] = {}
        if col is not None:
            read, parts = col
            ranges = block_ranges(n, parts, rank, world, weight)
            t[L.weight], t[L.scales] = read(weight), read(scales, to_dtype=False)
            if has_zeros:
                t[L.zeros] = self._zeros_cols(weights, zeros, n, ranges, parts, read)
            n = sum(b - a for a, b in ranges)
        elif row:
            shard = RowShard.of(k, gs, rank, world, weight)
            if shard.word_aligned(bits):
                t[L.weight] = weights.get_sharded(weight, dim=L.in_dim)
            else:  # shard boundaries inside words: repack the codes
                t[L.weight] = slice_codes(weights.get_tensor(weight), bits, k, [(shard.lo, shard.hi)], L.in_dim)
            g_idx = g_idx[shard.lo: shard.hi]
            split = shard.groups(g_idx) is not None  # whole groups in input order: shard them too, else keep all

            def groups_of(name, **kw):
                return weights.get_sharded(name, dim=L.in_dim, **kw) if split else weights.get_tensor(name, **kw)

            t[L.scales] = groups_of(scales, to_dtype=False)
            if has_zeros:
                t[L.zeros] = groups_of(zeros)
            g_idx, k = shard.local_g_idx(g_idx, split), shard.size
        else:
            t[L.weight], t[L.scales] = weights.get_tensor(weight), weights.get_tensor(scales, to_dtype=False)
            if has_zeros:
                t[L.zeros] = weights.get_tensor(zeros)
        s = t[L.scales]
        if s.dim() != 2 or g_idx.dim() != 1:
            raise CheckpointError(f"{prefix}: {L.scales} {tuple(s.shape)} and {L.g_idx} {tuple(g_idx.shape)} must be "
                                  "2-D and 1-D: corrupt checkpoint")
        groups = int(s.shape[L.in_dim])
        if groups < num_groups(k, gs) and k:
            raise CheckpointError(f"{scales} has {groups} groups, fewer than the {num_groups(k, gs)} that {k} input "
                                  f"channels need at group_size={gs}")
        check_g_idx_range(g_idx, groups, g_leaf, gs)  # before the int32 cast: no wrap-around
        t[L.g_idx] = g_idx.to(device=t[L.weight].device, dtype=torch.int32)
        extra: dict[str, Any] = {}
        if self.checkpoint_format == _CT:
            t["weight_shape"] = torch.tensor([n, k], dtype=torch.int64)
            extra["n_groups"] = groups
        out = self.handler.to_internal(t, self.config, prefix, **extra)
        return {leaf: out[leaf] for leaf in _LEAVES}

    def _zeros_cols(self, weights, name: str, n: int, ranges: list[tuple[int, int]], parts: list[int],
                    read: Callable[[str], torch.Tensor]) -> torch.Tensor:
        """The zero-point words of this rank's output ``ranges`` (of ``n``): read through TGI's word-level sharding
        when it selects exactly those channels' words, else by unpacking the whole tensor, slicing the codes and
        repacking them."""
        bits = self.config.bits
        rank, world = _rank_world(weights)
        try:
            tgi_words = block_ranges(packed_rows(n, bits), parts, rank, world, name)
        except CheckpointError:
            tgi_words = None
        if tgi_words is not None and word_ranges(ranges, n, bits) == tgi_words:
            return read(name)
        return slice_codes(weights.get_tensor(name), bits, n, ranges, dim=self.layout.out_dim)

    def _weight(self, weights, prefix: str, t: dict[str, torch.Tensor]) -> GPTQPluginWeight:
        """The layer from this rank's in-memory v1 tensors, checked by the core's validator (the shard may keep every
        group of the layer)."""
        bits, gs = self.config.bits, self.config.group_size
        check_internal(prefix, t, bits, gs, n_groups=int(t["scales"].shape[0]), names=self.handler.internal_names)
        return GPTQPluginWeight(t["qweight"], t["qzeros"], t["scales"], t["g_idx"], bits, gs, self.config.sym,
                                getattr(weights, "dtype", None))


def _rank_world(weights) -> tuple[int, int]:
    pg = weights.process_group
    return int(pg.rank()), int(pg.size())
