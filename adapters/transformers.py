"""Transformers adapter: gptq-plugin as a Transformers quantization backend, ``quant_method="gptq_plugin"``.

Transformers has no entry-point discovery, so importing this module registers :class:`GPTQPluginConfig` and
:class:`GPTQPluginHfQuantizer` with ``transformers.quantizers.auto`` (:func:`register`; idempotent, and it
never fails because the names are taken). ``import gptq_plugin`` imports this module when Transformers is
already imported; ``from gptq_plugin import GPTQPluginConfig`` always does.

What the quantizer does inside ``from_pretrained``:

* **Quantize on load** (the source has no ``quantization_config``): the model is loaded in float32, the
  core's driver (:func:`gptq_plugin.pipeline.quantize_model`) runs GPTQ block by block on the calibration
  windows (:func:`gptq_plugin.calibration.load_calibration`), the decoder-block linears become
  :class:`~gptq_plugin.linear.QuantLinear`, and the unquantized weights are cast to the requested dtype
  (``dtype="auto"``, the default: the source's ``config.json`` dtype). ``save_pretrained`` then writes the
  standard GPTQ checkpoint the CLI writes (``quant_method: "gptq"``, fp16 ``scales`` and unquantized weights).
* **Load a GPTQ or compressed-tensors ``pack-quantized`` checkpoint** (:mod:`gptq_plugin.prequantized`): the
  linears named by the checkpoint's ``*.qweight`` (``*.weight_packed``) tensors become ``QuantLinear`` shells holding
  the stored tensors' names and shapes, which Transformers fills; the core's format handler then converts each layer
  to the GPTQ layout and validates it. Layers without packed tensors (``ignore``) stay ``nn.Linear``.

The route for ``quant_method: "gptq"`` checkpoints (Transformers sends those to its own GPTQ quantizer, which
needs optimum and gptqmodel) is a thin wrapper around ``AutoHfQuantizer.merge_quantization_configs``
(:func:`route_checkpoint_config`): a GPTQ checkpoint is loaded through the plugin when

1. the user passes ``quantization_config=GPTQPluginConfig()`` (any GPTQ checkpoint, any writer; also a
   compressed-tensors ``pack-quantized`` one), or
2. no ``quantization_config`` is passed and the checkpoint was written by gptq-plugin
   (``meta.quantizer`` names ``gptq-plugin``), or Transformers' own backend for it (GPTQ: optimum + gptqmodel;
   compressed-tensors: the ``compressed-tensors`` package) is not installed.

Anything else (``GPTQConfig`` passed, other quantization methods) is left to Transformers unchanged.
Precedence when a checkpoint is loaded: its ``quantization_config`` describes its tensors and always wins; a
layout field (``bits``, ``group_size``, ``desc_act``, ``sym``, ``checkpoint_format``) passed explicitly with a
different value is an error; other explicitly passed fields (calibration, damping, ...) are ignored with a
warning.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch

try:
    import transformers  # noqa: F401
    from transformers.quantizers.auto import (
        AUTO_QUANTIZATION_CONFIG_MAPPING,
        AUTO_QUANTIZER_MAPPING,
        AutoHfQuantizer,
        register_quantization_config,
        register_quantizer,
    )
    from transformers.quantizers.base import HfQuantizer
    from transformers.utils.quantization_config import QuantizationConfigMixin
except ImportError as e:  # pragma: no cover - exercised only without Transformers
    raise ImportError(
        f"gptq_plugin.adapters.transformers needs Transformers >= 4.51: pip install 'gptq-plugin[transformers]' ({e})"
    ) from e

from gptq_plugin.config import QuantizeConfig, parse_damp_percent
from gptq_plugin.errors import CheckpointError, ConfigError
from gptq_plugin.linear import QuantLinear
from gptq_plugin.plugins import detect_format, get_format
from gptq_plugin.prequantized import checkpoint_headers, finish_shells, make_shells, quantized_modules

log = logging.getLogger(__name__)

METHOD_NAME = "gptq_plugin"
_CT = "compressed-tensors"  # the core's compressed-tensors pack-quantized format handler
_CT_METHODS = ("compressed-tensors", "compressed_tensors")
# fields that describe a checkpoint's tensors: a user value that contradicts the checkpoint is an error
LAYOUT_FIELDS = ("bits", "group_size", "desc_act", "sym", "checkpoint_format")
# fields that only matter while quantizing (recorded in the checkpoint, ignored when loading one)
QUANTIZE_FIELDS = ("static_groups", "true_sequential", "damp_percent", "damp_auto_increment", "mse", "block_size",
                   "method", "lm_head", "moe_calibration", "moe_min_tokens", "act_group_aware",
                   "refit_scales", "damp_auto", "gptaq")
CALIBRATION_DEFAULTS = {"dataset": None, "tokenizer": None, "nsamples": 128, "seqlen": 512, "batch_size": 8,
                        "device": "auto"}
_COMPUTE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


class GPTQPluginConfig(QuantizationConfigMixin):
    """Quantize with, or load through, gptq-plugin in ``from_pretrained(..., quantization_config=...)``.

    Every argument is optional. When quantizing on load, an argument left out takes the default shown; when
    loading a GPTQ checkpoint, the checkpoint's own values are used (see the module docstring for precedence).

    Args:
        bits (`int`, *optional*, defaults to 4): code width, 2, 3, 4 or 8.
        group_size (`int`, *optional*, defaults to 128): input channels per scale/zero group; -1 for one group.
        desc_act (`bool`, *optional*, defaults to `False`): act-order (quantize columns by decreasing Hessian
            diagonal).
        sym (`bool`, *optional*, defaults to `True`): symmetric grid.
        static_groups, true_sequential, damp_percent, damp_auto_increment, mse, block_size, method, lm_head,
            moe_calibration, moe_min_tokens, act_group_aware, refit_scales, damp_auto, gptaq: as in
            :class:`gptq_plugin.QuantizeConfig` (defaults `False`, `True`, 0.01, 0.0025, 0.0, 128, "gptq", `False`,
            "all", 128, `False`, `False`, `False`, `None`). ``damp_percent="auto"`` means ``damp_auto=True``.
            Left out, these give plain GPTQ, as ``GPTQConfig`` does; the CLI's default recipe (docs/quality.md) is
            ``act_group_aware=True, mse=2.4, refit_scales=True, gptaq=0.25``.
        checkpoint_format (`str`, *optional*, defaults to "gptq"): zero-point convention written by
            ``save_pretrained``: "gptq" (v1) or "gptq_v2".
        dataset (`str`, `os.PathLike` or `list[str]`, *optional*): calibration text: a registered source
            name ("wikitext2", "c4": need the `datasets` package and Hub access), a local UTF-8 text file, or a
            list of strings. Defaults to the shared WikiText-2 validation text (``$GPTQ_PLUGIN_DATA``).
        tokenizer (`str` or tokenizer, *optional*): tokenizer (or its folder / Hub id) for the calibration
            text. Defaults to the model's own folder.
        nsamples (`int`, *optional*, defaults to 128): calibration windows.
        seqlen (`int`, *optional*, defaults to 512): tokens per calibration window.
        batch_size (`int`, *optional*, defaults to 8): calibration windows per forward.
        device (`str`, *optional*, defaults to "auto"): where each decoder block is quantized when quantizing on
            load: "auto" (CUDA when torch sees a GPU), "cpu", "cuda", "cuda:N"; the model stays where
            `from_pretrained` put it, one block at a time goes there and back.
        meta (`dict`, *optional*): the ``meta`` object of the checkpoint's ``quantization_config``.

    Raises:
        ConfigError: an unsupported value (e.g. ``bits=5``), named with the fix.
    """

    def __init__(self, bits: int | None = None, group_size: int | None = None, desc_act: bool | None = None,
                 sym: bool | None = None, static_groups: bool | None = None, true_sequential: bool | None = None,
                 damp_percent: float | None = None, damp_auto_increment: float | None = None,
                 mse: float | None = None, block_size: int | None = None, checkpoint_format: str | None = None,
                 method: str | None = None, lm_head: bool | None = None, moe_calibration: str | None = None,
                 moe_min_tokens: int | None = None, act_group_aware: bool | None = None,
                 refit_scales: bool | None = None, damp_auto: bool | None = None, gptaq: float | None = None,
                 dataset: str | os.PathLike | list[str] | None = None, tokenizer: Any = None,
                 nsamples: int | None = None, seqlen: int | None = None, batch_size: int | None = None,
                 device: str | None = None, meta: dict | None = None):
        if isinstance(damp_percent, str):  # the CLI's spellings: "auto" or a number
            damp_percent, auto = parse_damp_percent(damp_percent)
            damp_auto = auto if damp_auto is None else damp_auto
        given = dict(bits=bits, group_size=group_size, desc_act=desc_act, sym=sym, static_groups=static_groups,
                     true_sequential=true_sequential, damp_percent=damp_percent,
                     damp_auto_increment=damp_auto_increment, mse=mse, block_size=block_size,
                     checkpoint_format=checkpoint_format, method=method, lm_head=lm_head,
                     moe_calibration=moe_calibration, moe_min_tokens=moe_min_tokens,
                     act_group_aware=act_group_aware, refit_scales=refit_scales, damp_auto=damp_auto,
                     gptaq=gptaq, dataset=dataset,
                     tokenizer=tokenizer, nsamples=nsamples, seqlen=seqlen, batch_size=batch_size, device=device)
        self.quant_method = METHOD_NAME
        self._explicit = frozenset(k for k, v in given.items() if v is not None)
        core = QuantizeConfig(**{k: v for k, v in given.items() if k in LAYOUT_FIELDS + QUANTIZE_FIELDS
                                 and v is not None}, meta=dict(meta or {}))  # validates: ConfigError
        for name in LAYOUT_FIELDS + QUANTIZE_FIELDS:
            setattr(self, name, getattr(core, name))
        self.meta = core.meta
        for name, default in CALIBRATION_DEFAULTS.items():
            setattr(self, name, default if given[name] is None else given[name])
        for name in ("nsamples", "seqlen", "batch_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"GPTQPluginConfig({name}={v!r}) is invalid: use a positive integer")
        if self.dataset is not None and not isinstance(self.dataset, (str, os.PathLike, list, tuple)):
            raise ConfigError(f"GPTQPluginConfig(dataset={type(self.dataset).__name__}) is invalid: pass a source "
                              "name, a path to a text file, or a list of strings")

    # --- conversions ------------------------------------------------------------------------------------
    def to_quantize_config(self) -> QuantizeConfig:
        """The core :class:`~gptq_plugin.QuantizeConfig` of this config (calibration fields left out)."""
        return QuantizeConfig(**{n: getattr(self, n) for n in LAYOUT_FIELDS + QUANTIZE_FIELDS}, meta=dict(self.meta))

    def to_dict(self) -> dict[str, Any]:
        """The checkpoint form: the standard GPTQ ``quantization_config`` (``quant_method: "gptq"``) that
        ``save_pretrained`` writes into ``config.json``, exactly as the CLI writes it."""
        return self.to_quantize_config().to_dict()

    def to_diff_dict(self) -> dict[str, Any]:
        return self.to_dict()

    def checkpoint_dict(self) -> dict[str, Any]:
        """The ``quantization_config`` object as the checkpoint stored it when this config was read from one
        (:meth:`from_dict`; it keeps what the writer recorded, e.g. GPTQModel's ``meta.quantizer``), else
        :meth:`to_dict`."""
        return dict(self._checkpoint) if getattr(self, "_checkpoint", None) else self.to_dict()

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any], return_unused_kwargs: bool = False, **kwargs):
        """Parse a checkpoint's ``quantization_config`` (ours, AutoGPTQ's or GPTQModel's; ``quant_method``
        "gptq" or "gptq_plugin"; or compressed-tensors ``pack-quantized``, read as its GPTQ equivalent by the
        core's format handler). Keyword arguments naming attributes override them.

        Raises:
            ConfigError: not a GPTQ config, or an invalid field.
            CheckpointError: a compressed-tensors config other than integer weight-only ``pack-quantized``.
        """
        if str(config_dict.get("quant_method", "")).lower() in _CT_METHODS:
            core = get_format(_CT).parse_config(config_dict)
        else:
            core = QuantizeConfig.from_dict(config_dict)
        config = cls(**{n: getattr(core, n) for n in LAYOUT_FIELDS + QUANTIZE_FIELDS}, meta=core.meta)
        config._checkpoint = dict(config_dict)
        unused = {}
        for key, value in kwargs.items():
            if hasattr(config, key) and not key.startswith("_"):
                setattr(config, key, value)
            else:
                unused[key] = value
        return (config, unused) if return_unused_kwargs else config

    def __repr__(self) -> str:
        fields = [f"{n}={getattr(self, n)!r}" for n in LAYOUT_FIELDS + QUANTIZE_FIELDS]
        for n in CALIBRATION_DEFAULTS:  # only those passed: they are inputs, not part of the checkpoint
            if n in self._explicit:
                v = getattr(self, n)
                shown = _dataset_label(v) if n == "dataset" else v if n != "tokenizer" or isinstance(v, str) else type(v).__name__
                fields.append(f"{n}={shown!r}")
        return f"GPTQPluginConfig({', '.join(fields)})"

    # --- precedence against a checkpoint ----------------------------------------------------------------
    def for_checkpoint(self, checkpoint_config: dict[str, Any],
                       where: str = "the checkpoint's quantization_config") -> "GPTQPluginConfig":
        """The config to load a GPTQ checkpoint with: the checkpoint's own ``quantization_config``.

        Layout fields passed explicitly to this config must agree with the checkpoint; other explicitly
        passed fields are ignored (logged as a warning).

        Raises:
            ConfigError: one message listing every layout field that contradicts the checkpoint.
        """
        ckpt = GPTQPluginConfig.from_dict(checkpoint_config)
        clash = [n for n in LAYOUT_FIELDS if n in self._explicit and getattr(self, n) != getattr(ckpt, n)]
        if clash:
            yours = ", ".join(f"{n}={getattr(self, n)!r}" for n in clash)
            theirs = ", ".join(f"{n}={getattr(ckpt, n)!r}" for n in clash)
            raise ConfigError(
                f"GPTQPluginConfig({yours}) contradicts {where} ({theirs}): a GPTQ checkpoint is always loaded with "
                "its own quantization_config, which describes its tensors; pass GPTQPluginConfig() without these "
                "arguments (or with the checkpoint's values), or quantize the original model again with the values "
                "you want")
        ignored = sorted(self._explicit - set(LAYOUT_FIELDS))
        if ignored:
            log.warning("gptq-plugin: loading an already quantized checkpoint: GPTQPluginConfig arguments %s only "
                        "apply when quantizing and are ignored (the checkpoint's quantization_config is used)",
                        ", ".join(ignored))
        return ckpt


# ---------------------------------------------------------------------------------------------------------
# The quantizer
# ---------------------------------------------------------------------------------------------------------
class GPTQPluginHfQuantizer(HfQuantizer):
    """Transformers quantizer for ``quant_method="gptq_plugin"``: GPTQ on load, or load a GPTQ checkpoint into
    :class:`~gptq_plugin.linear.QuantLinear` layers; ``save_pretrained`` writes a standard GPTQ checkpoint.

    After quantizing on load, :attr:`report` holds the core's :class:`~gptq_plugin.blockquant.QuantizeReport`.
    """

    requires_calibration = False
    quantization_config: GPTQPluginConfig

    def __init__(self, quantization_config: GPTQPluginConfig, **kwargs):
        super().__init__(quantization_config, **kwargs)
        self.target_dtype: torch.dtype | None = None
        self.report = None

    def validate_environment(self, *args, device_map=None, **kwargs) -> None:
        if not self.pre_quantized and isinstance(device_map, dict) and "disk" in device_map.values():
            raise ConfigError("quantizing on load needs every weight in memory: device_map must not offload to "
                              "'disk' (quantize with device_map='cpu', then save and reload with offloading)")

    def update_dtype(self, dtype: torch.dtype) -> torch.dtype:
        """Loading a checkpoint: compute in ``dtype`` (Transformers' ``"auto"`` resolves it to the checkpoint's
        ``config.json`` dtype, float16 for GPTQ checkpoints); scales keep the checkpoint's dtype. Quantizing: load in
        float32 (GPTQ reads weights and calibration activations in fp32), then cast the unquantized weights to
        ``dtype``. Scales stay fp16."""
        if dtype not in _COMPUTE_DTYPES:
            raise ConfigError(f"dtype={dtype} is not supported by gptq-plugin: use torch.float16, torch.bfloat16 "
                              "or torch.float32")
        self.target_dtype = dtype
        if self.pre_quantized:
            log.info("gptq-plugin: computing in %s (the dtype passed to from_pretrained, else the checkpoint's); "
                     "scales keep the checkpoint's dtype; pass dtype=torch.bfloat16 or torch.float32 to change it",
                     dtype)
            return dtype
        log.info("gptq-plugin: loading in torch.float32 to quantize, then casting unquantized weights to %s (the "
                 "dtype passed to from_pretrained, else the model's); GPTQ scales are float16", dtype)
        return torch.float32

    # --- loading a checkpoint ---------------------------------------------------------------------------
    def _process_model_before_weight_loading(self, model, checkpoint_files=None, **kwargs):
        if not self.pre_quantized:
            _check_source_to_quantize(model, checkpoint_files, self.quantization_config)
            return model
        fmt = detect_format(self.quantization_config.checkpoint_dict(), "quantization_config")  # in memory: GPTQ v1
        names, scale_dtypes = quantized_modules(model, checkpoint_files, fmt)
        if not names:
            kind = "compressed-tensors" if fmt.name == _CT else "GPTQ"
            raise CheckpointError(f"{model.name_or_path}: no *.{fmt.marker} tensors: not a {kind} checkpoint "
                                  "(quantize it first)")
        make_shells(model, names, scale_dtypes, fmt, self.quantization_config.to_quantize_config(), model.name_or_path)
        return model

    def _process_model_after_weight_loading(self, model, **kwargs):
        if self.pre_quantized:
            finish_shells(model, self.quantization_config.checkpoint_dict(), Path(str(model.name_or_path)))
            if self.target_dtype is not None:  # a tensor Transformers renamed on load (Mixtral's router) keeps its dtype
                _cast_unquantized(model, self.target_dtype)
            return model
        return self._quantize(model)

    # --- quantizing on load -----------------------------------------------------------------------------
    def _quantize(self, model):
        from transformers.utils.logging import is_progress_bar_enabled

        from gptq_plugin.calibration import load_calibration
        from gptq_plugin.checkpoint import checkpoint_meta_names
        from gptq_plugin.pipeline import quantize_model

        cfg = self.quantization_config
        tokenizer = _tokenizer(cfg.tokenizer, model)
        calib = load_calibration(cfg.dataset, tokenizer, cfg.nsamples, cfg.seqlen)
        if calib.shape[0] < cfg.nsamples:
            log.warning("calibration text holds only %d windows of %d tokens (asked for %d)", calib.shape[0],
                        cfg.seqlen, cfg.nsamples)
        device = model.get_input_embeddings().weight.device
        self.report = quantize_model(model, calib.to(device), cfg.to_quantize_config(), batch_size=cfg.batch_size,
                                     progress=is_progress_bar_enabled(), device=cfg.device)
        if self.target_dtype is not None and self.target_dtype != torch.float32:
            _cast_unquantized(model, self.target_dtype)
        model.config.dtype = self.target_dtype or torch.float32
        # the model's config now describes the quantized model, as the checkpoint will (same meta as the CLI)
        meta = dict(cfg.meta)
        meta["calibration"] = {"dataset": _dataset_label(cfg.dataset), "nsamples": int(calib.shape[0]),
                               "seqlen": cfg.seqlen}
        # fallbacks, notes, MoE experts (tokens, path) and routers kept in float, under the checkpoint's names
        meta.update(checkpoint_meta_names(model, self.report.checkpoint_meta()))
        done = GPTQPluginConfig(**{n: getattr(cfg, n) for n in LAYOUT_FIELDS + QUANTIZE_FIELDS}, meta=meta)
        self.quantization_config = model.config.quantization_config = done
        return model

    # --- saving -----------------------------------------------------------------------------------------
    def get_state_dict_and_metadata(self, model):
        """The standard GPTQ tensors (``qzeros`` in ``checkpoint_format``; scales and unquantized weights in
        fp16), as :func:`gptq_plugin.checkpoint.save_quantized` writes them."""
        from gptq_plugin.checkpoint import quantized_state_dict

        return quantized_state_dict(model, self.quantization_config.to_quantize_config()), {}

    def is_serializable(self, safe_serialization=None) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return False


def _tokenizer(tokenizer, model):
    if tokenizer is not None and not isinstance(tokenizer, (str, os.PathLike)):
        return tokenizer
    from transformers import AutoTokenizer

    source = tokenizer if tokenizer is not None else model.name_or_path
    try:
        return AutoTokenizer.from_pretrained(source)
    except Exception as e:  # any loading failure becomes one clear error
        raise ConfigError(f"no tokenizer for the calibration text at {source!r} ({type(e).__name__}: {e}): pass "
                          "GPTQPluginConfig(tokenizer=...)") from None


def _dataset_label(dataset) -> str:
    if dataset is None:
        return "wikitext2-valid (shared)"
    if isinstance(dataset, (list, tuple)):
        return f"{len(dataset)} texts passed as a list"
    return str(dataset)


def _cast_unquantized(model, dtype: torch.dtype) -> None:
    """Cast the floating parameters outside :class:`QuantLinear` layers to ``dtype`` (buffers such as rotary
    ``inv_freq`` and the GPTQ tensors keep theirs), honouring the model's ``_keep_in_fp32_modules``."""
    keep = list(getattr(model, "_keep_in_fp32_modules", None) or []) + list(
        getattr(model, "_keep_in_fp32_modules_strict", None) or [])
    for mod_name, module in model.named_modules():
        if isinstance(module, QuantLinear) or any(k in mod_name.split(".") for k in keep):
            continue
        for p in module.parameters(recurse=False):
            if p.is_floating_point() and p.dtype != dtype:
                p.data = p.data.to(dtype)


def _check_source_to_quantize(model, checkpoint_files, cfg: GPTQPluginConfig) -> None:
    """Before quantizing on load: the folder holds float weights and the user asked to quantize.

    Raises:
        CheckpointError: the weights are already quantized (``*.qweight``/``*.weight_packed``) but ``config.json``
            has no ``quantization_config`` (GPTQ would run on randomly initialised layers); a file outside the folder.
        ConfigError: ``GPTQPluginConfig()`` with neither ``bits`` nor ``dataset`` for a folder that is not quantized
            (that config means "load a quantized checkpoint").
    """
    where = getattr(model, "name_or_path", "") or "the model"
    if checkpoint_files:
        packed = sorted(k for k in checkpoint_headers(checkpoint_files, str(where))
                        if k.endswith((".qweight", ".weight_packed")))
        if packed:
            raise CheckpointError(
                f"{where}: holds quantized tensors ({packed[0]}, {len(packed)} in all) but its config.json has no "
                "quantization_config, so Transformers would build float layers with random weights; restore "
                "config.json's quantization_config (quantize_config.json holds it for GPTQ checkpoints)")
    if not cfg._explicit & {"bits", "dataset"}:
        raise ConfigError(
            f"{where} has no quantization_config: it is not a quantized checkpoint, and GPTQPluginConfig() without "
            "arguments loads quantized checkpoints. To quantize it on load, say so: "
            "GPTQPluginConfig(bits=4, dataset='wikitext2') (or a text file, or a list of strings); to load a "
            "checkpoint, point from_pretrained at the quantized folder")


# ---------------------------------------------------------------------------------------------------------
# Routing standard "gptq" checkpoints, and registration
# ---------------------------------------------------------------------------------------------------------
def _written_by_plugin(d: dict) -> bool:
    meta = d.get("meta") if isinstance(d.get("meta"), dict) else {}
    quantizer = meta.get("quantizer") or []
    if isinstance(quantizer, str):
        quantizer = [quantizer]
    return any(str(q).startswith("gptq-plugin") for q in quantizer)


def _transformers_gptq_available() -> bool:
    from transformers.utils import is_gptqmodel_available, is_optimum_available

    return bool(is_optimum_available() and is_gptqmodel_available())


def _compressed_tensors_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("compressed_tensors") is not None


def route_checkpoint_config(checkpoint_config, user_config) -> GPTQPluginConfig | None:
    """Decide who loads a pre-quantized checkpoint: the config to load it through gptq-plugin, or None to
    leave it to Transformers.

    Args:
        checkpoint_config: the checkpoint's ``quantization_config`` (a dict, as in ``config.json``).
        user_config: the ``quantization_config`` passed to ``from_pretrained``, or None.

    Raises:
        ConfigError: ``user_config`` is a :class:`GPTQPluginConfig` whose layout contradicts the checkpoint.
    """
    if not isinstance(checkpoint_config, dict):
        return None
    method = str(checkpoint_config.get("quant_method", "")).lower()
    if method not in ("gptq", METHOD_NAME) + _CT_METHODS:
        return None
    if isinstance(user_config, GPTQPluginConfig):
        return user_config.for_checkpoint(checkpoint_config)
    if user_config is not None:
        return None  # the user chose another backend (e.g. GPTQConfig): Transformers decides
    if method in _CT_METHODS:
        if _compressed_tensors_available() or str(checkpoint_config.get("format")) != "pack-quantized":
            return None  # Transformers' compressed-tensors backend (or its error for what it needs)
        log.info("gptq-plugin: loading a compressed-tensors pack-quantized checkpoint through the plugin (the "
                 "compressed-tensors package, which Transformers' own backend needs, is not installed)")
        return GPTQPluginConfig.from_dict(checkpoint_config)
    if _written_by_plugin(checkpoint_config):
        log.info("gptq-plugin: loading a GPTQ checkpoint written by gptq-plugin through the plugin")
        return GPTQPluginConfig.from_dict(checkpoint_config)
    if not _transformers_gptq_available():
        log.info("gptq-plugin: loading a GPTQ checkpoint through the plugin (Transformers' own GPTQ backend needs "
                 "optimum and gptqmodel, which are not installed)")
        return GPTQPluginConfig.from_dict(checkpoint_config)
    return None


def _install_route() -> bool:
    """Wrap ``AutoHfQuantizer.merge_quantization_configs`` with :func:`route_checkpoint_config` (once; a
    re-import replaces the wrapper, never stacks it)."""
    current = AutoHfQuantizer.__dict__.get("merge_quantization_configs")
    if not isinstance(current, classmethod):
        log.warning("gptq-plugin: this Transformers version has no AutoHfQuantizer.merge_quantization_configs; GPTQ "
                    "checkpoints cannot be routed to the plugin (quantizing on load still works)")
        return False
    original = getattr(current.__func__, "_gptq_plugin_original", current)

    def merge_quantization_configs(cls, quantization_config, quantization_config_from_args):
        routed = route_checkpoint_config(quantization_config, quantization_config_from_args)
        if routed is not None:
            return routed
        return original.__get__(None, cls)(quantization_config, quantization_config_from_args)

    merge_quantization_configs._gptq_plugin_original = original
    merge_quantization_configs.__doc__ = original.__func__.__doc__
    AutoHfQuantizer.merge_quantization_configs = classmethod(merge_quantization_configs)
    return True


def _put(mapping: dict, name: str, cls: type, register_fn) -> bool:
    present = mapping.get(name)
    if present is cls:
        return True
    if present is None:
        register_fn(name)(cls)
        return True
    if getattr(present, "__module__", None) == __name__:  # an earlier import of this module (reload)
        mapping[name] = cls
        return True
    log.warning("gptq-plugin: Transformers already has %r registered to %s.%s; leaving it", name,
                present.__module__, present.__qualname__)
    return False


def register() -> bool:
    """Register ``"gptq_plugin"`` with ``transformers.quantizers.auto`` and route GPTQ checkpoints (see the
    module docstring). Idempotent; returns False (with a warning) when another package holds the name."""
    ok = _put(AUTO_QUANTIZATION_CONFIG_MAPPING, METHOD_NAME, GPTQPluginConfig, register_quantization_config)
    ok = _put(AUTO_QUANTIZER_MAPPING, METHOD_NAME, GPTQPluginHfQuantizer, register_quantizer) and ok
    return _install_route() and ok


register()
