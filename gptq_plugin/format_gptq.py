"""GPTQ checkpoint formats: ``gptq`` (v1, AutoGPTQ/GPTQModel: ``qzeros`` store ``zero - 1``) and ``gptq_v2``
(GPTQModel: ``qzeros`` store ``zero``), and the zero-point check that tells a mislabelled one.

Per quantized linear ``L`` (``K`` inputs, ``N`` outputs, ``G`` groups): ``L.qweight`` int32
``[ceil(K * bits / 32), N]``, ``L.qzeros`` int32 ``[G, ceil(N * bits / 32)]``, ``L.scales`` fp16 ``[G, N]``,
``L.g_idx`` int32 ``[K]``, ``L.bias`` if any (see :mod:`gptq_plugin.packing`). The in-memory layout is v1.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from typing import Iterable, Mapping

import torch

from .config import QuantizeConfig
from .errors import CheckpointError
from .formats import CheckpointFormat, require_leaves, shape_of
from .packing import num_groups, pack_qzeros, packed_rows, unpack_dim0, unpack_qzeros

log = logging.getLogger(__name__)

GPTQ_LEAVES = ("qweight", "qzeros", "scales", "g_idx")


def _gptq_dims(tensors: Mapping[str, torch.Tensor], bits: int, name: str) -> tuple[int, int]:
    """``(in_features, out_features)`` of a GPTQ layer: ``K`` from ``g_idx``, ``N`` from ``scales``."""
    g_idx, scales = tensors["g_idx"], tensors["scales"]
    if g_idx.dim() != 1:
        raise CheckpointError(f"tensor {name}.g_idx has shape {tuple(g_idx.shape)}, expected one dimension [in_features]")
    if scales.dim() != 2:
        raise CheckpointError(f"tensor {name}.scales has shape {tuple(scales.shape)}, expected [groups, out_features]")
    return int(g_idx.numel()), int(scales.shape[1])


def _zero_words(qzeros: torch.Tensor, bits: int, n: int, name: str) -> torch.Tensor:
    """The fields of ``qzeros`` ``[G, ceil(n * bits / 32)]`` as stored (no v1 shift): int32 ``[G, n]``."""
    if qzeros.dtype != torch.int32 or qzeros.dim() != 2 or qzeros.shape[1] != packed_rows(n, bits):
        raise CheckpointError(f"tensor {name}.qzeros has shape {tuple(qzeros.shape)} and dtype {qzeros.dtype}, which "
                              f"does not fit bits={bits}, out_features={n} (expected int32 [groups, "
                              f"{packed_rows(n, bits)}]): the checkpoint does not match its quantization_config")
    return unpack_dim0(qzeros.t().contiguous(), bits, n).t()


def _word_pattern(bits: int) -> int:
    """``0x11111111`` for 4 bits: a 1 in the lowest bit of every field of an int32 word (2/4/8 bits)."""
    return sum(1 << (bits * i) for i in range(32 // bits))


def _gptqmodel_v1(cfg: QuantizeConfig) -> bool:
    """GPTQModel writes v1 ``qzeros`` by subtracting ``0x11111111`` from whole int32 words (2/4/8 bits), so a zero
    point of 0 borrows from the next field; it reads them back by adding the same word."""
    quantizer = cfg.meta.get("source_quantizer") or []
    if isinstance(quantizer, str):
        quantizer = [quantizer]
    return cfg.bits in (2, 4, 8) and any(str(q).lower().startswith("gptqmodel") for q in quantizer)


class _GPTQFormat(CheckpointFormat):
    marker = "qweight"
    leaves = GPTQ_LEAVES
    scale_leaf = "scales"
    g_idx_leaf = "g_idx"

    def required_leaves(self, cfg):
        return GPTQ_LEAVES

    def layer_features(self, cfg, name, meta):
        """``K`` from ``g_idx`` (else from ``qweight``'s rows when they hold whole codes), ``N`` from ``qweight``."""
        qweight, g_idx = meta[self.marker], meta.get("g_idx")
        if len(shape_of(qweight)) != 2:
            raise CheckpointError(f"tensor {name}.qweight has shape {shape_of(qweight)}, expected two dimensions "
                                  "[ceil(in_features * bits / 32), out_features]: corrupt checkpoint")
        rows, n = (int(v) for v in shape_of(qweight))
        if g_idx is not None:
            if len(shape_of(g_idx)) != 1:
                raise CheckpointError(f"tensor {name}.g_idx has shape {shape_of(g_idx)}, expected one dimension "
                                      "[in_features]: corrupt checkpoint")
            return int(shape_of(g_idx)[0]), n
        if (rows * 32) % cfg.bits:
            raise CheckpointError(f"tensor {name}.g_idx is missing and {name}.qweight has {rows} rows, which is no "
                                  f"whole number of {cfg.bits}-bit codes: add g_idx to the checkpoint")
        return rows * 32 // cfg.bits, n

    def config_hint(self, leaf):
        return {"qweight": "bits contradicts the tensors", "scales": "group_size contradicts the tensors",
                "qzeros": "bits or group_size contradicts the tensors"}.get(leaf, "corrupt tensor")

    def detect(self, qcfg: Mapping) -> bool:
        method = str(qcfg.get("quant_method", "gptq")).lower()
        if method not in ("gptq", "gptq_plugin", "gptq-plugin"):
            return False
        return str(qcfg.get("checkpoint_format") or qcfg.get("format") or "gptq").lower() == self.name

    def expected_tensors(self, cfg, in_features, out_features):
        g = num_groups(in_features, cfg.group_size)
        return {"qweight": ((packed_rows(in_features, cfg.bits), out_features), torch.int32),
                "qzeros": ((g, packed_rows(out_features, cfg.bits)), torch.int32),
                "scales": ((g, out_features), None),
                "g_idx": ((in_features,), torch.int32)}

    def parse_config(self, qcfg: Mapping) -> QuantizeConfig:
        if qcfg.get("is_marlin_format"):
            raise CheckpointError("quantization_config.is_marlin_format is true: Marlin-repacked weights are not the "
                                  "GPTQ layout; re-export the model in the 'gptq' format")
        pack_dtype = str(qcfg.get("pack_dtype", "int32")).replace("torch.", "")
        if pack_dtype != "int32":
            raise CheckpointError(f"quantization_config.pack_dtype={pack_dtype!r}: only int32 packing words are "
                                  "supported; re-export the checkpoint with pack_dtype int32")
        cfg = QuantizeConfig.from_dict(dict(qcfg, checkpoint_format=self.name))
        meta = dict(cfg.meta, source_format=self.name)
        return dataclasses.replace(cfg, checkpoint_format="gptq", meta=meta)

    def prepare(self, cfg, layers):
        wide = sorted({str(t["scales"].dtype).replace("torch.", "") for t in layers.values()} - {"float16"})
        if wide:
            log.warning("scales are kept in %s (fp16, the usual GPTQ dtype, would round them): the plugin and "
                        "loaders that cast on load (vLLM, GPTQModel) read them; strict fp16 readers may not",
                        ", ".join(wide))
        return cfg

    def config_dict(self, cfg, layers, keys) -> dict:
        meta = {k: v for k, v in cfg.meta.items() if k not in ("source_format",)}
        return dataclasses.replace(cfg, checkpoint_format=self.name, meta=meta).to_dict()

    def _stored_to_true(self, qzeros: torch.Tensor, cfg: QuantizeConfig, n: int, name: str) -> torch.Tensor:
        raise NotImplementedError

    def to_internal(self, tensors, cfg, name):
        require_leaves(tensors, name, self.leaves)
        k, n = _gptq_dims(tensors, cfg.bits, name)
        out = {leaf: tensors[leaf] for leaf in self.leaves}
        out["qzeros"] = pack_qzeros(self._stored_to_true(tensors["qzeros"], cfg, n, name), cfg.bits, "gptq")
        if "bias" in tensors:
            out["bias"] = tensors["bias"]
        return out


class GPTQv1Format(_GPTQFormat):
    """AutoGPTQ's and GPTQModel's ``"gptq"`` format: ``qzeros`` store ``zero - 1`` (the in-memory layout).

    Files written by GPTQModel (``meta.quantizer`` names it) with 2, 4 or 8 bits are read the way GPTQModel
    wrote them: whole-word arithmetic, so an asymmetric zero point of 0 and its neighbour read back exactly.
    """

    name = "gptq"

    def _stored_to_true(self, qzeros, cfg, n, name):
        if _gptqmodel_v1(cfg):
            _zero_words(qzeros, cfg.bits, n, name)  # shape check
            words = (qzeros.to(torch.int64) + _word_pattern(cfg.bits)) & 0xFFFFFFFF
            words = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)
            return _zero_words(words, cfg.bits, n, name)
        return (_zero_words(qzeros, cfg.bits, n, name) + 1) % (2**cfg.bits)

    def to_internal(self, tensors, cfg, name):
        if not _gptqmodel_v1(cfg):  # already the in-memory layout: check the shape, keep the tensor
            require_leaves(tensors, name, self.leaves)
            _zero_words(tensors["qzeros"], cfg.bits, _gptq_dims(tensors, cfg.bits, name)[1], name)
            return {leaf: tensors[leaf] for leaf in (*self.leaves, "bias") if leaf in tensors}
        return super().to_internal(tensors, cfg, name)

    def prepare(self, cfg, layers):
        cfg = super().prepare(cfg, layers)
        hit = [p for p, t in layers.items()
               if bool((unpack_qzeros(t["qzeros"], cfg.bits, int(t["scales"].shape[1]), "gptq") == 0).any())]
        if hit:
            log.warning("%d layers (e.g. %s) have a zero point of 0, which v1 stores as %d: readers that add 1 "
                        "without wrap-around (vLLM's and TGI's GPTQ kernels) or carry across fields (GPTQModel) read "
                        "it wrongly; write checkpoint_format gptq_v2 for those runtimes", len(hit), hit[0],
                        2**cfg.bits - 1)
        return cfg

    def from_internal(self, tensors, cfg, name):
        return {leaf: v for leaf, v in tensors.items() if leaf in (*self.leaves, "bias")}


class GPTQv2Format(_GPTQFormat):
    """GPTQModel's ``"gptq_v2"`` format: ``qzeros`` store ``zero``."""

    name = "gptq_v2"

    def _stored_to_true(self, qzeros, cfg, n, name):
        return _zero_words(qzeros, cfg.bits, n, name)

    def from_internal(self, tensors, cfg, name):
        out = {leaf: v for leaf, v in tensors.items() if leaf in (*self.leaves, "bias")}
        n = int(tensors["scales"].shape[1])
        out["qzeros"] = pack_qzeros(unpack_qzeros(tensors["qzeros"], cfg.bits, n, "gptq"), cfg.bits, "gptq_v2")
        return out


# --- the zero-point check -----------------------------------------------------------------------------------
@dataclass
class ZeroPointDiagnosis:
    """What :func:`diagnose_zero_points` found.

    Attributes:
        labelled: the convention the config declares ("gptq" or "gptq_v2").
        likely: the convention the tensors support, or None when they do not tell.
        exact: True when the evidence is conclusive (symmetric zero points all at one convention's midpoint).
        evidence: one sentence naming the tensor and the values seen.
    """

    labelled: str
    likely: str | None
    exact: bool = False
    evidence: str = ""
    details: dict = field(default_factory=dict)

    @property
    def mislabelled(self) -> bool:
        return self.likely is not None and self.likely != self.labelled

    def message(self, where: str) -> str:
        other = self.likely
        return (f"{where} says checkpoint_format {self.labelled!r} but its tensors look like {other!r}: {self.evidence}. "
                f"Reading it as {self.labelled!r} would shift every zero point by one (garbage output). Fix: set "
                f"\"checkpoint_format\": \"{other}\" in config.json's quantization_config (and quantize_config.json), "
                f"or rewrite it with `gptq-plugin convert SRC DST --source-format {other} --to {self.labelled}`")


def diagnose_zero_points(layers: Iterable[tuple[str, Mapping[str, torch.Tensor]]], bits: int, sym: bool,
                         labelled: str, max_stat_layers: int = 4, max_inputs: int = 1024) -> ZeroPointDiagnosis:
    """Check that a GPTQ checkpoint's stored ``qzeros`` fit the convention its config declares.

    Rules (docs/formats.md):

    1. Symmetric (``sym``): every true zero point is ``2**(bits-1)``, so v1 stores ``2**(bits-1) - 1`` everywhere and
       v2 stores ``2**(bits-1)`` (4-bit: 7 vs 8). All stored fields equal to the *other* convention's value is
       conclusive (``exact``).
    2. Otherwise, statistics on up to ``max_stat_layers`` layers (first ``max_inputs`` input channels): real weights
       are centred on zero, so the mean of ``code - zero`` is near 0 when the zeros are read in the right convention
       and near -1 (v2 read as v1) or +1 (v1 read as v2) when not. A clear split (|mean| < 0.25 one way, > 0.6 the
       other, over at least 4096 codes) names the likely convention; anything else leaves ``likely`` as None.

    Args:
        layers: ``(name, tensors)`` with the stored ``qweight``, ``qzeros``, ``scales``, ``g_idx``; layers with
            missing or malformed tensors are skipped (the reader reports those).
        bits, sym: from the config. labelled: "gptq" or "gptq_v2".
    """
    mid = 2 ** (bits - 1)
    values: set[int] = set()
    first = None
    sums = {"gptq": 0.0, "gptq_v2": 0.0}
    count = 0
    n_stat = 0
    for name, t in layers:
        try:
            _, n = _gptq_dims(t, bits, name)
            stored = _zero_words(t["qzeros"], bits, n, name)  # [G, N]
        except (CheckpointError, KeyError, ValueError, RuntimeError):
            continue
        if first is None:
            first = name
        if sym and len(values) < 3:
            values.update(torch.unique(stored).tolist())
        if n_stat < max_stat_layers:
            try:
                k = int(t["g_idx"].numel())
                k_s = k if k < 32 else min(k, max_inputs) // 32 * 32
                codes = unpack_dim0(t["qweight"][: packed_rows(k_s, bits)], bits, k_s).long()  # [k_s, N]
                g = t["g_idx"][:k_s].long()
                z2 = stored.long()[g]  # [k_s, N], stored fields
                z1 = (z2 + 1) % (2**bits)
                sums["gptq_v2"] += float((codes - z2).sum())
                sums["gptq"] += float((codes - z1).sum())
                count += codes.numel()
                n_stat += 1
            except (KeyError, ValueError, RuntimeError, IndexError):
                pass
    other = "gptq_v2" if labelled == "gptq" else "gptq"
    if first is None:
        return ZeroPointDiagnosis(labelled, None)
    if sym and len(values) == 1:
        v = values.pop()
        conv = {mid - 1: "gptq", mid: "gptq_v2"}.get(v)
        if conv is not None:
            ev = (f"sym=true and every stored zero point is {v} (the {bits}-bit symmetric zero {mid} as "
                  f"{'v1 stores it, zero - 1' if conv == 'gptq' else 'v2 stores it, zero as is'}; e.g. {first}.qzeros)")
            return ZeroPointDiagnosis(labelled, conv, exact=True, evidence=ev, details={"stored": v})
    if count >= 4096:
        mean = {c: s / count for c, s in sums.items()}
        details = {"mean_code_minus_zero": mean, "codes": count}
        if abs(mean[labelled]) > 0.6 and abs(mean[other]) < 0.25:
            ev = (f"the mean of code - zero over {count} codes of {n_stat} layers (from {first}) is "
                  f"{mean[labelled]:+.2f} when read as {labelled!r} and {mean[other]:+.2f} as {other!r}; "
                  "real weights give about 0")
            return ZeroPointDiagnosis(labelled, other, exact=False, evidence=ev, details=details)
        if abs(mean[labelled]) < 0.25:
            return ZeroPointDiagnosis(labelled, labelled, details=details)
        return ZeroPointDiagnosis(labelled, None, details=details)
    return ZeroPointDiagnosis(labelled, None)


def check_zero_points(layers: Iterable[tuple[str, Mapping[str, torch.Tensor]]], cfg: QuantizeConfig, labelled: str,
                      where: str) -> ZeroPointDiagnosis:
    """:func:`diagnose_zero_points`, then act: a conclusive mislabel raises, a statistical one warns.

    Raises:
        CheckpointError: the config's convention is conclusively wrong (message names ``where``, the evidence and
            the fix).
    """
    d = diagnose_zero_points(layers, cfg.bits, cfg.sym, labelled)
    if d.mislabelled and d.exact:
        raise CheckpointError(d.message(where))
    if d.mislabelled:
        log.warning("%s (statistical check, read as declared)", d.message(where))
    return d
