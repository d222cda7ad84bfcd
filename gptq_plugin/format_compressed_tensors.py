"""The compressed-tensors ``pack-quantized`` checkpoint format (llm-compressor), read into and written from the
in-memory GPTQ v1 layout.

Per quantized linear ``L`` (``K`` inputs, ``N`` outputs, ``G`` groups): ``L.weight_packed`` int32
``[N, ceil(K * bits / 32)]`` (signed codes ``q`` stored as ``q + 2**(bits-1)``, packed densely along the input:
the bit stream of GPTQ's ``qweight``, transposed), ``L.weight_scale`` ``[N, G]``, ``L.weight_zero_point`` int32
``[ceil(N * bits / 32), G]`` (asymmetric only; signed, offset like the codes: GPTQ v2's ``qzeros``, transposed),
``L.weight_g_idx`` int32 ``[K]`` (act-order "group" only), ``L.weight_shape`` int64 ``[2]`` = ``[N, K]``.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from typing import Iterable, Mapping

import torch

from .config import QuantizeConfig
from .errors import CheckpointError, ConfigError
from .formats import CheckpointFormat, require_leaves, shape_of, value_of
from .packing import default_g_idx, num_groups, pack_dim0, pack_qzeros, packed_rows, unpack_dim0, unpack_qzeros

log = logging.getLogger(__name__)

CT_LEAVES = ("weight_packed", "weight_scale", "weight_zero_point", "weight_g_idx", "weight_shape")
CT_FORMAT_VERSION = "0.20.0"  # the compressed-tensors release whose pack-quantized layout the writer follows


def _legacy_rows(n: int, bits: int) -> int:
    """Words per ``n`` codes in compressed-tensors' older packing (``32 // bits`` codes per word, no straddling)."""
    per = 32 // bits
    return (n + per - 1) // per


def _unpack_legacy(words: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """int32 ``[ceil(n / (32 // bits)), m]`` packed along dim 0, ``32 // bits`` codes per word -> ``[n, m]``."""
    per = 32 // bits
    shifts = torch.arange(per, dtype=torch.int64) * bits
    w = words.to(torch.int64) & 0xFFFFFFFF
    codes = (w.unsqueeze(1) >> shifts.view(1, per, 1)) & ((1 << bits) - 1)  # [words, per, m]
    return codes.reshape(-1, words.shape[1])[:n].to(torch.int32)


def _ct_words(words: torch.Tensor, bits: int, n: int, name: str, expected: str) -> torch.Tensor | None:
    """Check int32 words packed along dim 0 by compressed-tensors; return the codes ``[n, m]`` when they use the
    older ``32 // bits`` codes per word (3 bits only, recognised by the row count), None when dense (the GPTQ
    bit stream)."""
    if words.dtype != torch.int32 or words.dim() != 2:
        raise CheckpointError(f"tensor {name} has dtype {words.dtype} and shape {tuple(words.shape)}, expected int32 "
                              f"{expected}: the checkpoint does not match its quantization_config")
    if words.shape[0] == packed_rows(n, bits):
        return None
    if words.shape[0] == _legacy_rows(n, bits):
        return _unpack_legacy(words, bits, n)
    raise CheckpointError(f"tensor {name} has shape {tuple(words.shape)}, expected {expected} for num_bits={bits}: "
                          "the checkpoint does not match its quantization_config")


def _weights_args(qcfg: Mapping) -> tuple[dict, list]:
    """The one ``weights`` argument set shared by every config group, and the union of their targets."""
    groups = qcfg.get("config_groups") or {}
    if not isinstance(groups, Mapping) or not groups:
        raise CheckpointError("compressed-tensors quantization_config has no config_groups: not a quantized checkpoint")
    args, targets = None, []
    for gname, scheme in groups.items():
        if not isinstance(scheme, Mapping) or not isinstance(scheme.get("weights"), Mapping):
            raise CheckpointError(f"compressed-tensors config group {gname!r} has no weights arguments: only weight "
                                  "quantization (W*A16) is supported")
        for act in ("input_activations", "output_activations"):
            if scheme.get(act):
                raise CheckpointError(f"compressed-tensors config group {gname!r} quantizes {act}: only weight-only "
                                      "schemes (W4A16, W8A16, ...) can be read as GPTQ; serve it with vLLM's "
                                      "compressed-tensors support instead")
        w = dict(scheme["weights"])
        key = {k: w.get(k) for k in ("num_bits", "type", "symmetric", "strategy", "group_size", "actorder", "dynamic")}
        if args is not None and key != args:
            raise CheckpointError(f"compressed-tensors config groups use different weight schemes ({args} vs {key} in "
                                  f"{gname!r}): mixed schemes per layer are not supported")
        args = key
        targets += list(scheme.get("targets") or [])
    return args, targets


class CompressedTensorsFormat(CheckpointFormat):
    """llm-compressor's compressed-tensors format ``"pack-quantized"`` (integer weights, 2/3/4/8 bits, strategy
    ``group`` or ``channel``, symmetric or not, act-order ``group`` via ``weight_g_idx`` or ``weight``).

    Codes are signed, ``q`` in ``[-2**(bits-1), 2**(bits-1))``, stored as ``q + 2**(bits-1)``; zero points the
    same way, so the stored (unsigned) values are GPTQ's codes and true zeros (v2) exactly, transposed. Spec:
    compressed-tensors ``compressors/pack_quantized`` (``pack_to_int32``: 32 codes in ``bits`` words, dense;
    releases before the dense packing stored ``32 // bits`` codes per word, which differs for 3 bits only and is
    read as well, recognised by its shape).
    """

    name = "compressed-tensors"
    marker = "weight_packed"
    leaves = CT_LEAVES
    stores_symmetric_zeros = False
    writes_quantize_config = False
    scale_leaf = "weight_scale"
    g_idx_leaf = "weight_g_idx"
    internal_names = {"qweight": "weight_packed", "qzeros": "weight_zero_point", "scales": "weight_scale",
                      "g_idx": "weight_g_idx"}
    config_names = ("num_bits", "group_size")

    def required_leaves(self, cfg):
        return ("weight_packed", "weight_scale", "weight_shape")

    def layer_features(self, cfg, name, meta):
        """``[N, K]`` from ``weight_shape`` (its value, when read), checked against ``weight_packed``'s rows; else
        ``N`` from ``weight_packed`` and ``K`` from ``weight_g_idx`` or the packed words."""
        packed, ws, g_idx = meta["weight_packed"], meta.get("weight_shape"), meta.get("weight_g_idx")
        if len(shape_of(packed)) != 2:
            raise CheckpointError(f"tensor {name}.weight_packed has shape {shape_of(packed)}, expected two dimensions "
                                  "[out_features, ceil(in_features * num_bits / 32)]: corrupt checkpoint")
        n_packed, words = (int(v) for v in shape_of(packed))
        shape = None if ws is None or list(shape_of(ws)) != [2] else value_of(ws)
        if ws is not None and list(shape_of(ws)) != [2]:
            raise CheckpointError(f"tensor {name}.weight_shape has shape {shape_of(ws)}, expected [2] "
                                  "(out_features, in_features): corrupt checkpoint")
        if shape is not None:
            if any(not float(v).is_integer() or v < 1 for v in shape):
                raise CheckpointError(f"tensor {name}.weight_shape holds {shape}, expected [out_features, in_features]: "
                                      "corrupt checkpoint")
            n, k = (int(v) for v in shape)
            if n != n_packed:
                raise CheckpointError(f"tensor {name}.weight_shape holds {[n, k]}, but {name}.weight_packed has "
                                      f"{n_packed} rows (output channels): the checkpoint is inconsistent")
            return k, n
        if g_idx is not None and len(shape_of(g_idx)) == 1:
            return int(shape_of(g_idx)[0]), n_packed
        return words * 32 // cfg.bits, n_packed

    def alternative_tensors(self, cfg, in_features, out_features):
        """The older layouts :meth:`to_internal` reads: 3-bit words of ``32 // bits`` codes, zero points unpacked
        (int8 ``[N, G]``) or all zero (symmetric, any float/int8 shape; checked by value there), int64
        ``weight_g_idx`` (cast after the validator's range check)."""
        g = num_groups(in_features, cfg.group_size)
        zero = [((_legacy_rows(out_features, cfg.bits), g), torch.int32), ((out_features, g), torch.int8),
                (None, torch.int8), (None, torch.float16), (None, torch.bfloat16), (None, torch.float32)]
        return {"weight_packed": [((out_features, _legacy_rows(in_features, cfg.bits)), torch.int32)],
                "weight_zero_point": zero,
                "weight_g_idx": [((in_features,), torch.int64)]}

    def config_hint(self, leaf):
        return {"weight_packed": "config_groups num_bits contradicts the tensors",
                "weight_scale": "config_groups group_size contradicts the tensors",
                "weight_zero_point": "num_bits or group_size contradicts the tensors"}.get(leaf, "corrupt tensor")

    def detect(self, qcfg: Mapping) -> bool:
        return str(qcfg.get("quant_method", "")).lower() in ("compressed-tensors", "compressed_tensors")

    def is_ignored(self, ignore: Iterable[str], name: str, shards: Iterable[str] = ()) -> bool:
        """Whether module ``name`` is in the ``ignore`` list of a compressed-tensors config (it is stored unquantized),
        matched as compressed-tensors matches it (``compressed_tensors.utils.match_name``): an entry equal to the
        module's full name, or ``re:<pattern>`` matching it from its start (``re.match``). A plain entry never
        matches part of a name: ``model.layers.1`` ignores neither ``model.layers.10.mlp.down_proj`` nor
        ``model.layers.1.mlp.down_proj``.

        Args:
            ignore: the config's ``ignore`` entries (module names, ``re:`` patterns).
            name: the module's full name (``model.layers.0.mlp.down_proj``).
            shards: for a serving framework's layer that fuses several checkpoint modules (vLLM's ``qkv_proj``),
                their full names: the layer is ignored when every one of them is.
        """
        ignore = list(ignore)
        return all(any(re.match(i[3:], n) if i.startswith("re:") else i == n for i in ignore)
                   for n in (list(shards) or [name]))

    def parse_config(self, qcfg: Mapping) -> QuantizeConfig:
        formats = {str(qcfg.get("format") or "")} | {str(g.get("format")) for g in (qcfg.get("config_groups") or {}).values()
                                                      if isinstance(g, Mapping) and g.get("format")}
        formats.discard("")
        if formats != {"pack-quantized"}:
            raise CheckpointError(f"compressed-tensors format {', '.join(sorted(formats)) or '(none)'}: only "
                                  "'pack-quantized' (integer weights packed into int32) is supported")
        sparsity = qcfg.get("sparsity_config") or {}
        if sparsity and str(sparsity.get("format", "dense")) != "dense":
            raise CheckpointError(f"compressed-tensors sparsity_config format {sparsity.get('format')!r}: sparse "
                                  "checkpoints are not supported")
        if qcfg.get("transform_config"):
            raise CheckpointError("compressed-tensors transform_config is set (online rotations such as QuIP or "
                                  "SpinQuant): such weights cannot be served as plain GPTQ")
        w, targets = _weights_args(qcfg)
        if str(w["type"] or "int") != "int" or w["dynamic"]:
            raise CheckpointError(f"compressed-tensors weights type={w['type']!r}, dynamic={w['dynamic']!r}: only static "
                                  "integer weights are supported")
        strategy = str(w["strategy"] or "")
        if strategy == "group":
            group_size = w["group_size"]
        elif strategy == "channel":
            group_size = -1
        else:
            raise CheckpointError(f"compressed-tensors weights strategy={strategy!r}: only 'group' and 'channel' "
                                  "are supported")
        actorder = w["actorder"]
        if isinstance(actorder, (str, bool)):
            actorder = {True: "group", "dynamic": "group", "static": "weight"}.get(actorder, actorder)
        if actorder not in (None, False, "group", "weight"):
            raise CheckpointError(f"compressed-tensors weights actorder={w['actorder']!r}: use null, 'group' or 'weight'")
        ct_meta = {k: qcfg[k] for k in ("ignore", "version") if k in qcfg}
        ct_meta["targets"] = targets
        try:
            return QuantizeConfig(bits=w["num_bits"], group_size=group_size, sym=bool(w["symmetric"]),
                                  desc_act=actorder in ("group", "weight"), static_groups=actorder == "weight",
                                  checkpoint_format="gptq",
                                  meta={"source_format": self.name, "compressed_tensors": ct_meta})
        except ConfigError as e:
            raise ConfigError(f"compressed-tensors weights (num_bits={w['num_bits']}, "
                              f"group_size={w['group_size']}): {e}") from None

    def observe(self, cfg, tensors):
        scale = tensors.get("weight_scale")
        if scale is None or not scale.dtype.is_floating_point:
            return cfg
        ct_meta = dict(cfg.meta.get("compressed_tensors") or {}, scale_dtype=str(scale.dtype).replace("torch.", ""))
        return dataclasses.replace(cfg, meta=dict(cfg.meta, compressed_tensors=ct_meta))

    def prepare(self, cfg, layers):
        mid = 2 ** (cfg.bits - 1)
        if cfg.sym:
            off = [p for p, t in layers.items()
                   if not bool((unpack_qzeros(t["qzeros"], cfg.bits, int(t["scales"].shape[1]), "gptq") == mid).all())]
            if off:
                log.warning("sym=true but %d layers (e.g. %s) have zero points other than %d: compressed-tensors "
                            "drops symmetric zero points, so the checkpoint is written as symmetric: false",
                            len(off), off[0], mid)
                cfg = dataclasses.replace(cfg, sym=False)
        act_group = any(not torch.equal(t["g_idx"].long(), default_g_idx(t["g_idx"].numel(), cfg.group_size).long())
                        for t in layers.values())
        actorder = "group" if act_group or (cfg.desc_act and not cfg.static_groups) else (
            "weight" if cfg.desc_act else None)
        ct_meta = dict(cfg.meta.get("compressed_tensors") or {}, actorder=actorder)
        return dataclasses.replace(cfg, meta=dict(cfg.meta, compressed_tensors=ct_meta))

    def config_dict(self, cfg, layers, keys) -> dict:
        ct_meta = cfg.meta.get("compressed_tensors") or {}
        actorder = ct_meta.get("actorder")
        weights = {"num_bits": cfg.bits, "type": "int", "symmetric": cfg.sym,
                   "strategy": "channel" if cfg.group_size == -1 else "group",
                   "group_size": None if cfg.group_size == -1 else cfg.group_size, "block_structure": None,
                   "dynamic": False, "actorder": actorder, "observer": "minmax", "observer_kwargs": {}}
        ignore = ct_meta.get("ignore")
        if ignore is None:
            ignore = _unquantized_linears(layers, keys)
        return {
            "quant_method": "compressed-tensors",
            "format": "pack-quantized",
            "quantization_status": "compressed",
            "config_groups": {"group_0": {"targets": ct_meta.get("targets") or ["Linear"], "weights": weights,
                                          "input_activations": None, "output_activations": None,
                                          "format": "pack-quantized"}},
            "ignore": ignore,
            "kv_cache_scheme": None,
            "global_compression_ratio": None,
            "sparsity_config": {},
            "transform_config": {},
            "version": ct_meta.get("version", CT_FORMAT_VERSION),
        }

    def expected_tensors(self, cfg, in_features, out_features):
        g = num_groups(in_features, cfg.group_size)
        return {"weight_packed": ((out_features, packed_rows(in_features, cfg.bits)), torch.int32),
                "weight_scale": ((out_features, g), None),
                "weight_zero_point": ((packed_rows(out_features, cfg.bits), g), torch.int32),
                "weight_g_idx": ((in_features,), torch.int32),
                "weight_shape": ((2,), torch.int64)}

    def to_internal(self, tensors, cfg, name, n_groups: int | None = None):
        """See :meth:`CheckpointFormat.to_internal`.

        Args:
            n_groups (`int`, *optional*): the number of groups the layer stores, when it is not
                ``ceil(in_features / group_size)``: a tensor-parallel shard of the input dimension that keeps every
                group of the whole layer (its ``weight_g_idx`` names them). Defaults to ``ceil(K / group_size)``.
        """
        require_leaves(tensors, name, ("weight_packed", "weight_scale", "weight_shape"))
        bits = cfg.bits
        shape = tensors["weight_shape"].reshape(-1).tolist()
        if len(shape) != 2 or min(shape) < 1:
            raise CheckpointError(f"tensor {name}.weight_shape holds {shape}, expected [out_features, in_features]")
        n, k = (int(s) for s in shape)
        g = num_groups(k, cfg.group_size) if n_groups is None else int(n_groups)
        packed = tensors["weight_packed"]
        expected = f"[{n}, {packed_rows(k, bits)}] for weight_shape {[n, k]}"
        if packed.dim() != 2 or packed.shape[0] != n:
            raise CheckpointError(f"tensor {name}.weight_packed has shape {tuple(packed.shape)}, expected {expected}")
        legacy = _ct_words(packed.t(), bits, k, f"{name}.weight_packed", expected)
        qweight = packed.t().contiguous() if legacy is None else pack_dim0(legacy, bits)
        scale = tensors["weight_scale"]
        if scale.dim() != 2 or tuple(scale.shape) != (n, g):
            raise CheckpointError(f"tensor {name}.weight_scale has shape {tuple(scale.shape)}, expected [{n}, {g}] for "
                                  f"group_size={cfg.group_size}: the checkpoint does not match its quantization_config")
        scales = _to_fp16(scale.t().contiguous(), f"{name}.weight_scale")  # [G, N]
        mid = 2 ** (bits - 1)
        zp = tensors.get("weight_zero_point")
        if zp is not None and zp.dtype == torch.int32:
            legacy = _ct_words(zp, bits, n, f"{name}.weight_zero_point", f"[{packed_rows(n, bits)}, {g}]")
            zeros = (unpack_dim0(zp, bits, n) if legacy is None else legacy).t()  # [G, N], unsigned = true zeros
        elif zp is not None and zp.dtype == torch.int8 and tuple(zp.shape) == (n, g):  # unpacked (older releases)
            zeros = (zp.to(torch.int32) + mid).t()
        elif zp is not None and zp.numel() and (zp.dtype.is_floating_point or zp.dtype == torch.int8) and not zp.any():
            zeros = None  # symmetric checkpoints of some releases keep all-zero signed zero points
        elif zp is not None:
            raise CheckpointError(f"tensor {name}.weight_zero_point has dtype {zp.dtype} and shape {tuple(zp.shape)}, "
                                  f"expected int32 [{packed_rows(n, bits)}, {g}]")
        else:
            zeros = None
        if zeros is None:
            if not cfg.sym:
                raise CheckpointError(f"tensor {name}.weight_zero_point is missing although the config says "
                                      "symmetric: false: the checkpoint is incomplete")
            zeros = torch.full((g, n), mid, dtype=torch.int32, device=packed.device)
        if zeros.shape[0] != g:
            raise CheckpointError(f"tensor {name}.weight_zero_point has {zeros.shape[0]} groups, expected {g}")
        g_idx = tensors.get("weight_g_idx")
        if g_idx is None:
            g_idx = default_g_idx(k, cfg.group_size).to(packed.device)
        elif g_idx.dim() != 1 or g_idx.numel() != k:
            raise CheckpointError(f"tensor {name}.weight_g_idx has shape {tuple(g_idx.shape)}, expected [{k}]")
        out = {"qweight": qweight, "qzeros": pack_qzeros(zeros, bits, "gptq"), "scales": scales,
               "g_idx": g_idx.to(torch.int32).contiguous()}
        if "bias" in tensors:
            out["bias"] = tensors["bias"]
        return out

    def from_internal(self, tensors, cfg, name):
        bits = cfg.bits
        qweight, scales, g_idx = tensors["qweight"], tensors["scales"], tensors["g_idx"]
        k, n = int(g_idx.numel()), int(scales.shape[1])
        ct_meta = cfg.meta.get("compressed_tensors") or {}
        scale_dtype = getattr(torch, str(ct_meta.get("scale_dtype", "float16")), torch.float16)
        out = {"weight_packed": qweight.t().contiguous(),
               "weight_scale": _cast_exact(scales, scale_dtype, f"{name}.scales").t().contiguous(),
               "weight_shape": torch.tensor([n, k], dtype=torch.int64)}
        zeros = unpack_qzeros(tensors["qzeros"], bits, n, "gptq")  # [G, N]
        if not cfg.sym:
            out["weight_zero_point"] = pack_dim0(zeros.t().contiguous(), bits)  # [ceil(N * bits / 32), G]
        elif not bool((zeros == 2 ** (bits - 1)).all()):
            raise CheckpointError(f"layer {name}: sym=true but its zero points are not all {2 ** (bits - 1)}; "
                                  "compressed-tensors drops symmetric zero points, so write it with symmetric: false")
        if ct_meta.get("actorder") == "group" or not torch.equal(g_idx.long(), default_g_idx(k, cfg.group_size).long()):
            out["weight_g_idx"] = g_idx.to(torch.int32).contiguous()
        if "bias" in tensors:
            out["bias"] = tensors["bias"]
        return out


def _unquantized_linears(layers: Mapping, keys: Iterable[str]) -> list[str]:
    """``lm_head`` plus the ``.weight`` tensors beside quantized layers and those of the MoE modules holding quantized
    experts (``X.gate``, ``X.shared_expert_gate`` beside ``X.experts.{e}.*``: the routers): the linear layers a
    compressed-tensors reader must not expect packed weights for."""
    parents = {p.rpartition(".")[0] for p in layers}
    moe = {p.split(".experts.")[0] for p in layers if ".experts." in p}
    out = {"lm_head"}
    for k in keys:
        if k.endswith(".weight"):
            p = k[: -len(".weight")]
            if p not in layers and (p.rpartition(".")[0] in parents or p.rpartition(".")[0] in moe):
                out.add(p)
    return sorted(out)


def _to_fp16(scales: torch.Tensor, name: str) -> torch.Tensor:
    """Scales in fp16 (the GPTQ convention) when that is exact; otherwise unchanged (fp32/bf16 scales that fp16
    would round or overflow: the in-memory layout and the GPTQ writer keep them, so nothing is lost)."""
    if scales.dtype == torch.float16:
        return scales
    if not scales.dtype.is_floating_point:
        raise CheckpointError(f"tensor {name} has dtype {scales.dtype}, expected a floating-point dtype")
    half = scales.to(torch.float16)
    return half if torch.equal(half.to(scales.dtype), scales) else scales


def _cast_exact(t: torch.Tensor, dtype: torch.dtype, name: str) -> torch.Tensor:
    """``t`` in ``dtype`` when that is exact, else ``t`` unchanged (logged)."""
    if t.dtype == dtype:
        return t
    c = t.to(dtype)
    if torch.equal(c.to(t.dtype), t):
        return c
    log.warning("%s cannot be cast to %s exactly: kept in %s", name, dtype, t.dtype)
    return t
