"""The checkpoint validator: one set of checks for every entry point that reads quantized layers
(:func:`gptq_plugin.checkpoint.load_quantized`, ``inspect``, ``convert``, the Transformers, vLLM and TGI adapters).

Built on the format handlers (:class:`gptq_plugin.formats.CheckpointFormat`): their ``required_leaves`` (present),
``layer_features`` (``K`` inputs, ``N`` outputs from the stored shapes) and ``expected_tensors`` (shape and dtype of
every leaf for ``K``, ``N``, ``bits`` and ``group_size``). Three levels:

* :func:`check_layer_header`: names, shapes and dtypes only, so it runs on safetensors headers before any tensor is
  read (vLLM's front-end process, Transformers before it loads weights);
* :func:`check_internal`: one layer in the in-memory GPTQ v1 layout (``qweight`` int32 ``[ceil(K*bits/32), N]``,
  ``qzeros`` int32 ``[G, ceil(N*bits/32)]``, ``scales`` fp16/bf16/fp32 ``[G, N]``, ``g_idx`` int32 ``[K]`` with
  values in ``[0, G)``, finite scales, ``bias`` ``[N]``);
* :func:`validate_layer`: both around the handler's ``to_internal``, returning the in-memory layer.

:func:`validate_checkpoint` runs them over a whole folder, one layer in memory at a time, and returns a
:class:`CheckpointVerdict` (plus the v1/v2 zero-point check of :func:`gptq_plugin.format_gptq.diagnose_zero_points`).
Every problem is a :class:`~gptq_plugin.errors.CheckpointError` naming the tensor, the bad value and the fix.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch

from .config import QuantizeConfig
from .errors import CheckpointError, ConfigError, GPTQPluginError
from .format_gptq import diagnose_zero_points
from .formats import dtype_of, shape_of
from .packing import num_groups, packed_rows
from .plugins import detect_format
from .reader import read_quantization_config
from .safetensors_io import ST_DTYPES, LazyFolder, TensorMeta, checkpoint_files, load_tensors, read_headers

log = logging.getLogger(__name__)

SCALE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_ST_NAMES = {v: k for k, v in ST_DTYPES.items()}


def _dtype_label(t) -> str:
    return str(t.dtype)


def _want(dtype: torch.dtype, like) -> str:
    """``dtype`` spelled like ``like``'s dtype (``I32`` for headers, ``torch.int32`` for tensors)."""
    return _ST_NAMES.get(dtype, str(dtype)) if isinstance(like.dtype, str) else str(dtype)


def _where(handler, cfg: QuantizeConfig) -> str:
    bits, gs = handler.config_names
    return f"{bits}={cfg.bits}, {gs}={cfg.group_size}"


# --- headers: names, shapes, dtypes -------------------------------------------------------------------------
def check_layer_header(handler, cfg: QuantizeConfig, name: str, meta: Mapping[str, Any],
                       in_features: int | None = None, out_features: int | None = None,
                       optional: Iterable[str] = (), exact: bool = False) -> tuple[int, int] | None:
    """Check the stored leaves of one quantized layer against ``cfg`` from their shapes and dtypes alone.

    Args:
        handler: the layer's :class:`~gptq_plugin.formats.CheckpointFormat`.
        cfg: the checkpoint's (in-memory) quantization config.
        name: the layer's prefix, for messages (``model.layers.0.mlp.up_proj``).
        meta: leaf name -> tensor or :class:`~gptq_plugin.safetensors_io.TensorMeta` (``bias`` included when stored).
        in_features, out_features: the model's layer size, when known: the tensors must agree.
        optional: required leaves this caller can do without (vLLM's and TGI's loaders derive ``g_idx``).
        exact: accept only the format's current layout (``expected_tensors``), not the older ones its reader converts
            (``alternative_tensors``): for loaders that hold the stored tensors as they are (vLLM, Transformers).

    Returns:
        ``(in_features, out_features)`` of the layer, from the tensors (None for a format plugin whose handler
        has no ``layer_features``: then only presence is checked).

    Raises:
        CheckpointError: a required leaf is missing; a leaf's shape or dtype contradicts ``cfg`` (``bits``,
            ``group_size``), the other leaves or the model; an ``int64`` ``g_idx`` (the message names
            ``gptq-plugin convert``, which casts it); with ``exact``, an older layout (the message names
            ``gptq-plugin convert``, which rewrites it).
    """
    optional = set(optional)
    for leaf in handler.required_leaves(cfg):
        if leaf not in meta and leaf not in optional:
            raise CheckpointError(f"tensor {name}.{leaf} is missing: the checkpoint is incomplete (a {handler.name} "
                                  f"layer needs {', '.join(handler.required_leaves(cfg))})")
    for leaf, t in meta.items():
        if dtype_of(t) is None and leaf in handler.leaves:
            raise CheckpointError(f"tensor {name}.{leaf} has dtype {_dtype_label(t)}, which no {handler.name} "
                                  "checkpoint uses: corrupt checkpoint")
    try:
        k, n = handler.layer_features(cfg, name, meta)
    except NotImplementedError:  # a format plugin without shape knowledge: presence only
        return None
    if (in_features is not None and k != in_features) or (out_features is not None and n != out_features):
        raise CheckpointError(f"the tensors of {name} describe a layer of {k} inputs and {n} outputs, but the model's "
                              f"layer has {in_features} inputs and {out_features} outputs: the checkpoint does not "
                              "match its config.json")
    expected = handler.expected_tensors(cfg, k, n)
    alternatives = handler.alternative_tensors(cfg, k, n)
    order = [handler.marker, handler.scale_leaf] + [leaf for leaf in expected]
    for leaf in dict.fromkeys(order):
        if leaf not in meta or leaf not in expected:
            continue
        t = meta[leaf]
        shape, dtype = list(shape_of(t)), dtype_of(t)
        want_shape, want_dtype = expected[leaf]
        current = shape == list(want_shape) and (want_dtype is None or dtype == want_dtype)
        if not current and any((s is None or list(s) == shape) and (d is None or d == dtype)
                               for s, d in alternatives.get(leaf, ())):
            if not exact:
                continue
            if not (leaf == handler.g_idx_leaf and dtype == torch.int64):  # that one is named below
                raise CheckpointError(
                    f"tensor {name}.{leaf} has shape {shape_of(t)} and dtype {_dtype_label(t)}, expected "
                    f"{list(want_shape)}: an older packing of the {handler.name} format, which this loader cannot "
                    f"hold as stored; rewrite the checkpoint with `gptq-plugin convert SRC DST --to {handler.name}`")
        if leaf == handler.scale_leaf:
            if dtype not in SCALE_DTYPES:
                raise CheckpointError(f"tensor {name}.{leaf} has dtype {_dtype_label(t)}, expected float16, bfloat16 "
                                      "or float32 scales: corrupt checkpoint")
        elif want_dtype is not None and dtype != want_dtype:
            if leaf == handler.g_idx_leaf and dtype == torch.int64:
                raise CheckpointError(
                    f"tensor {name}.{leaf} has dtype {_dtype_label(t)}, expected {_want(want_dtype, t)}: rewrite the "
                    f"checkpoint with `gptq-plugin convert SRC DST --to {handler.name}` (which casts g_idx to int32), "
                    "or cast the tensor with `.to(torch.int32)` and save it again")
            raise CheckpointError(f"tensor {name}.{leaf} has dtype {_dtype_label(t)}, expected "
                                  f"{_want(want_dtype, t)}: the checkpoint is corrupt or not in the {handler.name} "
                                  "format")
        if shape != list(want_shape):
            raise CheckpointError(
                f"tensor {name}.{leaf} has shape {shape_of(t)}, expected {list(want_shape)} for {k} input and {n} "
                f"output channels at {_where(handler, cfg)}: the checkpoint does not match its quantization_config "
                f"({handler.config_hint(leaf)})")
    if "bias" in meta:
        b = meta["bias"]
        if list(shape_of(b)) != [n] or dtype_of(b) not in SCALE_DTYPES:
            raise CheckpointError(f"tensor {name}.bias has shape {shape_of(b)} and dtype {_dtype_label(b)}, expected "
                                  f"a floating-point [{n}]: corrupt checkpoint")
    return k, n


def read_layer_headers(files: Iterable[str | Path]) -> dict[str, TensorMeta]:
    """The tensors of safetensors ``files`` from their headers (:func:`~gptq_plugin.safetensors_io.read_headers`),
    with the values of the small tensors that the handlers' ``layer_features`` read (compressed-tensors'
    ``*.weight_shape``, ``[2]``), for :func:`check_layer_header` before a loader reads anything else (vLLM's front
    end, Transformers).

    Raises:
        CheckpointError: a file or a ``weight_shape`` cannot be read (naming it and the fix).
    """
    headers = read_headers(files)
    small = [k for k, m in headers.items() if k.endswith(".weight_shape") and list(m.shape) == [2]]
    for f in dict.fromkeys(headers[k].file for k in small):
        for k, t in load_tensors(f, [k for k in small if headers[k].file == f]).items():
            headers[k].value = t.tolist()
    return headers


# --- values: the in-memory layout ---------------------------------------------------------------------------
def check_g_idx_range(g_idx: torch.Tensor, groups: int, label: str, group_size: int) -> None:
    """Raise :class:`CheckpointError` unless every ``g_idx`` value (any integer dtype) is in ``[0, groups)``."""
    if not g_idx.numel():
        return
    lo, hi = int(g_idx.min()), int(g_idx.max())
    if lo < 0 or hi >= groups:
        raise CheckpointError(f"tensor {label} has values in [{lo}, {hi}], outside [0, {groups}) for "
                              f"group_size={group_size}: corrupt checkpoint (each input channel names its group)")


def check_internal(name: str, tensors: Mapping[str, torch.Tensor], bits: int, group_size: int,
                   n_groups: int | None = None, names: Mapping[str, str] | None = None) -> None:
    """Check one layer in the in-memory GPTQ v1 layout: ``qweight`` int32 ``[ceil(K*bits/32), N]``, ``qzeros`` int32
    ``[G, ceil(N*bits/32)]``, ``scales`` fp16/bf16/fp32 ``[G, N]`` (finite), ``g_idx`` int32 ``[K]`` in ``[0, G)``,
    ``bias`` ``[N]`` if present; ``K`` from ``g_idx``, ``N`` from ``scales``, ``G = ceil(K / group_size)`` unless
    ``n_groups`` is given (a tensor-parallel shard that keeps every group).

    Args:
        names: leaf -> the name of the stored tensor it came from (e.g. ``{"scales": "weight_scale"}``), for messages.

    Raises:
        CheckpointError: naming the tensor and the value that is wrong.
    """
    names = names or {}

    def label(leaf: str) -> str:
        return f"{name}.{names.get(leaf, leaf)}" if name else names.get(leaf, leaf)

    for leaf in ("qweight", "qzeros", "scales", "g_idx"):
        if tensors.get(leaf) is None:
            raise CheckpointError(f"tensor {label(leaf)} is missing: the checkpoint is incomplete")
    g_idx, scales = tensors["g_idx"], tensors["scales"]
    if g_idx.dim() != 1:
        raise CheckpointError(f"tensor {label('g_idx')} has shape {tuple(g_idx.shape)}, expected one dimension [in]")
    if scales.dim() != 2:
        raise CheckpointError(f"tensor {label('scales')} has shape {tuple(scales.shape)}, expected [groups, out]")
    k, n = int(g_idx.numel()), int(scales.shape[1])
    g = num_groups(k, group_size) if n_groups is None else int(n_groups)
    expect = {"qweight": ((packed_rows(k, bits), n), torch.int32),
              "qzeros": ((g, packed_rows(n, bits)), torch.int32),
              "scales": ((g, n), None),
              "g_idx": ((k,), torch.int32)}
    for leaf, (shape, dtype) in expect.items():
        t = tensors[leaf]
        if leaf == "scales":
            if t.dtype not in SCALE_DTYPES:
                raise CheckpointError(f"tensor {label(leaf)} has dtype {t.dtype}, expected float16, bfloat16 or "
                                      "float32 scales: corrupt checkpoint")
        elif t.dtype != dtype:
            fix = (": cast it with `.to(torch.int32)` (or rewrite the checkpoint with `gptq-plugin convert`)"
                   if leaf == "g_idx" and t.dtype == torch.int64 else "")
            raise CheckpointError(f"tensor {label(leaf)} has dtype {t.dtype}, expected {dtype}{fix}")
        if tuple(t.shape) != shape:
            raise CheckpointError(f"tensor {label(leaf)} has shape {tuple(t.shape)}, expected {list(shape)} for {k} "
                                  f"input and {n} output channels at bits={bits}, group_size={group_size}: the "
                                  "checkpoint does not match its quantization_config")
    check_g_idx_range(g_idx, g, label("g_idx"), group_size)
    if not bool(torch.isfinite(scales.float()).all()):
        bad = int((~torch.isfinite(scales.float())).sum())
        raise CheckpointError(f"tensor {label('scales')} contains NaN or Inf ({bad} of {scales.numel()} values): "
                              "corrupt checkpoint; re-download or re-quantize it")
    bias = tensors.get("bias")
    if bias is not None and (tuple(bias.shape) != (n,) or not bias.is_floating_point()):
        raise CheckpointError(f"tensor {label('bias')} has shape {tuple(bias.shape)} and dtype {bias.dtype}, expected "
                              f"a floating-point [{n}]: corrupt checkpoint")


def check_small_values(handler, cfg: QuantizeConfig, name: str, tensors: Mapping[str, torch.Tensor],
                       in_features: int) -> None:
    """The values of one stored layer that headers cannot show, read from its small leaves only (never the packed
    weights): the stored ``g_idx`` in ``[0, ceil(in_features / group_size))`` and finite scales. For front ends
    that check a checkpoint before a server starts (vLLM); ``tensors`` may read lazily (leaf -> tensor).

    Raises:
        CheckpointError: naming the tensor and the values.
    """
    groups = num_groups(in_features, cfg.group_size)
    if handler.g_idx_leaf and handler.g_idx_leaf in tensors:
        check_g_idx_range(tensors[handler.g_idx_leaf], groups, f"{name}.{handler.g_idx_leaf}", cfg.group_size)
    if handler.scale_leaf and handler.scale_leaf in tensors:
        scales = tensors[handler.scale_leaf]
        finite = torch.isfinite(scales.float())
        if not bool(finite.all()):
            raise CheckpointError(f"tensor {name}.{handler.scale_leaf} contains NaN or Inf "
                                  f"({int((~finite).sum())} of {scales.numel()} values): corrupt checkpoint; "
                                  "re-download or re-quantize it")


# --- one layer, end to end ----------------------------------------------------------------------------------
def validate_layer(handler, cfg: QuantizeConfig, name: str, tensors: Mapping[str, torch.Tensor],
                   in_features: int | None = None, out_features: int | None = None,
                   optional: Iterable[str] = ()) -> dict[str, torch.Tensor]:
    """Validate one stored layer and return it in the in-memory GPTQ v1 layout.

    :func:`check_layer_header` on the stored tensors, the stored ``g_idx`` range (before any cast), the handler's
    ``to_internal`` (which checks what is format specific, e.g. zero-point packing), then :func:`check_internal`.

    Args:
        handler: the :class:`~gptq_plugin.formats.CheckpointFormat` the tensors are stored in.
        cfg: the checkpoint's in-memory config (``handler.parse_config``, ``observe``d).
        name: the layer's prefix. tensors: leaf -> stored tensor (``bias`` included when stored).
        in_features, out_features: the model's layer size, when known.

    Returns:
        ``{"qweight", "qzeros", "scales", "g_idx"[, "bias"]}`` (v1 zeros).

    Raises:
        CheckpointError: see :func:`check_layer_header` and :func:`check_internal`.
    """
    dims = check_layer_header(handler, cfg, name, tensors, in_features, out_features, optional)
    stored_g_idx = tensors.get(handler.g_idx_leaf) if handler.g_idx_leaf else None
    if stored_g_idx is not None and dims is not None:
        check_g_idx_range(stored_g_idx, num_groups(dims[0], cfg.group_size), f"{name}.{handler.g_idx_leaf}",
                          cfg.group_size)
    internal = handler.to_internal(tensors, cfg, name)
    check_internal(name, internal, cfg.bits, cfg.group_size, names=handler.internal_names)
    return internal


# --- whole checkpoints --------------------------------------------------------------------------------------
@dataclass
class CheckpointVerdict:
    """What :func:`validate_checkpoint` found.

    Attributes:
        path: the folder. format: the detected format's name. n_layers: quantized layers checked.
        problems: one message per layer that fails (empty when ``ok``). zero_points: the v1/v2 verdict for GPTQ
            formats (a :class:`~gptq_plugin.format_gptq.ZeroPointDiagnosis`), else None.
    """

    path: str
    format: str
    n_layers: int = 0
    problems: list[str] = field(default_factory=list)
    zero_points: Any = None

    @property
    def ok(self) -> bool:
        return not self.problems

    def summary(self) -> str:
        """One line: ``ok: ...`` or ``FAILED: <first problem> (and N more)``."""
        if self.ok:
            d = self.zero_points
            if d is not None and d.mislabelled:
                return (f"MISLABELLED? looks like {d.likely!r} ({'conclusive' if d.exact else 'statistical'}): "
                        f"{d.evidence}")
            zp = ""
            if d is not None:
                zp = (f"; zero points fit {self.format!r}" if d.likely == self.format or d.exact
                      else "; zero points inconclusive (fit either convention)")
            return f"ok: {self.n_layers} layers valid{zp}"
        more = f" (and {len(self.problems) - 1} more)" if len(self.problems) > 1 else ""
        return f"FAILED: {self.problems[0]}{more}"

    def raise_for_problems(self) -> None:
        """Raise :class:`CheckpointError` with the first problem, if any."""
        if self.problems:
            raise CheckpointError(f"{self.path}: {self.problems[0]}")


def validate_checkpoint(path: str | Path, allow_pickle: bool = False, max_problems: int = 20,
                        reader: LazyFolder | None = None) -> CheckpointVerdict:
    """Validate every quantized layer of a checkpoint folder (one layer in memory at a time), and the v1/v2 zero
    points of GPTQ checkpoints.

    Args:
        path: the checkpoint folder. allow_pickle: accept ``.bin``/``.pt`` weights.
        max_problems: stop collecting after this many failing layers.
        reader: the folder's files already opened (:class:`~gptq_plugin.safetensors_io.LazyFolder`; ``inspect`` passes its own).

    Returns:
        a :class:`CheckpointVerdict`; ``verdict.raise_for_problems()`` turns it into an exception.

    Raises:
        CheckpointError: the folder cannot be read at all (no config, unknown format, corrupt or missing files, no
            quantized layers). ConfigError: an invalid quantization config.
    """
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such checkpoint folder")
    qcfg, source = read_quantization_config(path)
    handler = detect_format(qcfg, str(source))
    try:
        cfg = handler.parse_config(qcfg)
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None
    if reader is None:
        reader = LazyFolder(checkpoint_files(path, allow_pickle))
    layers = handler.layer_prefixes(reader.keys())
    if not layers:
        raise CheckpointError(f"{path}: no *.{handler.marker} tensors: not a {handler.name} checkpoint")
    verdict = CheckpointVerdict(str(path), handler.name, len(layers))
    cfg = handler.observe(cfg, reader.layer(handler, layers[0]))
    for p in layers:
        try:
            validate_layer(handler, cfg, p, reader.layer(handler, p))
        except GPTQPluginError as e:
            verdict.problems.append(str(e))
            if len(verdict.problems) >= max_problems:
                break
    if handler.name in ("gptq", "gptq_v2"):
        d = diagnose_zero_points(((p, reader.layer(handler, p)) for p in layers), cfg.bits, cfg.sym, handler.name)
        verdict.zero_points = d  # shown as "MISLABELLED? ..." by summary(); the fix is a relabel, not a re-download
    return verdict

