"""The base class of checkpoint format handlers (GPTQ v1, GPTQ v2, compressed-tensors ``pack-quantized``): each
reads its on-disk tensors into one in-memory layout and writes them back out.

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
built-ins live in :mod:`gptq_plugin.format_gptq` and :mod:`gptq_plugin.format_compressed_tensors` (listed in
:mod:`gptq_plugin._builtin`). This module holds their base class and the helpers they share; it imports none of
them. Looking a handler up is :func:`gptq_plugin.plugins.get_format` / :func:`gptq_plugin.plugins.detect_format`;
reading a folder is :func:`gptq_plugin.reader.open_checkpoint`.
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping

import torch

from .config import QuantizeConfig
from .errors import CheckpointError
from .safetensors_io import ST_DTYPES, TensorMeta


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
        :class:`gptq_plugin.safetensors_io.TensorMeta`: shapes, dtypes, small values), before :meth:`expected_tensors`
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


# --- tensors or header entries ------------------------------------------------------------------------------
def shape_of(t) -> Any:
    """The shape of a tensor or :class:`~gptq_plugin.safetensors_io.TensorMeta` as given (a header's list stays a
    list, a tensor's becomes a tuple), for messages."""
    s = t.shape
    return list(s) if isinstance(s, list) else tuple(int(v) for v in s)


def dtype_of(t) -> torch.dtype | None:
    """The torch dtype of a tensor or :class:`~gptq_plugin.safetensors_io.TensorMeta` (None for a header dtype
    torch does not know)."""
    d = t.dtype
    return d if isinstance(d, torch.dtype) else ST_DTYPES.get(str(d))


def value_of(t) -> list | None:
    """The values of a small tensor (a list), or a :class:`~gptq_plugin.safetensors_io.TensorMeta`'s ``value``."""
    if isinstance(t, TensorMeta):
        return t.value
    return t.reshape(-1).tolist()
