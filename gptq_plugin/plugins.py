"""The pluggy ``PluginManager`` (built-ins plus entry points of group ``gptq_plugin``) and the look-ups over what
it registered: kernels (:func:`choose_kernel`), checkpoint formats (:func:`get_format`, :func:`detect_format`), model
layouts (:func:`find_layout`) and calibration sources (:func:`calibration_sources`)."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Mapping

import pluggy
from torch import nn

import gptq_plugin._builtin as _builtin  # not `from . import`: that would import the package itself
import gptq_plugin.hookspecs as hookspecs
from .errors import CheckpointError, GPTQPluginError, KernelError
from .formats import CheckpointFormat

log = logging.getLogger(__name__)

ENV_FORCE_KERNEL = "GPTQ_PLUGIN_KERNEL"
ENV_DISABLED_KERNELS = "GPTQ_PLUGIN_DISABLED_KERNELS"


@dataclass
class Discovery:
    """What :func:`get_plugin_manager` loaded: ``loaded`` as (name, source) pairs, ``skipped`` as
    (entry point, reason) pairs."""

    loaded: list[tuple[str, str]] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)


_discovery = Discovery()


@lru_cache(maxsize=1)
def get_plugin_manager() -> pluggy.PluginManager:
    """The process-wide plugin manager (built once). Entry points that fail to import are skipped and
    recorded (see ``gptq-plugin plugins``), never fatal."""
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    pm.register(_builtin, name="builtin")
    _discovery.loaded.append(("builtin", "gptq-plugin"))
    try:
        from importlib.metadata import entry_points

        eps = entry_points(group=hookspecs.PROJECT)
    except Exception as e:  # pragma: no cover - broken metadata
        _discovery.skipped.append(("<entry points>", repr(e)))
        eps = []
    for ep in eps:
        try:
            plugin = ep.load()
            pm.register(plugin, name=ep.name)
            dist = getattr(ep, "dist", None)
            _discovery.loaded.append((ep.name, f"{dist.name if dist else '?'} ({ep.value})"))
        except Exception as e:
            log.warning("gptq_plugin entry point %s (%s) skipped: %s", ep.name, ep.value, e)
            _discovery.skipped.append((f"{ep.name} ({ep.value})", f"{type(e).__name__}: {e}"))
    return pm


def discovery() -> Discovery:
    get_plugin_manager()
    return _discovery


def _collect(hook_name: str) -> list:
    pm = get_plugin_manager()
    out: list = []
    for result in getattr(pm.hook, hook_name)():
        out.extend(result or [])
    return out


def calibration_sources() -> dict[str, object]:
    return {s.name: s for s in _collect("gptq_plugin_calibration_sources")}


def model_layouts() -> list[object]:
    return sorted(_collect("gptq_plugin_model_layouts"), key=lambda l: -l.priority)


def checkpoint_formats() -> dict[str, CheckpointFormat]:
    return {f.name: f for f in _collect("gptq_plugin_checkpoint_formats")}


def get_format(name: str) -> CheckpointFormat:
    """The registered checkpoint-format handler called ``name``. Raises :class:`CheckpointError` listing the known
    ones."""
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


def find_layout(model: nn.Module):
    """The highest-priority registered model layout that matches ``model``.

    Raises:
        GPTQPluginError: no layout matches (register one through the ``gptq_plugin_model_layouts`` hook).
    """
    layouts = model_layouts()
    for layout in layouts:
        if layout.matches(model):
            return layout
    raise GPTQPluginError(
        f"no model layout knows where the decoder blocks of {type(model).__name__} are "
        f"(tried: {', '.join(l.name for l in layouts)}); register one through the gptq_plugin_model_layouts hook"
    )


def kernels() -> list[type]:
    """Every registered kernel class, highest priority first (disabled ones included)."""
    seen: dict[str, type] = {}
    for k in _collect("gptq_plugin_kernels"):
        if k.name in seen and seen[k.name] is not k:
            raise GPTQPluginError(f"two kernels are registered under the name {k.name!r}: "
                                  f"{seen[k.name].__module__} and {k.__module__}; uninstall one")
        seen[k.name] = k
    return sorted(seen.values(), key=lambda k: (-k.priority, k.name))


def _disabled() -> set[str]:
    return {n.strip() for n in os.environ.get(ENV_DISABLED_KERNELS, "").split(",") if n.strip()}


def choose_kernel(spec) -> type:
    """The kernel class for a layer: ``$GPTQ_PLUGIN_KERNEL`` when set (error if it cannot run ``spec``),
    else the highest-priority kernel not in ``$GPTQ_PLUGIN_DISABLED_KERNELS`` that can.

    Raises:
        KernelError: the forced kernel is unknown or cannot run the layer; or no kernel can (the message
            lists every kernel's reason).
    """
    available = kernels()
    forced = os.environ.get(ENV_FORCE_KERNEL, "").strip()
    if forced:
        by_name = {k.name: k for k in available}
        if forced not in by_name:
            raise KernelError(f"{ENV_FORCE_KERNEL}={forced!r} names no registered kernel; "
                              f"registered: {', '.join(by_name)}")
        ok, reason = by_name[forced].can_implement(spec)
        if not ok:
            raise KernelError(f"{ENV_FORCE_KERNEL}={forced!r} cannot run layer {spec}: {reason}; unset it")
        return by_name[forced]
    disabled = _disabled()
    reasons = []
    for k in available:
        if k.name in disabled:
            reasons.append(f"{k.name}: disabled by {ENV_DISABLED_KERNELS}")
            continue
        ok, reason = k.can_implement(spec)
        if ok:
            return k
        reasons.append(f"{k.name}: {reason}")
    raise KernelError(f"no kernel can run layer {spec}:\n  " + "\n  ".join(reasons))


def split_experts(model: nn.Module, blocks=None) -> int:
    """Split the fused MoE experts of ``model``'s decoder blocks (``blocks``, default all) with its layout's
    ``split_experts`` (a layout without one gets the built-in :func:`gptq_plugin.moe.linearize_experts`)."""
    from .moe import linearize_experts

    layout = find_layout(model)
    if blocks is None:
        blocks, _ = layout.blocks(model)
    split = getattr(layout, "split_experts", None)
    return split(model, blocks) if split is not None else linearize_experts(model, blocks)
