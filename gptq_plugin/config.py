"""The quantization config and its JSON forms.

``QuantizeConfig`` round-trips to the ``quantization_config`` object that GPTQ checkpoints carry in
``config.json`` and repeat in ``quantize_config.json`` (AutoGPTQ / GPTQModel convention, read by vLLM, TGI
and Transformers).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import CheckpointError, ConfigError

SUPPORTED_BITS = (2, 3, 4, 8)
CHECKPOINT_FORMATS = ("gptq", "gptq_v2")
CONFIG_VERSION = 1


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("gptq-plugin")
    except Exception:  # not installed (running from a source tree)
        return "0.1.0"


# The recipe `gptq-plugin quantize` and the demo use unless told otherwise: group-aware reordering, an MSE clipping
# search, a least-squares refit of the scales (desc_act and static groups off, so g_idx stays in input order) and
# GPTAQ's asymmetric calibration with alpha 0.25 (plain GPTQ, reported, where GPTAQ cannot run:
# gptq_plugin.quantize_job.resolve_gptaq). The
# dataclass defaults below (and those of the Transformers adapter's GPTQPluginConfig, which also parses checkpoints)
# stay the GPTQ format's defaults: what a checkpoint means when it omits a field. Chosen on the model panel, not one
# model: docs/quality.md#the-model-panel-and-the-default-recipe (`python benchmarks/panel.py`).
RECOMMENDED = {"act_group_aware": True, "mse": 2.4, "refit_scales": True, "gptaq": 0.25}

#: The dampenings ``damp_auto`` chooses from, per layer (:func:`gptq_plugin.solver.choose_damp`).
DAMP_CANDIDATES = (0.005, 0.01, 0.03, 0.1)


def parse_damp_percent(value: Any) -> tuple[float | None, bool]:
    """``damp_percent`` as a user spells it: ``"auto"`` (any case) -> ``(None, True)`` (``damp_auto``; the
    dampening is chosen per layer); a number in (0, 1), or a string of one -> ``(value, False)``.

    Raises:
        ConfigError: anything else, naming both spellings.
    """
    if isinstance(value, str) and value.strip().lower() == "auto":
        return None, True
    try:
        damp = float(value)
    except (TypeError, ValueError):
        damp = None
    if isinstance(value, bool) or damp is None or not 0 < damp < 1:
        raise ConfigError(f"damp_percent={value!r} is invalid: use a value in (0, 1), e.g. 0.01, or 'auto' (per "
                          "layer, on held-out calibration data)")
    return damp, False


def check_damp_auto(cfg: "QuantizeConfig", windows: int, batch_size: int) -> None:
    """``damp_auto`` splits the calibration batches in two (even and odd): with one batch there is nothing to hold
    out. Raises :class:`ConfigError` naming the fix."""
    if cfg.damp_auto and cfg.method == "gptq" and -(-windows // batch_size) < 2:
        raise ConfigError(
            f"damp_auto (--damp-percent auto) chooses each layer's dampening on held-out calibration batches and "
            f"needs at least 2; {windows} windows in batches of {batch_size} make 1: use more calibration windows "
            "(--nsamples) or a smaller --batch-size, or give a number to --damp-percent")


@dataclass
class QuantizeConfig:
    """How to quantize the weights of linear layers with GPTQ (Frantar et al., ICLR 2023).

    Args:
        bits (`int`, *optional*, defaults to 4): code width, one of 2, 3, 4, 8.
        group_size (`int`, *optional*, defaults to 128): input channels sharing one scale and zero point;
            -1 means one group over the whole input dimension. A value that does not divide the input size
            leaves a partial last group.
        desc_act (`bool`, *optional*, defaults to False): act-order, quantize columns in order of decreasing
            Hessian diagonal (paper, section 4 "Act-order" heuristic of the reference code).
        sym (`bool`, *optional*, defaults to True): symmetric grid (zero point fixed at ``2**(bits-1)``).
        static_groups (`bool`, *optional*, defaults to False): compute every group's scale and zero point
            from the unquantized weights before the GPTQ sweep (groups then follow input order even with
            act-order, so ``g_idx`` stays monotone).
        true_sequential (`bool`, *optional*, defaults to True): inside a decoder block, quantize linear
            layers in the order the forward pass reaches them, re-capturing the inputs of later layers
            after earlier ones are quantized.
        damp_percent (`float`, *optional*, defaults to 0.01): dampening added to the Hessian diagonal as a
            fraction of its mean; raised by ``damp_auto_increment`` while the Hessian is not positive
            definite.
        damp_auto_increment (`float`, *optional*, defaults to 0.0025): step of that increase.
        mse (`float`, *optional*, defaults to 0.0): when > 0, search a clipping ratio for each group's range
            by minimising the ``mse``-norm of the rounding error (grid search, as in the reference code's
            ``Quantizer(mse=True)``); 0 uses the min-max range.
        block_size (`int`, *optional*, defaults to 128): columns per lazy batch update (paper, step 2).
        checkpoint_format (`str`, *optional*, defaults to "gptq"): zero-point convention written:
            "gptq" (v1, stores ``zero - 1``) or "gptq_v2" (stores ``zero``).
        lm_head (`bool`, *optional*, defaults to False): also quantize the output projection.
        method (`str`, *optional*, defaults to "gptq"): "gptq", or "rtn" for round-to-nearest on the same
            grid (the baseline).
        moe_calibration (`str`, *optional*, defaults to "all"): for mixture-of-experts blocks, "all" sends every
            calibration token through every expert for the Hessians (the block's output keeps the routed tokens,
            as llm-compressor's default), "routed" gives each expert the Hessian of its routed tokens
            (:mod:`gptq_plugin.moe`).
        moe_min_tokens (`int`, *optional*, defaults to 128): with "routed", an expert that saw fewer routed
            calibration tokens is quantized with RTN (reported per expert).
        act_group_aware (`bool`, *optional*, defaults to False): group-aware reordering (GAR, GPTQModel's
            ``act_group_aware``; :func:`gptq_plugin.solver.group_aware_order`): quantize whole groups in order of
            their largest Hessian diagonal and the columns of each group by decreasing diagonal. ``g_idx`` stays in
            input order, so the checkpoint has ``desc_act`` false. Excludes ``desc_act``; needs a group size.
        refit_scales (`bool`, *optional*, defaults to False): after the GPTQ sweep, refit every row's group
            scales by least squares against the layer's Hessian with the codes fixed
            (:func:`gptq_plugin.solver.refit_scales`); same format, lower output error.
        damp_auto (`bool`, *optional*, defaults to False): choose each layer's dampening from
            :data:`DAMP_CANDIDATES` by its output error on held-out calibration data
            (:func:`gptq_plugin.solver.choose_damp`: solved on the even batches' Hessian, scored on the odd
            ones'); ``damp_percent`` is then used only where a half has no tokens. Stored in ``meta``; the
            checkpoint's ``damp_percent`` stays a number, as other readers expect. Costs one GPTQ solve per
            candidate per layer.
        gptaq (`float`, *optional*, defaults to None): GPTAQ's asymmetric calibration (Li et al., "GPTAQ:
            Efficient Finetuning-Free Quantization for Asymmetric Calibration", ICML 2025, arXiv 2504.02692;
            GPTQModel's ``GPTAQConfig``) with this ``alpha`` in (0, 1] (the reference code's default is 0.25): each
            layer's GPTQ sweep and scale refit target the original model's output ``W x_fp`` (``x_fp``: the layer's
            input in the unquantized model) rather than ``W x`` on the inputs the quantized earlier layers give
            (:func:`gptq_plugin.solver.gptq_quantize`'s ``dxxt``). The driver then carries a second stream of
            calibration activations through the unquantized blocks and runs group by group (the low-memory
            driver): 1.4 to 3.8 times the default's quantize time in the model panel's runs. Needs
            ``true_sequential``; one process; for MoE models ``moe_calibration="all"`` (every token through every
            expert in both streams).
            Stored in ``meta`` as ``"gptaq": {"alpha": ...}`` when set, as GPTQModel stores it; None: plain GPTQ.

    Raises:
        ConfigError: from :meth:`validate` when a field has an unsupported value.
    """

    bits: int = 4
    group_size: int = 128
    desc_act: bool = False
    sym: bool = True
    static_groups: bool = False
    true_sequential: bool = True
    damp_percent: float = 0.01
    damp_auto_increment: float = 0.0025
    mse: float = 0.0
    block_size: int = 128
    checkpoint_format: str = "gptq"
    lm_head: bool = False
    method: str = "gptq"
    moe_calibration: str = "all"
    moe_min_tokens: int = 128
    act_group_aware: bool = False
    refit_scales: bool = False
    damp_auto: bool = False
    gptaq: float | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> "QuantizeConfig":
        """Check every field; return ``self``. Raises :class:`ConfigError` naming the field and the fix."""
        if isinstance(self.bits, bool) or self.bits not in SUPPORTED_BITS:
            raise ConfigError(f"bits={self.bits!r} is not supported: use one of {', '.join(map(str, SUPPORTED_BITS))}")
        if isinstance(self.group_size, bool) or not isinstance(self.group_size, int) or (
            self.group_size != -1 and self.group_size < 1
        ):
            raise ConfigError(f"group_size={self.group_size!r} is invalid: use -1 (one group per row) or a positive integer")
        if not isinstance(self.damp_percent, (int, float)) or not 0 < self.damp_percent < 1:
            raise ConfigError(f"damp_percent={self.damp_percent!r} is invalid: use a value in (0, 1), e.g. 0.01")
        if not isinstance(self.damp_auto_increment, (int, float)) or self.damp_auto_increment < 0:
            raise ConfigError(f"damp_auto_increment={self.damp_auto_increment!r} is invalid: use a value >= 0")
        if not isinstance(self.mse, (int, float)) or self.mse < 0:
            raise ConfigError(f"mse={self.mse!r} is invalid: use 0 (min-max range) or a norm such as 2.4")
        if not isinstance(self.block_size, int) or self.block_size < 1:
            raise ConfigError(f"block_size={self.block_size!r} is invalid: use a positive integer such as 128")
        if self.checkpoint_format not in CHECKPOINT_FORMATS:
            raise ConfigError(
                f"checkpoint_format={self.checkpoint_format!r} is not supported: use one of {', '.join(CHECKPOINT_FORMATS)}"
            )
        if self.method not in ("gptq", "rtn"):
            raise ConfigError(f"method={self.method!r} is not supported: use 'gptq' or 'rtn'")
        from .moe import check_moe_config

        check_moe_config(self.moe_calibration, self.moe_min_tokens)
        for name in ("desc_act", "sym", "static_groups", "true_sequential", "lm_head", "act_group_aware", "refit_scales",
                     "damp_auto"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name}={getattr(self, name)!r} is invalid: use true or false")
        if self.act_group_aware and self.desc_act:
            raise ConfigError("act_group_aware and desc_act (act-order) exclude each other: group-aware reordering "
                              "is an act-order that keeps groups whole; turn one of them off")
        if self.gptaq is not None:
            if isinstance(self.gptaq, bool) or not isinstance(self.gptaq, (int, float)) or not 0 < self.gptaq <= 1:
                raise ConfigError(f"gptaq={self.gptaq!r} is invalid: use an alpha in (0, 1], e.g. 0.25 (GPTAQ's "
                                  "default), or None for plain GPTQ (on the command line: --gptaq 0)")
            if self.method != "gptq":
                raise ConfigError(f"gptaq={self.gptaq!r} needs method='gptq': {self.method} has no calibration "
                                  "activations; drop gptaq")
            if not self.true_sequential:
                raise ConfigError(f"gptaq={self.gptaq!r} needs true_sequential: each layer's asymmetric term compares "
                                  "its inputs after the earlier layers are quantized; drop --no-true-sequential")
        if self.act_group_aware and self.group_size == -1:
            raise ConfigError("act_group_aware needs groups (group_size > 0): with group_size -1 use desc_act "
                              "(act-order), which is the same order for one group")
        return self

    # --- JSON forms -------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """The ``quantization_config`` object of a GPTQ checkpoint (``quant_method: "gptq"``)."""
        meta = dict(self.meta)
        meta.setdefault("quantizer", [f"gptq-plugin:{_version()}"])
        meta.setdefault("method", self.method)
        meta.setdefault("damp_auto_increment", self.damp_auto_increment)
        meta.setdefault("mse", self.mse)
        meta.setdefault("block_size", self.block_size)
        meta.setdefault("moe_calibration", self.moe_calibration)
        meta.setdefault("moe_min_tokens", self.moe_min_tokens)
        meta.setdefault("act_group_aware", self.act_group_aware)
        meta.setdefault("refit_scales", self.refit_scales)
        if self.damp_auto:  # only when on: checkpoints without it keep their bytes
            meta["damp_auto"] = True
        else:
            meta.pop("damp_auto", None)
        if self.gptaq is not None:  # likewise; GPTQModel's shape ({"alpha": ...})
            meta["gptaq"] = {"alpha": self.gptaq}
        else:
            meta.pop("gptaq", None)
        meta.setdefault("config_version", CONFIG_VERSION)
        return {
            "quant_method": "gptq",
            "bits": self.bits,
            "group_size": self.group_size,
            "desc_act": self.desc_act,
            "sym": self.sym,
            "static_groups": self.static_groups,
            "true_sequential": self.true_sequential,
            "damp_percent": self.damp_percent,
            "lm_head": self.lm_head,
            "checkpoint_format": self.checkpoint_format,
            "meta": meta,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "QuantizeConfig":
        """Parse a ``quantization_config`` object (ours, AutoGPTQ's or GPTQModel's).

        Unknown keys are ignored. ``format`` (older GPTQModel) is read as ``checkpoint_format``.

        Raises:
            ConfigError: when ``quant_method`` is not "gptq" or a field is invalid.
        """
        if not isinstance(d, dict):
            raise ConfigError(f"quantization_config must be a JSON object, got {type(d).__name__}")
        method = str(d.get("quant_method", "gptq")).lower()
        if method not in ("gptq", "gptq_plugin", "gptq-plugin"):
            raise ConfigError(
                f"quantization_config.quant_method={d.get('quant_method')!r} is not a GPTQ checkpoint: "
                "this plugin reads quant_method 'gptq'"
            )
        meta = d.get("meta") or {}
        if not isinstance(meta, dict):
            meta = {}
        kwargs: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            if f.name in d and f.name not in ("meta", "method", "gptaq"):
                kwargs[f.name] = d[f.name]
        if "checkpoint_format" not in d and "format" in d:
            kwargs["checkpoint_format"] = d["format"]
        for key in ("damp_auto_increment", "mse", "block_size", "moe_calibration", "moe_min_tokens", "act_group_aware",
                    "refit_scales", "damp_auto"):
            if key in meta and key not in kwargs:
                kwargs[key] = meta[key]
        kwargs["method"] = meta.get("method", "gptq") if meta.get("method") in ("gptq", "rtn") else "gptq"
        # GPTAQ (GPTQModel: meta "gptaq" null or {"alpha": ..., "device": ...}) is how the weights were found, not how
        # they are read: kept when valid, never a reason to refuse a checkpoint
        gptaq = meta.get("gptaq")
        if isinstance(gptaq, dict):
            gptaq = gptaq.get("alpha")
        if (isinstance(gptaq, (int, float)) and not isinstance(gptaq, bool) and 0 < gptaq <= 1
                and kwargs["method"] == "gptq" and kwargs.get("true_sequential", True) is True):
            kwargs["gptaq"] = gptaq
        kwargs["meta"] = {k: v for k, v in meta.items() if k not in ("quantizer",)}
        if "quantizer" in meta:
            kwargs["meta"]["source_quantizer"] = meta["quantizer"]
        try:
            return cls(**kwargs)
        except TypeError as e:  # pragma: no cover - fields are filtered above
            raise ConfigError(f"invalid quantization_config: {e}") from None

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "QuantizeConfig":
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"quantization config is not valid JSON: {e}") from None
        return cls.from_dict(d)

    @classmethod
    def from_pretrained(cls, path: str | Path) -> "QuantizeConfig":
        """Read the config of a checkpoint folder: ``config.json["quantization_config"]``, else
        ``quantize_config.json``.

        Raises:
            CheckpointError: when the folder has neither.
        """
        path = Path(path)
        cfg = path / "config.json"
        if cfg.is_file():
            try:
                d = json.loads(cfg.read_text())
            except json.JSONDecodeError as e:
                raise CheckpointError(f"{cfg}: not valid JSON ({e}); re-download or re-create the checkpoint") from None
            if isinstance(d, dict) and "quantization_config" in d:
                return cls.from_dict(d["quantization_config"])
        qc = path / "quantize_config.json"
        if qc.is_file():
            return cls.from_json(qc.read_text())
        raise CheckpointError(
            f"{path}: no quantization_config in config.json and no quantize_config.json: not a GPTQ checkpoint"
        )
