"""The pluggy hook specifications: the extension surface of gptq-plugin.

The project's own kernels, calibration sources, model layouts and checkpoint formats register through these
same hooks (``gptq_plugin._builtin``). Third-party packages expose a module implementing any of them under the
entry-point group ``gptq_plugin``::

    [project.entry-points.gptq_plugin]
    my_kernels = "my_package.gptq_hooks"

Every hook here is a *collecting* hook: all implementations are called and their lists are concatenated.
"""

from __future__ import annotations

import pluggy

PROJECT = "gptq_plugin"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


# --- loading and serving ----------------------------------------------------------------------------------
@hookspec
def gptq_plugin_kernels() -> list[type]:
    """Return kernel classes (subclasses of ``gptq_plugin.kernels.QuantKernel``).

    Called once, when the kernel registry is first used. Implemented by the built-in kernels and by kernel
    packages. Each class has ``name`` (unique), ``priority`` (higher wins) and
    ``can_implement(spec) -> (bool, reason)``; the chooser takes the highest-priority kernel that can.
    """


@hookspec
def gptq_plugin_checkpoint_formats() -> list[object]:
    """Return checkpoint format handlers (subclasses of ``gptq_plugin.formats.CheckpointFormat``): GPTQ v1
    (``"gptq"``), GPTQ v2 (``"gptq_v2"``) and compressed-tensors ``pack-quantized`` (``"compressed-tensors"``)
    are the built-ins.

    Called when a checkpoint is read, converted or written. Implemented by the built-ins and by format packages.
    Each handler has a unique ``name``; ``detect(quantization_config) -> bool`` (exactly one handler must accept
    a given config), ``parse_config(quantization_config) -> QuantizeConfig``, and per quantized layer
    ``to_internal(tensors, cfg, name)`` / ``from_internal(tensors, cfg, name)`` between its tensors and the
    in-memory GPTQ v1 layout of ``QuantLinear``; optionally ``expected_tensors(cfg, in_features, out_features)``
    (the shapes it stores, for checks before loading).
    """


# --- quantizing -------------------------------------------------------------------------------------------
@hookspec
def gptq_plugin_calibration_sources() -> list[object]:
    """Return calibration sources (objects with ``name`` and ``load(tokenizer, nsamples, seqlen)``
    returning an int64 ``[nsamples, seqlen]`` tensor of token ids), e.g. ``"wikitext2"``, ``"c4"``.

    Called when the user names a dataset that is not a path. Implemented by the built-ins and by packages.
    """


@hookspec
def gptq_plugin_model_layouts() -> list[object]:
    """Return model layouts (objects with ``name``, ``priority``, ``matches(model) -> bool`` and
    ``blocks(model) -> (list_of_blocks, prefix)``), telling the driver where the decoder blocks of an
    architecture are. The highest-priority layout that matches wins; the built-in generic layout covers
    Hugging Face causal LMs (Llama, Qwen2/3, Mistral, Gemma, OPT, GPT-2 style) and the fused MoE experts of
    Transformers 5.x. Optionally ``split_experts(model, blocks) -> int``: replace expert modules the driver cannot
    quantize (e.g. fused 3-D parameters) by per-expert ``nn.Linear`` layers, named as the checkpoints store them,
    and mark routers to keep in float (``gptq_plugin_role = "router"``); see :mod:`gptq_plugin.moe`."""
