"""Text Generation Inference (TGI): a ``WeightsLoader`` that loads GPTQ layers for TGI's server through
gptq-plugin's kernel registry.

TGI's Python server (``text_generation_server``, the ``server/`` folder of huggingface/text-generation-inference)
asks a ``WeightsLoader`` (``utils/weights.py``) for every linear layer of a model; the one it uses comes from
``utils/quantization.py:get_loader()``. :class:`GPTQPluginWeightsLoader` reads ``qweight``/``qzeros``/``scales``/
``g_idx`` through TGI's ``Weights`` object, sharded for tensor parallelism the way TGI's own GPTQ loader shards
them, and returns :class:`GPTQPluginWeight` objects whose ``get_linear(bias)`` is a :class:`gptq_plugin.QuantLinear`
(so every forward runs the kernel gptq-plugin's registry chooses: 2/3/4/8 bits, act-order, asymmetric).
:mod:`gptq_plugin.adapters.tgi_launcher` routes TGI's ``get_loader(quantize="gptq", ...)`` here.

Nothing here imports TGI: the loader only calls methods of the ``Weights`` object it is given (``get_tensor``,
``get_sharded``, ``get_packed_sharded``, ``has_tensor``, ``get_shape``, ``process_group``).

Sharding (TGI ``GPTQWeightsLoader`` conventions, rank ``r`` of ``W`` ranks, ``K`` inputs, ``N`` outputs):

* column-parallel (``get_weights_col_packed``, ``get_multi_weights_col``): each rank takes the same slice of
  output channels of ``qweight``, ``scales`` and ``qzeros`` (``qzeros`` packs output channels, so its slice is
  taken in words where TGI's word-level slicing selects exactly those channels, else by unpacking, slicing codes
  and repacking); ``g_idx`` is read whole.
* row-parallel (``get_weights_row``): rank ``r`` takes input channels ``[r*K/W, (r+1)*K/W)`` of ``qweight`` and
  ``g_idx``. When those channels' groups are in input order and the shard holds whole groups, ``scales``/``qzeros``
  are sharded by group and ``g_idx`` is shifted to start at 0 (as TGI does); otherwise (act-order, a group
  straddling two shards, ``group_size=-1``) every rank keeps the full ``scales``/``qzeros`` and the absolute
  ``g_idx`` (as TGI does for act-order), which is exact for any ``g_idx``.

compressed-tensors ``pack-quantized`` checkpoints (``weight_packed [N, K*bits/32]``, ``weight_scale [N, G]``,
``weight_zero_point [N*bits/32, G]``, ``weight_g_idx``, ``weight_shape``: the GPTQ tensors transposed) are sharded the
same way with the dims swapped (column-parallel: dim 0 of every tensor; row-parallel: the packed input dim 1 of
``weight_packed`` and the group dim 1 of ``weight_scale``/``weight_zero_point``); each layer is then converted to the
GPTQ layout by the core's format handler (``to_internal``), so fused layers and kernels are the GPTQ path's.
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
from gptq_plugin.packing import default_g_idx, num_groups, pack_dim0, packed_rows, unpack_dim0

_CT = "compressed-tensors"  # the core's compressed-tensors pack-quantized format handler


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
            KernelError: no registered kernel can run the layer (the message lists every kernel's reason).
        """
        layer = QuantLinear(0, 0, self.bits, self.group_size, bias=bias is not None, sym=self.sym,
                            dtype=self.scales.dtype, device="meta")
        layer.in_features, layer.out_features = self.in_features, self.out_features
        layer.qweight, layer.qzeros, layer.scales, layer.g_idx = self.qweight, self.qzeros, self.scales, self.g_idx
        if bias is not None:
            layer.bias = bias
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
        modules_to_not_convert (`Sequence[str]`, *optional*, defaults to ()): prefixes of layers stored
            unquantized (``quantization_config.modules_to_not_convert``; compressed-tensors: its ``ignore`` list,
            names or ``re:`` patterns); they load as plain tensors, which TGI turns into its own unquantized
            linear layers.
        checkpoint_format (`str`, *optional*): the on-disk format ("gptq", "gptq_v2", "compressed-tensors");
            defaults to ``config.checkpoint_format``.
    """

    quant_method = "gptq"
    quantize = "gptq"

    def __init__(self, config: QuantizeConfig, modules_to_not_convert: Sequence[str] = (),
                 checkpoint_format: str | None = None):
        self.config = config
        self.modules_to_not_convert = list(modules_to_not_convert or ())
        # the on-disk format, whose handler (gptq_plugin.formats) converts each layer to the in-memory v1 layout
        self.checkpoint_format = checkpoint_format or config.checkpoint_format

    @classmethod
    def from_quantization_config(cls, d: dict[str, Any]) -> GPTQPluginWeightsLoader:
        """From a checkpoint's ``quantization_config`` object, parsed by the core's format handler. Raises
        :class:`ConfigError` for an invalid one or a format other than GPTQ v1/v2 and compressed-tensors
        pack-quantized (:class:`CheckpointError` for a compressed-tensors scheme that is not integer weight-only)."""
        from gptq_plugin.formats import detect_format

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
        if self.checkpoint_format == _CT:
            return self._weight(weights, prefix, **self._ct_layer(weights, prefix), fmt="gptq")
        self._require(weights, prefix)
        qweight = weights.get_tensor(f"{prefix}.qweight")
        scales = weights.get_tensor(f"{prefix}.scales", to_dtype=False)
        return self._weight(weights, prefix, qweight, weights.get_tensor(f"{prefix}.qzeros"), scales,
                            self._g_idx(weights, prefix, qweight, scales))

    def get_weights_col_packed(self, weights, prefix: str, block_sizes: int | list[int]):
        """Layer ``prefix`` holding several layers stacked along the output dim (QKV, gate/up), each split
        across ranks: rank ``r`` takes the ``r``-th ``1/W`` of every block (``block_sizes`` as in TGI's
        ``Weights.get_packed_sharded``: a number of equal blocks or their proportions)."""
        if self._skipped(prefix):
            return weights.get_packed_sharded(f"{prefix}.weight", dim=0, block_sizes=block_sizes)
        parts = block_sizes if isinstance(block_sizes, list) else [1] * block_sizes
        if self.checkpoint_format == _CT:
            def read(name, **kw):
                return weights.get_packed_sharded(name, dim=0, block_sizes=block_sizes, **kw)

            return self._weight(weights, prefix, **self._ct_layer(weights, prefix, (read, parts)), fmt="gptq")
        self._require(weights, prefix)
        rank, world = _rank_world(weights)
        n = weights.get_shape(f"{prefix}.scales")[1]
        _packed_ranges(n, parts, rank, world, f"{prefix}.qweight")  # a clear error for a split TGI cannot do
        qweight = weights.get_packed_sharded(f"{prefix}.qweight", dim=1, block_sizes=block_sizes)
        scales = weights.get_packed_sharded(f"{prefix}.scales", dim=1, block_sizes=block_sizes, to_dtype=False)
        qzeros = self._qzeros_cols(weights, f"{prefix}.qzeros", n, parts, rank, world,
                                   lambda name: weights.get_packed_sharded(name, dim=1, block_sizes=block_sizes))
        return self._weight(weights, prefix, qweight, qzeros, scales, self._g_idx(weights, prefix, qweight, scales))

    def get_weights_col(self, weights, prefix: str):
        """Layer ``prefix`` split across ranks along the output dim."""
        return self.get_multi_weights_col(weights, [prefix], 0)

    def get_multi_weights_col(self, weights, prefixes: list[str], dim: int):
        """Layers ``prefixes`` (sharing their input, e.g. q/k/v), each split across ranks along the output dim,
        concatenated along the output dim. ``dim`` is the concatenation dim of unquantized ``[out, in]``
        weights (``qweight`` is ``[in, out]``, so quantized tensors are concatenated along dim 1)."""
        if self._skipped(prefixes[0]):
            return torch.cat([weights.get_sharded(f"{p}.weight", dim=0) for p in prefixes], dim=dim)
        rank, world = _rank_world(weights)
        qweights, scales, qzeros, g_idxs = [], [], [], []
        ct = self.checkpoint_format == _CT
        for p in prefixes:
            if ct:  # each layer converted to the in-memory v1 layout, then concatenated like GPTQ ones
                t = self._ct_layer(weights, p, (lambda name, **kw: weights.get_sharded(name, dim=0, **kw), [1]))
                for acc, key in ((qweights, "qweight"), (scales, "scales"), (qzeros, "qzeros"), (g_idxs, "g_idx")):
                    acc.append(t[key])
                continue
            self._require(weights, p)
            n = weights.get_shape(f"{p}.scales")[1]
            _check_divisible(f"{p}.scales", "output channels", n, world)
            qweights.append(weights.get_sharded(f"{p}.qweight", dim=1))
            scales.append(weights.get_sharded(f"{p}.scales", dim=1, to_dtype=False))
            qzeros.append(self._qzeros_cols(weights, f"{p}.qzeros", n, [1], rank, world,
                                            lambda name: weights.get_sharded(name, dim=1)))
            g_idxs.append(self._g_idx(weights, p, qweights[-1], scales[-1]))
        for p, g in zip(prefixes[1:], g_idxs[1:]):
            if not torch.equal(g, g_idxs[0]):
                raise CheckpointError(f"{p}.g_idx differs from {prefixes[0]}.g_idx: layers loaded as one fused "
                                      "layer must share their input-channel grouping; re-quantize them together")
        widths = [s.shape[1] for s in scales]
        return self._weight(weights, ",".join(prefixes), torch.cat(qweights, dim=1),
                            _cat_packed_cols(qzeros, widths, self.config.bits), torch.cat(scales, dim=1), g_idxs[0],
                            fmt="gptq" if ct else None)

    def get_weights_row(self, weights, prefix: str):
        """Layer ``prefix`` split across ranks along the input dim (each rank's output is a partial sum)."""
        if self._skipped(prefix):
            return weights.get_sharded(f"{prefix}.weight", dim=1)
        if self.checkpoint_format == _CT:
            return self._weight(weights, prefix, **self._ct_layer(weights, prefix, row=True), fmt="gptq")
        self._require(weights, prefix)
        rank, world = _rank_world(weights)
        bits, gs = self.config.bits, self.config.group_size
        has_g_idx = weights.has_tensor(f"{prefix}.g_idx")
        if has_g_idx:
            k = weights.get_shape(f"{prefix}.g_idx")[0]
        else:
            k = weights.get_shape(f"{prefix}.qweight")[0] * 32 // bits
        _check_divisible(f"{prefix}.qweight", "input channels", k, world)
        shard = k // world
        lo, hi = rank * shard, (rank + 1) * shard
        if world == 1 or (shard * bits) % 32 == 0:  # shard boundaries fall on word boundaries
            qweight = weights.get_sharded(f"{prefix}.qweight", dim=0)
        else:
            full = weights.get_tensor(f"{prefix}.qweight")  # shard boundaries inside words: repack the codes
            qweight = pack_dim0(unpack_dim0(full, bits, k)[lo:hi], bits)
        if has_g_idx:
            g_idx = weights.get_sharded(f"{prefix}.g_idx", dim=0)
        else:
            g_idx = default_g_idx(k, gs).to(qweight.device)[lo:hi]
        in_order = gs != -1 and torch.equal(
            g_idx.long().cpu(), torch.arange(lo, hi) // gs)
        if world > 1 and in_order and shard % gs == 0:  # whole groups in input order: shard scales/qzeros too
            scales = weights.get_sharded(f"{prefix}.scales", dim=0, to_dtype=False)
            qzeros = weights.get_sharded(f"{prefix}.qzeros", dim=0)
            g_idx = g_idx - g_idx[0]
        else:  # act-order, straddling groups or one group: keep all groups, g_idx absolute
            scales = weights.get_tensor(f"{prefix}.scales", to_dtype=False)
            qzeros = weights.get_tensor(f"{prefix}.qzeros")
        return self._weight(weights, prefix, qweight, qzeros, scales, g_idx)

    # --- helpers ---------------------------------------------------------------------------------------------
    def _skipped(self, prefix: str) -> bool:
        return any(re.match(m[3:], prefix) if m.startswith("re:") else m in prefix
                   for m in self.modules_to_not_convert)

    def _require(self, weights, prefix: str) -> None:
        ct = self.checkpoint_format == _CT
        name = f"{prefix}.{'weight_packed' if ct else 'qweight'}"
        if not weights.has_tensor(name):
            hint = (f"; the checkpoint has {prefix}.weight: an unquantized layer (list it in "
                    f"quantization_config.{'ignore' if ct else 'modules_to_not_convert'} or quantize it)"
                    if weights.has_tensor(f"{prefix}.weight") else "")
            raise CheckpointError(f"{name} is missing from the checkpoint loaded with --quantize gptq{hint}")

    def _ct_layer(self, weights, prefix: str, col: tuple[Callable, list[int]] | None = None, row: bool = False
                  ) -> dict[str, torch.Tensor]:
        """This rank's shard of compressed-tensors layer ``prefix`` in the in-memory GPTQ v1 layout (``qweight``,
        ``qzeros``, ``scales``, ``g_idx``), converted by the core's handler.

        Args:
            col: column-parallel: ``(read, parts)``, ``read(name, **kw)`` reading dim 0 of a tensor sharded the way
                the caller's TGI method shards it, and the proportions of the blocks stacked along the outputs.
            row: row-parallel: split the input channels.
            Neither: the whole layer.
        """
        from gptq_plugin.formats import get_format

        self._require(weights, prefix)
        bits, gs = self.config.bits, self.config.group_size
        rank, world = _rank_world(weights)
        packed, scale, zero = (f"{prefix}.{leaf}" for leaf in ("weight_packed", "weight_scale", "weight_zero_point"))
        n, k = (int(v) for v in weights.get_tensor(f"{prefix}.weight_shape", to_dtype=False).reshape(-1).tolist())
        shape = list(weights.get_shape(packed))
        if shape != [n, packed_rows(k, bits)]:
            raise CheckpointError(
                f"{packed} has shape {shape}, expected [{n}, {packed_rows(k, bits)}] for weight_shape [{n}, {k}] at "
                f"num_bits={bits}: config_groups num_bits does not match the tensors, or (3 bits) the codes use "
                "compressed-tensors' older packing; rewrite it with "
                "`gptq-plugin convert SRC DST --to compressed-tensors`")
        has_zero = weights.has_tensor(zero)
        if weights.has_tensor(f"{prefix}.weight_g_idx"):
            g_idx = weights.get_tensor(f"{prefix}.weight_g_idx")
        else:
            g_idx = default_g_idx(k, gs)
        t: dict[str, torch.Tensor] = {}
        n_groups = None  # ceil(k_local / group_size), unless a row shard keeps every group
        if col is not None:
            read, parts = col
            ranges = _packed_ranges(n, parts, rank, world, packed)
            t["weight_packed"], t["weight_scale"] = read(packed), read(scale, to_dtype=False)
            if has_zero:
                t["weight_zero_point"] = self._qzeros_cols(weights, zero, n, parts, rank, world, read, dim=0)
            n, k_local = sum(b - a for a, b in ranges), k
        elif row:
            _check_divisible(packed, "input channels", k, world)
            k_local = k // world
            lo, hi = rank * k_local, (rank + 1) * k_local
            if world == 1 or (k_local * bits) % 32 == 0:  # shard boundaries fall on word boundaries
                t["weight_packed"] = weights.get_sharded(packed, dim=1)
            else:  # shard boundaries inside words: repack the codes
                codes = unpack_dim0(weights.get_tensor(packed).t().contiguous(), bits, k)[lo:hi]
                t["weight_packed"] = pack_dim0(codes, bits).t().contiguous()
            g_idx = g_idx[lo:hi]
            in_order = gs != -1 and torch.equal(g_idx.long().cpu(), torch.arange(lo, hi) // gs)
            if world > 1 and in_order and k_local % gs == 0:  # whole groups in input order: shard them too
                t["weight_scale"] = weights.get_sharded(scale, dim=1, to_dtype=False)
                if has_zero:
                    t["weight_zero_point"] = weights.get_sharded(zero, dim=1)
                g_idx = g_idx - g_idx[0]
            else:  # act-order, straddling groups or one group: keep all groups, g_idx absolute
                t["weight_scale"] = weights.get_tensor(scale, to_dtype=False)
                if has_zero:
                    t["weight_zero_point"] = weights.get_tensor(zero)
                n_groups = int(t["weight_scale"].shape[1])
        else:
            t["weight_packed"] = weights.get_tensor(packed)
            t["weight_scale"] = weights.get_tensor(scale, to_dtype=False)
            if has_zero:
                t["weight_zero_point"] = weights.get_tensor(zero)
            k_local = k
        t["weight_g_idx"] = g_idx.to(device=t["weight_packed"].device, dtype=torch.int32)
        t["weight_shape"] = torch.tensor([n, k_local], dtype=torch.int64)
        out = get_format(_CT).to_internal(t, self.config, prefix, n_groups=n_groups)
        return {key: out[key] for key in ("qweight", "qzeros", "scales", "g_idx")}

    def _g_idx(self, weights, prefix: str, qweight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
        name = f"{prefix}.g_idx"
        if weights.has_tensor(name):
            return weights.get_tensor(name)
        k = qweight.shape[0] * 32 // self.config.bits  # exact when g_idx is absent only for whole words
        return default_g_idx(k, self.config.group_size).to(qweight.device)

    def _qzeros_cols(self, weights, name: str, n: int, parts: list[int], rank: int, world: int,
                     read_sharded: Callable[[str], torch.Tensor], dim: int = 1) -> torch.Tensor:
        """The ``qzeros`` words of this rank's output channels (``n`` in blocks proportional to ``parts``, each
        split in ``world``): read through TGI's word-level sharding when it selects exactly those channels' words,
        else by unpacking the whole tensor, slicing the codes and repacking them. ``dim``: the packed (output) dim,
        1 for GPTQ's ``qzeros [G, words]``, 0 for compressed-tensors' ``weight_zero_point [words, G]``."""
        bits = self.config.bits
        ranges = _packed_ranges(n, parts, rank, world, name)
        words = packed_rows(n, bits)
        try:
            word_ranges = _packed_ranges(words, parts, rank, world, name)
        except CheckpointError:
            word_ranges = None
        if word_ranges is not None and all(
                wa * 32 == a * bits and (wb * 32 == b * bits or (b == n and wb == words))
                for (a, b), (wa, wb) in zip(ranges, word_ranges)):
            return read_sharded(name)
        full = weights.get_tensor(name)  # [G, ceil(n * bits / 32)] (dim 1) or its transpose (dim 0)
        codes = unpack_dim0(full.t().contiguous() if dim == 1 else full, bits, n)  # stored values [n, G]
        codes = torch.cat([codes[a:b] for a, b in ranges])
        packed = pack_dim0(codes, bits)
        return packed.t().contiguous() if dim == 1 else packed

    def _weight(self, weights, prefix: str, qweight, qzeros, scales, g_idx, fmt: str | None = None
                ) -> GPTQPluginWeight:
        """The layer from GPTQ-layout tensors whose ``qzeros`` are in format ``fmt`` (default: the checkpoint's)."""
        from gptq_plugin.formats import get_format
        from gptq_plugin.validate import check_g_idx_range, check_internal

        bits, gs = self.config.bits, self.config.group_size
        if scales.dim() != 2 or g_idx.dim() != 1:
            raise CheckpointError(f"{prefix}: scales {tuple(scales.shape)} and g_idx {tuple(g_idx.shape)} must be "
                                  "[groups, out_features] and [in_features]: corrupt checkpoint")
        k, groups = int(g_idx.numel()), int(scales.shape[0])
        if groups < num_groups(k, gs) and k:
            raise CheckpointError(f"{prefix}.scales has {groups} groups, fewer than the {num_groups(k, gs)} "
                                  f"that {k} input channels need at group_size={gs}")
        check_g_idx_range(g_idx, groups, f"{prefix}.g_idx", gs)  # before the int32 cast: no wrap-around
        g_idx = g_idx.to(torch.int32)
        stored = {"qweight": qweight, "qzeros": qzeros, "scales": scales, "g_idx": g_idx}
        qzeros = get_format(fmt or self.checkpoint_format).to_internal(stored, self.config, prefix)["qzeros"]
        # the core's validator on this rank's shard (which may keep every group of the layer: n_groups)
        check_internal(prefix, {"qweight": qweight, "qzeros": qzeros, "scales": scales, "g_idx": g_idx}, bits, gs,
                       n_groups=groups)
        return GPTQPluginWeight(qweight, qzeros, scales, g_idx, bits, gs, self.config.sym,
                                getattr(weights, "dtype", None))


def _rank_world(weights) -> tuple[int, int]:
    pg = weights.process_group
    return int(pg.rank()), int(pg.size())


def _cat_packed_cols(qzeros: list[torch.Tensor], widths: list[int], bits: int) -> torch.Tensor:
    """Concatenate ``qzeros`` of layers with ``widths`` output channels: word by word when every layer but the
    last fills whole words, else code by code."""
    if all(w * bits % 32 == 0 for w in widths[:-1]):
        return torch.cat(qzeros, dim=1)
    codes = [unpack_dim0(q.t().contiguous(), bits, w) for q, w in zip(qzeros, widths)]  # stored values [w, G]
    return pack_dim0(torch.cat(codes), bits).t().contiguous()


def _check_divisible(name: str, what: str, size: int, world: int) -> None:
    if size % world:
        raise CheckpointError(f"{name}: {size} {what} cannot be split evenly across {world} tensor-parallel "
                              f"shards; use a number of shards that divides {size}")


def _packed_ranges(n: int, parts: list[int], rank: int, world: int, name: str) -> list[tuple[int, int]]:
    """The ``[start, stop)`` ranges of ``n`` channels that rank ``rank`` takes when they stack blocks proportional
    to ``parts`` (TGI's ``get_packed_sharded``; ``[1]`` for one layer), each block split in ``world`` shards."""
    if n % sum(parts):
        raise CheckpointError(f"{name}: {n} output channels cannot be split in blocks proportional to {parts}")
    ranges, start = [], 0
    for p in parts:
        size = n // sum(parts) * p
        _check_divisible(name, "output channels of a packed block", size, world)
        ranges.append((start + rank * size // world, start + (rank + 1) * size // world))
        start += size
    return ranges
