"""Checkpoint formats: GPTQ v1, GPTQ v2 and compressed-tensors ``pack-quantized``, read into one in-memory
layout and written back out.

The in-memory layout is the GPTQ v1 layout that :class:`gptq_plugin.linear.QuantLinear` holds, per quantized
linear ``L`` with ``K`` inputs, ``N`` outputs and ``G`` groups:

* ``qweight`` int32 ``[ceil(K * bits / 32), N]``: codes in ``[0, 2**bits)``, packed along the input;
* ``qzeros`` int32 ``[G, ceil(N * bits / 32)]``: ``zero - 1`` per field, modulo ``2**bits``;
* ``scales`` fp16 ``[G, N]``; ``g_idx`` int32 ``[K]``; ``bias`` ``[N]`` if any;

and ``W[n, k] = scales[g_idx[k], n] * (code[k, n] - zero[g_idx[k], n])``.

On disk:

============================ =====================================================================================
``gptq`` (v1)                AutoGPTQ / GPTQModel ``checkpoint_format: "gptq"``: the layout above.
``gptq_v2``                  GPTQModel ``checkpoint_format`` (or ``format``) ``"gptq_v2"``: ``qzeros`` store ``zero``.
``compressed-tensors``       llm-compressor ``quant_method: "compressed-tensors"``, ``format: "pack-quantized"``:
                             ``weight_packed`` int32 ``[N, ceil(K * bits / 32)]`` (signed codes ``q`` stored as
                             ``q + 2**(bits-1)``, packed densely along the input: the bit stream of ``qweight``,
                             transposed), ``weight_scale`` ``[N, G]``, ``weight_zero_point`` int32
                             ``[ceil(N * bits / 32), G]`` (asymmetric only; signed, offset like the codes),
                             ``weight_g_idx`` int32 ``[K]`` (act-order "group" only), ``weight_shape`` int64 ``[2]``.
============================ =====================================================================================

Every handler is registered through the ``gptq_plugin_checkpoint_formats`` hook, like a third-party one; the
built-ins live in :mod:`gptq_plugin.format_gptq` and :mod:`gptq_plugin.format_compressed_tensors`. This module
holds their base class, format detection and the readers. GPTQ reads also check the zero points
(:func:`gptq_plugin.format_gptq.check_zero_points`): a v2 checkpoint labelled v1, or the reverse, is reported
instead of being read as garbage.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping

import torch

from .config import QuantizeConfig
from .errors import CheckpointError, ConfigError

log = logging.getLogger(__name__)


# --- the handlers' base class ------------------------------------------------------------------------------
class CheckpointFormat:
    """Base of the checkpoint-format handlers (the objects the ``gptq_plugin_checkpoint_formats`` hook returns).

    A handler knows one on-disk layout: how to recognise it from a ``quantization_config`` object, which tensors
    make up a quantized layer, and how to turn one layer's tensors into the in-memory GPTQ v1 layout and back.
    Subclasses set ``name`` and override the methods; every method raises :class:`CheckpointError` naming the
    tensor and the fix when the data does not fit.
    """

    name = ""
    #: the tensor suffix that marks a quantized layer (``L.<marker>``)
    marker = ""
    #: the leaves of one quantized layer, besides ``bias``
    leaves: tuple[str, ...] = ()
    #: False where "symmetric" means the zero points are not stored (the writer then needs them all at the midpoint)
    stores_symmetric_zeros = True
    #: write ``quantize_config.json`` next to ``config.json`` (the AutoGPTQ convention)
    writes_quantize_config = True
    #: the leaves holding the scales and ``g_idx`` (for the validator's dtype and range checks; None: not stored)
    scale_leaf: str | None = None
    g_idx_leaf: str | None = None
    #: in-memory leaf -> the stored leaf it comes from, for messages (e.g. ``{"scales": "weight_scale"}``)
    internal_names: dict[str, str] = {}
    #: what this format's config calls ``bits`` and ``group_size``, for messages
    config_names = ("bits", "group_size")

    def detect(self, qcfg: Mapping) -> bool:
        """True when the ``quantization_config`` object ``qcfg`` declares this format."""
        raise NotImplementedError

    def parse_config(self, qcfg: Mapping) -> QuantizeConfig:
        """The in-memory view of ``qcfg``: a :class:`QuantizeConfig` with ``checkpoint_format="gptq"`` (the
        layers read by :meth:`to_internal` hold v1 zeros). Raises :class:`ConfigError`/:class:`CheckpointError`."""
        raise NotImplementedError

    def config_dict(self, cfg: QuantizeConfig, layers: Mapping[str, Mapping[str, torch.Tensor]],
                    keys: Iterable[str]) -> dict:
        """The ``quantization_config`` object to write for ``cfg`` and the in-memory ``layers`` (prefix -> v1
        tensors); ``keys`` are all tensor names of the checkpoint being written."""
        raise NotImplementedError

    def observe(self, cfg: QuantizeConfig, tensors: Mapping[str, torch.Tensor]) -> QuantizeConfig:
        """``cfg`` completed from one stored layer's tensors (e.g. the dtype of its scales); called once per read."""
        return cfg

    def prepare(self, cfg: QuantizeConfig, layers: Mapping[str, Mapping[str, torch.Tensor]]) -> QuantizeConfig:
        """``cfg`` adjusted, before writing, to what this format can store for the in-memory ``layers`` (prefix ->
        v1 tensors); :meth:`from_internal` and :meth:`config_dict` are then called with the result."""
        return cfg

    def expected_tensors(self, cfg: QuantizeConfig, in_features: int, out_features: int
                         ) -> dict[str, tuple[tuple[int, ...], torch.dtype | None]]:
        """``{leaf: (shape, dtype or None)}`` of every tensor this format may store for one quantized layer with
        ``in_features`` inputs and ``out_features`` outputs under ``cfg`` (optional leaves included: the caller
        checks those present), for shape checks before any tensor is read."""
        raise NotImplementedError

    def required_leaves(self, cfg: QuantizeConfig) -> tuple[str, ...]:
        """The leaves every quantized layer must store under ``cfg`` (checked by :mod:`gptq_plugin.validate`)."""
        return (self.marker,)

    def layer_features(self, cfg: QuantizeConfig, name: str, meta: Mapping) -> tuple[int, int]:
        """``(in_features, out_features)`` of layer ``name`` from its stored leaves ``meta`` (leaf -> tensor or
        :class:`gptq_plugin.validate.TensorMeta`: shapes, dtypes, small values), before :meth:`expected_tensors`
        is compared with them. Raises :class:`CheckpointError` when the leaves contradict each other."""
        raise NotImplementedError

    def alternative_tensors(self, cfg: QuantizeConfig, in_features: int, out_features: int
                            ) -> dict[str, list[tuple[tuple[int, ...] | None, torch.dtype | None]]]:
        """Further ``(shape or None, dtype or None)`` this format's reader accepts per leaf besides
        :meth:`expected_tensors` (older layouts that :meth:`to_internal` converts); None matches anything."""
        return {}

    def config_hint(self, leaf: str) -> str:
        """Which config field a wrong shape of ``leaf`` most likely contradicts, for messages."""
        return "bits or group_size contradicts the tensors, or the tensor is corrupt"

    def layer_prefixes(self, keys: Iterable[str]) -> list[str]:
        """The quantized layers among the tensor names ``keys``, sorted."""
        suffix = "." + self.marker
        return sorted(k[: -len(suffix)] for k in keys if k.endswith(suffix))

    def layer_keys(self, prefix: str, keys: Iterable[str]) -> list[str]:
        """The tensor names of layer ``prefix`` that this format owns (``bias`` included when present)."""
        own = {f"{prefix}.{leaf}" for leaf in (*self.leaves, "bias")}
        return [k for k in keys if k in own]

    def to_internal(self, tensors: Mapping[str, torch.Tensor], cfg: QuantizeConfig, name: str) -> dict[str, torch.Tensor]:
        """One layer's tensors (leaf name -> tensor, e.g. ``{"qweight": ..., "qzeros": ...}``) -> the in-memory
        v1 tensors ``{"qweight", "qzeros", "scales", "g_idx"[, "bias"]}``. ``cfg`` is :meth:`parse_config`'s."""
        raise NotImplementedError

    def from_internal(self, tensors: Mapping[str, torch.Tensor], cfg: QuantizeConfig, name: str) -> dict[str, torch.Tensor]:
        """Inverse of :meth:`to_internal`: in-memory v1 tensors -> this format's tensors (leaf name -> tensor)."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<checkpoint format {self.name!r}>"


def require_leaves(tensors: Mapping[str, torch.Tensor], name: str, leaves: Iterable[str]) -> None:
    """Raise :class:`CheckpointError` naming the first of ``name.<leaf>`` missing from ``tensors``."""
    for leaf in leaves:
        if leaf not in tensors:
            raise CheckpointError(f"tensor {name}.{leaf} is missing: the checkpoint is incomplete")


def builtin_formats() -> list[CheckpointFormat]:
    """The built-in handlers, registered through the ``gptq_plugin_checkpoint_formats`` hook."""
    from .format_compressed_tensors import CompressedTensorsFormat
    from .format_gptq import GPTQv1Format, GPTQv2Format

    return [GPTQv1Format(), GPTQv2Format(), CompressedTensorsFormat()]


# --- detection ----------------------------------------------------------------------------------------------
def get_format(name: str) -> CheckpointFormat:
    """The registered handler called ``name``. Raises :class:`CheckpointError` listing the known ones."""
    from .plugins import checkpoint_formats

    formats = checkpoint_formats()
    if name not in formats:
        raise CheckpointError(f"checkpoint format {name!r} is not supported: known formats {', '.join(formats)}")
    return formats[name]


def detect_format(qcfg: Mapping, where: str = "quantization_config") -> CheckpointFormat:
    """The registered handler whose ``detect`` accepts the ``quantization_config`` object ``qcfg``.

    This is what an adapter calls with the checkpoint's ``quantization_config`` dict, followed by
    ``handler.parse_config(qcfg)`` and, per layer, ``handler.to_internal(tensors, cfg, name)``.

    Raises:
        CheckpointError: no handler (or more than one) accepts it; the message names ``where`` and what it says.
    """
    from .plugins import checkpoint_formats

    if not isinstance(qcfg, Mapping):
        raise CheckpointError(f"{where} must be a JSON object, got {type(qcfg).__name__}")
    formats = checkpoint_formats()
    hits = [f for f in formats.values() if f.detect(qcfg)]
    if len(hits) == 1:
        return hits[0]
    said = ", ".join(f"{k}={qcfg[k]!r}" for k in ("quant_method", "checkpoint_format", "format") if k in qcfg)
    if not hits:
        raise CheckpointError(f"{where} ({said or 'no quant_method'}) is no checkpoint format this plugin reads: "
                              f"known formats {', '.join(formats)}")
    raise CheckpointError(f"{where} ({said}) is claimed by several checkpoint formats "
                          f"({', '.join(f.name for f in hits)}): uninstall the conflicting format plugin")


def read_quantization_config(path: str | Path) -> tuple[dict, Path]:
    """The ``quantization_config`` object of a checkpoint folder and the file it came from:
    ``config.json["quantization_config"]`` (what vLLM and Transformers read), else ``quantize_config.json``.
    Warns when both exist and disagree on the zero-point convention.

    Raises:
        CheckpointError: neither file holds one, or a file is not valid JSON.
    """
    path = Path(path)
    found: list[tuple[dict, Path]] = []
    for fname in ("config.json", "quantize_config.json"):
        f = path / fname
        if not f.is_file():
            continue
        try:
            d = json.loads(f.read_text())
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{f}: not valid JSON ({e}); re-download or re-create the checkpoint") from None
        if fname == "config.json":
            d = d.get("quantization_config") if isinstance(d, dict) else None
        if isinstance(d, dict):
            found.append((d, f))
    if not found:
        raise CheckpointError(f"{path}: no quantization_config in config.json and no quantize_config.json: not a GPTQ "
                              "checkpoint (nor a compressed-tensors one)")
    if len(found) == 2:
        conv = [str(d.get("checkpoint_format") or d.get("format") or "gptq") for d, _ in found]
        if conv[0] != conv[1] and found[0][0].get("quant_method", "gptq") == "gptq":
            log.warning("%s says checkpoint_format %r but %s says %r: using config.json (what vLLM and Transformers "
                        "read); fix the other file", found[0][1], conv[0], found[1][1], conv[1])
    return found[0]


# --- reading whole checkpoints ------------------------------------------------------------------------------
@dataclass
class RawCheckpoint:
    """A checkpoint folder as stored: its format handler, in-memory config and raw tensors.

    Attributes:
        path: the folder. format: the handler of its on-disk format. config: the in-memory view
            (``checkpoint_format="gptq"``). source_config: the ``quantization_config`` object as found.
        state: every tensor as stored. layers: the quantized layers' prefixes.
    """

    path: Path
    format: CheckpointFormat
    config: QuantizeConfig
    source_config: dict
    state: dict[str, torch.Tensor]
    layers: list[str]

    def layer_tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        """The stored tensors of one quantized layer, by leaf name."""
        return {k.rpartition(".")[2]: self.state[k] for k in self.format.layer_keys(prefix, self.state)}

    def layer(self, prefix: str) -> dict[str, torch.Tensor]:
        """One quantized layer in the in-memory v1 layout (see :meth:`CheckpointFormat.to_internal`)."""
        return self.format.to_internal(self.layer_tensors(prefix), self.config, prefix)

    def check_zero_points(self):
        """Run :func:`gptq_plugin.format_gptq.check_zero_points` for GPTQ formats; None for the others (no v1/v2
        ambiguity)."""
        if self.format.name not in ("gptq", "gptq_v2"):
            return None
        from .format_gptq import check_zero_points

        return check_zero_points(((p, self.layer_tensors(p)) for p in self.layers), self.config, self.format.name,
                                 f"{self.path}/config.json")

    def internal_state(self) -> dict[str, torch.Tensor]:
        """Every tensor, quantized layers converted to the in-memory v1 layout (``L.qweight``, ``L.qzeros``, ...)."""
        owned = set()
        out: dict[str, torch.Tensor] = {}
        for p in self.layers:
            owned.update(self.format.layer_keys(p, self.state))
            out.update({f"{p}.{leaf}": v for leaf, v in self.layer(p).items()})
        out.update({k: v for k, v in self.state.items() if k not in owned})
        return out


def open_checkpoint(path: str | Path, allow_pickle: bool = False, source_format: str | None = None) -> RawCheckpoint:
    """Detect the format of a checkpoint folder, parse its config and read its tensors (not converted).

    Args:
        path: the checkpoint folder.
        allow_pickle: accept ``.bin``/``.pt`` weight files.
        source_format: read as this format instead of the one the config declares (for mislabelled checkpoints).

    Raises:
        CheckpointError: unknown format, missing/corrupt files, no quantized layers.
        ConfigError: an invalid quantization config.
    """
    from .checkpoint import checkpoint_files, read_tensors

    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such checkpoint folder")
    qcfg, source = read_quantization_config(path)
    handler = get_format(source_format) if source_format else detect_format(qcfg, str(source))
    if source_format and handler.name in ("gptq", "gptq_v2"):
        qcfg = dict(qcfg, checkpoint_format=handler.name)
        qcfg.pop("format", None)
    try:
        cfg = handler.parse_config(qcfg)
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None
    state = read_tensors(checkpoint_files(path, allow_pickle))
    layers = handler.layer_prefixes(state)
    if not layers:
        status = qcfg.get("quantization_status")
        hint = f" (quantization_status={status!r}: the weights are not packed)" if status not in (None, "compressed") else ""
        raise CheckpointError(f"{path}: no *.{handler.marker} tensors{hint}: not a {handler.name} checkpoint")
    ck = RawCheckpoint(path, handler, cfg, dict(qcfg), state, layers)
    ck.config = handler.observe(cfg, ck.layer_tensors(layers[0]))
    return ck


def read_checkpoint(path: str | Path, allow_pickle: bool = False,
                    source_format: str | None = None) -> tuple[QuantizeConfig, dict[str, torch.Tensor]]:
    """Read a GPTQ v1, GPTQ v2 or compressed-tensors checkpoint into the in-memory v1 layout.

    The format is detected from the config (or forced with ``source_format``); GPTQ checkpoints get the
    zero-point check of :func:`gptq_plugin.format_gptq.check_zero_points` first.

    Returns:
        ``(config, state)``: the in-memory :class:`QuantizeConfig` (``checkpoint_format="gptq"``; ``meta`` keeps
        ``source_format``) and every tensor, quantized layers as ``L.qweight``/``L.qzeros`` (v1)/``L.scales``
        (fp16)/``L.g_idx``[/``L.bias``].

    Raises:
        CheckpointError: see :func:`open_checkpoint`, :meth:`CheckpointFormat.to_internal` and
            :func:`gptq_plugin.format_gptq.check_zero_points`.
    """
    ck = open_checkpoint(path, allow_pickle, source_format)
    ck.check_zero_points()
    return ck.config, ck.internal_state()
