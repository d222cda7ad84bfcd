"""Checking and loading a quantized checkpoint for a framework that reads it itself (Transformers'
``from_pretrained``, vLLM's engine), around the framework's own loader:

1. :func:`quantized_modules`, before any weight is read: from the checkpoint's headers (:func:`checkpoint_headers`),
   which linears of the model the checkpoint quantizes, and that every other tensor of the model is stored (the
   framework would initialise a missing one randomly);
2. :func:`make_shells`: each layer checked by the core's validator in header mode against the model's layer sizes
   (:func:`gptq_plugin.validate.check_layer_header`, ``exact``: the framework loads the tensors as stored), then the
   linears replaced by :class:`~gptq_plugin.linear.QuantLinear` shells whose buffers have the stored tensors' names,
   shapes and dtypes, for the framework to fill;
3. :func:`finish_shells`, after loading: the v1/v2 zero-point check, then each layer converted to the in-memory GPTQ
   v1 layout by its format handler and validated (:func:`gptq_plugin.validate.validate_layer`). The shells are filled
   in place: the framework may have attached hooks to them (accelerate's device placement).

A server that builds its own layers (vLLM) checks the headers itself and then what headers cannot show with
:func:`check_stored_values`, reading only the small tensors (:class:`LazyLayer`).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from .checkpoint import replace_with_quant_linear
from .config import QuantizeConfig
from .errors import CheckpointError
from .format_gptq import check_zero_points
from .linear import QuantLinear
from .plugins import detect_format, find_layout
from .reader import RawCheckpoint
from .safetensors_io import ST_DTYPES, TensorMeta, load_tensors
from .validate import check_layer_header, check_small_values, read_layer_headers, validate_layer

_CT = "compressed-tensors"
_GPTQ_LEAVES = ("qweight", "qzeros", "scales", "g_idx")
_SCALE_DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32}


def check_inside(files, folder: str | os.PathLike) -> None:
    """Refuse a weight file that lies outside the checkpoint ``folder`` (a framework joins a shard index's file names
    to the folder: an absolute name or ``../`` escapes it).

    Raises:
        CheckpointError: naming the file and the folder.
    """
    folder = os.path.normpath(os.path.abspath(folder))
    for f in files:
        path = os.path.normpath(os.path.abspath(str(f)))
        if os.path.commonpath([path, folder]) != folder:
            raise CheckpointError(f"the shard index (model.safetensors.index.json) names {str(f)!r}, which lies "
                                  f"outside the checkpoint folder {folder}: refusing to read it (a hostile or broken "
                                  "index)")


def checkpoint_headers(files, folder: str | os.PathLike | None = None) -> dict[str, TensorMeta]:
    """``{tensor name: TensorMeta}`` over weight ``files``: safetensors headers with compressed-tensors'
    ``weight_shape`` values (:func:`gptq_plugin.validate.read_layer_headers`, no other tensor data), or the tensors
    of weights-only pickles. Every file must lie in ``folder`` (the checkpoint's, when it is a local folder; else
    the first file's).

    Raises:
        CheckpointError: a file outside the folder, or one that cannot be read (truncated, not safetensors, a pickle
            that is not a weights-only torch file), named with the fix.
    """
    files = [str(f) for f in files]
    if files:
        local = folder is not None and os.path.isdir(folder)
        check_inside(files, folder if local else os.path.dirname(os.path.normpath(os.path.abspath(files[0]))))
    metas: dict[str, TensorMeta] = read_layer_headers(f for f in files if f.endswith(".safetensors"))
    for f in (f for f in files if not f.endswith(".safetensors")):
        try:
            sd = torch.load(f, map_location="cpu", weights_only=True, mmap=True)
        except Exception as e:  # UnpicklingError, RuntimeError, EOFError, ...
            raise CheckpointError(f"{f}: cannot be read as a weights-only torch file ({type(e).__name__}: {e}); "
                                  "re-download the checkpoint or convert it to safetensors") from None
        if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
            raise CheckpointError(f"{f}: not a state dict of tensors; re-download the checkpoint")
        for k, v in sd.items():
            metas[k] = TensorMeta(list(v.shape), v.dtype, v.tolist() if k.endswith(".weight_shape") and v.numel() == 2
                                  else None)
    return metas


def quantized_modules(model: torch.nn.Module, files, fmt) -> tuple[dict[str, dict[str, Any]], dict[str, torch.dtype]]:
    """The modules of ``model`` that a checkpoint of format ``fmt`` quantizes, from the headers of its weight
    ``files``: ``{module name: {leaf: TensorMeta}}`` (the modules with the ``fmt.marker`` tensor; every decoder-block
    linear, with no leaves, when the files are unknown) and ``{module name: dtype}`` of the stored scales.

    Raises:
        CheckpointError: a file outside the folder or unreadable (:func:`checkpoint_headers`); a layer's other leaves
            without its marker (it would stay a randomly initialised linear); a quantized tensor that names no module;
            a tensor of the model that the checkpoint lacks, or stores with another shape or as integers.
    """
    if not files:
        blocks, prefix = find_layout(model).blocks(model)
        return {f"{prefix}.{i}.{n}": {} for i, b in enumerate(blocks) for n, m in b.named_modules()
                if isinstance(m, torch.nn.Linear)}, {}
    keys = checkpoint_headers(files, str(getattr(model, "name_or_path", "") or ""))
    where = Path(str(files[0])).parent
    owned = [leaf for leaf in fmt.leaves if leaf != fmt.marker]
    for k in sorted(keys):  # a layer's other leaves without its marker: the marker was lost
        prefix, _, leaf = k.rpartition(".")
        if leaf in owned and f"{prefix}.{fmt.marker}" not in keys:
            raise CheckpointError(f"{where}: tensor {prefix}.{fmt.marker} is missing (the checkpoint has {k}): the "
                                  "checkpoint is incomplete; re-download or re-create it")
    names, scale_dtypes = {}, {}
    from .checkpoint import _model_names

    model_names = _model_names(model)  # fused MoE experts split into per-expert layers; checkpoint -> model names
    for prefix in fmt.layer_prefixes(keys):
        module = _resolve_module(model, model_names.get(prefix + ".weight", prefix + ".weight")[:-len(".weight")],
                                 where, fmt.marker)
        names[module] = {leaf: keys[f"{prefix}.{leaf}"] for leaf in (*fmt.leaves, "bias") if f"{prefix}.{leaf}" in keys}
        scale = keys.get(f"{prefix}.{fmt.scale_leaf}")
        if scale is not None and scale.dtype in _SCALE_DTYPES:
            scale_dtypes[module] = _SCALE_DTYPES[scale.dtype]
    _check_state_covered(model, names, keys, where, fmt, {m: d for d, m in model_names.items()})
    return names, scale_dtypes


def _resolve_module(model, name: str, where, marker: str) -> str:
    base = getattr(model, "base_model_prefix", "") or ""
    candidates = [name] + ([f"{base}.{name}", name.removeprefix(f"{base}.")] if base else [])
    for c in candidates:
        try:
            model.get_submodule(c)
        except AttributeError:
            continue
        return c
    raise CheckpointError(f"{where}: tensor {name}.{marker} names no module of {type(model).__name__}: the "
                          "checkpoint does not match its config.json")


def _check_state_covered(model, names: dict, keys: dict, where, fmt, stored_as: dict | None = None) -> None:
    """Every tensor of ``model``'s state dict outside the quantized layers is in the checkpoint, floating where the
    model's is and of the model's shape (a tied ``lm_head`` and the model's ``_keys_to_ignore_on_load_missing``
    excepted), as :func:`gptq_plugin.checkpoint.load_quantized` requires. Transformers would otherwise initialise a
    missing tensor randomly, cast an integer one, and only mention it in its load report. ``stored_as``: model key
    -> checkpoint key where they differ (e.g. Mixtral's experts)."""
    base = getattr(model, "base_model_prefix", "") or ""
    stored_as = stored_as or {}

    def stored(k: str):
        k = stored_as.get(k, k)
        for c in (k, f"{base}.{k}" if base else k, k.removeprefix(f"{base}.") if base else k):
            if c in keys:
                return keys[c]
        return None

    tied = bool(getattr(getattr(model, "config", None), "tie_word_embeddings", False))
    out_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    tied_names = {f"{n}.weight" for n, m in model.named_modules() if tied and out_emb is not None and m is out_emb}
    ignore = [re.compile(p) for p in (getattr(model, "_keys_to_ignore_on_load_missing", None) or [])]
    for k, ref in model.state_dict().items():
        prefix = k.rpartition(".")[0]
        if prefix in names or k in tied_names or any(p.search(k) for p in ignore):
            continue
        meta = stored(k)
        if meta is not None and getattr(model.get_submodule(prefix), "gptq_plugin_expert", False):
            raise CheckpointError(f"{where}: expert layer {stored_as.get(k, k)} is stored unquantized: Transformers "
                                  "would fuse it with the other experts' float weights and leave this layer randomly "
                                  "initialised; load the checkpoint with gptq_plugin.load_quantized, or quantize every "
                                  "expert")
        if meta is None:
            shown = stored_as.get(k, k)
            what = (f"{shown[:-len('.weight')]}.{fmt.marker} (or {shown})" if isinstance(
                model.get_submodule(prefix), torch.nn.Linear) and shown.endswith(".weight") else shown)
            raise CheckpointError(f"{where}: tensor {what} is missing: Transformers would initialise it randomly; the "
                                  "checkpoint is incomplete or for another architecture")
        dtype = meta.dtype if isinstance(meta.dtype, torch.dtype) else ST_DTYPES.get(str(meta.dtype))
        if ref.is_floating_point() and not (dtype is not None and dtype.is_floating_point):
            raise CheckpointError(f"{where}: tensor {stored_as.get(k, k)} has dtype {meta.dtype}, expected a floating-point tensor: "
                                  "corrupt checkpoint")
        if list(meta.shape) != list(ref.shape):
            raise CheckpointError(f"{where}: tensor {stored_as.get(k, k)} has shape {list(meta.shape)}, expected {list(ref.shape)}: the "
                                  "checkpoint does not match its config.json")


def make_shells(model: torch.nn.Module, names: dict[str, dict[str, Any]], scale_dtypes: dict[str, torch.dtype],
                fmt, cfg: QuantizeConfig, where) -> None:
    """Check each quantized layer's headers against ``cfg`` and the model's layer (the core's validator, ``exact``),
    then replace the linears at ``names`` (:func:`quantized_modules`) by :class:`QuantLinear` shells: scales in the
    stored dtype (fp32 scales are not rounded to fp16) and, for a format that stores other leaves than GPTQ's (e.g.
    compressed-tensors), buffers with the stored names and shapes in place of the GPTQ ones (the leaves the
    checkpoint has; without its files: the ones its writer writes for ``cfg``).

    Raises:
        CheckpointError: a layer's tensors contradict ``cfg`` or the model, or use an older packing (named with
            ``gptq-plugin convert``); a name that is not a linear layer.
    """
    for name, metas in names.items():
        m = model.get_submodule(name)
        if metas and isinstance(m, torch.nn.Linear):  # not a linear: replace_with_quant_linear names it
            try:
                check_layer_header(fmt, cfg, name, metas, m.in_features, m.out_features, exact=True)
            except CheckpointError as e:
                raise CheckpointError(f"{where}: {e}") from None
    replace_with_quant_linear(model, list(names), cfg)
    for name, metas in names.items():
        m = model.get_submodule(name)
        if name in scale_dtypes:
            m.register_buffer("scales", m.scales.to(scale_dtypes[name]))
        if fmt.name != _CT:
            continue
        device, scales_dtype = m.qweight.device, m.scales.dtype
        expected = m.expected_tensors(_CT)
        leaves = [leaf for leaf in metas if leaf in expected] or ["weight_packed", "weight_scale", "weight_shape"] + (
            ["weight_zero_point"] if not cfg.sym else []) + (
            ["weight_g_idx"] if cfg.desc_act and not cfg.static_groups else [])
        for leaf in _GPTQ_LEAVES:
            m.register_buffer(leaf, None)
        for leaf in leaves:
            shape, dtype = expected[leaf]
            m.register_buffer(leaf, torch.zeros(shape, dtype=dtype or scales_dtype, device=device))


def finish_shells(model: torch.nn.Module, qcfg: dict, where) -> None:
    """Turn the filled :class:`QuantLinear` shells of ``model`` from the checkpoint's format into the in-memory GPTQ
    v1 layout, the way the core's reader does (:func:`gptq_plugin.reader.open_checkpoint`: the format handler of the
    ``quantization_config`` object ``qcfg``, ``gptq_v2`` zeros, GPTQModel's v1 word arithmetic, the v1/v2 zero-point
    check first), validating every layer; each shell is updated in place.

    Raises:
        CheckpointError: a layer without values, a conclusively mislabelled v1/v2 checkpoint, a tensor with the
            wrong shape or dtype, ``g_idx`` out of range, NaN scales (named, with ``where``).
    """
    handler = detect_format(qcfg, f"{where}/config.json")
    leaves = handler.leaves if handler.name == _CT else _GPTQ_LEAVES
    layers = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    state = {}
    for n, m in layers.items():
        state.update({f"{n}.{leaf}": getattr(m, leaf) for leaf in leaves if getattr(m, leaf, None) is not None})
        if m.bias is not None:
            state[f"{n}.bias"] = m.bias
    missing = [k for k, t in state.items() if t.is_meta]
    if missing:
        raise CheckpointError(f"{where}: no value for {missing[0]}: the checkpoint is incomplete")
    if not layers:
        return
    ck = RawCheckpoint(Path(str(where)), handler, handler.parse_config(qcfg), qcfg, state, list(layers))
    ck.config = handler.observe(ck.config, ck.layer_tensors(ck.layers[0]))
    ck.check_zero_points()
    for name, m in layers.items():
        try:  # the core's validator (dtypes, shapes, g_idx range, finite scales), then its handler's conversion
            internal = validate_layer(handler, ck.config, name, ck.layer_tensors(name), m.in_features, m.out_features)
        except CheckpointError as e:
            raise CheckpointError(f"{where}: {e}") from None
        for leaf, value in internal.items():
            if value is not getattr(m, leaf):
                setattr(m, leaf, value)
        if handler.name == _CT:  # the GPTQ buffers are set: drop the checkpoint's
            for leaf in handler.leaves:
                m._buffers.pop(leaf, None)
        m.reset_kernel()


class LazyLayer(Mapping):
    """The stored tensors of layer ``prefix`` by leaf, each read from its safetensors file on first access.

    Args:
        files: tensor name -> the safetensors file holding it (e.g. from :func:`checkpoint_headers`' ``file``).
        prefix: the layer's name.
    """

    def __init__(self, files: Mapping[str, Path], prefix: str):
        self.prefix = prefix
        self.files = {k[len(prefix) + 1:]: f for k, f in files.items() if k.startswith(prefix + ".")}

    def __getitem__(self, leaf: str) -> torch.Tensor:
        key = f"{self.prefix}.{leaf}"
        return load_tensors(self.files[leaf], [key])[key]

    def __contains__(self, leaf) -> bool:
        return leaf in self.files

    def __iter__(self):
        return iter(self.files)

    def __len__(self) -> int:
        return len(self.files)


def check_stored_values(handler, cfg: QuantizeConfig, layers: Mapping[str, int], files: Mapping[str, Path],
                        where) -> None:
    """What a checkpoint's headers cannot show, read from each layer's small tensors only (never the packed weights
    but for the statistics of a few layers): finite scales and ``g_idx`` in range
    (:func:`gptq_plugin.validate.check_small_values`), and for GPTQ formats the v1/v2 zero points
    (:func:`gptq_plugin.format_gptq.check_zero_points`), so that a server refuses a corrupt checkpoint before it
    builds anything.

    Args:
        handler: the checkpoint's format. cfg: its in-memory config.
        layers: quantized layer name -> its ``in_features`` (e.g. from :func:`gptq_plugin.validate.check_layer_header`).
        files: tensor name -> the safetensors file holding it. where: the checkpoint folder, for messages.

    Raises:
        CheckpointError: NaN scales, ``g_idx`` out of range, a conclusively mislabelled v1/v2 checkpoint.
    """
    for name, k in layers.items():
        check_small_values(handler, cfg, name, LazyLayer(files, name), k)
    if handler.name in ("gptq", "gptq_v2"):
        check_zero_points(((n, LazyLayer(files, n)) for n in layers), cfg, handler.name, f"{where}/config.json")
