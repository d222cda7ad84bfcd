"""Model layouts: where the decoder blocks of an architecture are (the ``gptq_plugin_model_layouts`` hook; the
built-in one is listed in :mod:`gptq_plugin._builtin`, the look-up is :func:`gptq_plugin.plugins.find_layout`)."""

from __future__ import annotations

from torch import nn

from .errors import GPTQPluginError

# attribute paths of the decoder-block list in Hugging Face causal LMs
_BLOCK_PATHS = (
    "model.layers",          # Llama, Mistral, Qwen2/3, Gemma, Phi-3, SmolLM
    "model.decoder.layers",  # OPT
    "transformer.h",         # GPT-2, GPT-J, Falcon, Bloom
    "gpt_neox.layers",       # GPT-NeoX, Pythia
    "model.language_model.layers",
)


def _get(obj, path: str):
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


class GenericCausalLMLayout:
    """Decoder blocks of Hugging Face causal LMs, found at the usual attribute paths.

    Inside a block every ``nn.Linear`` is quantized; the true-sequential order and which layers share an
    input (q/k/v, gate/up) are discovered by the driver from a forward pass, so no per-architecture table
    is needed. Embeddings, norms and ``lm_head`` live outside the blocks and stay unquantized. Fused MoE experts
    (Transformers 5.x ``*Experts`` modules) are split into per-expert ``nn.Linear`` layers by
    :meth:`split_experts`.
    """

    name = "generic-causal-lm"
    priority = 0

    def matches(self, model: nn.Module) -> bool:
        return any(isinstance(_get(model, p), nn.ModuleList) for p in _BLOCK_PATHS)

    def blocks(self, model: nn.Module) -> tuple[nn.ModuleList, str]:
        """``(blocks, prefix)``: the decoder-block list and its state-dict prefix (e.g. ``"model.layers"``)."""
        for p in _BLOCK_PATHS:
            blocks = _get(model, p)
            if isinstance(blocks, nn.ModuleList) and len(blocks):
                return blocks, p
        raise GPTQPluginError(f"{type(model).__name__}: no decoder blocks at {', '.join(_BLOCK_PATHS)}")

    def split_experts(self, model: nn.Module, blocks) -> int:
        """Replace the fused experts of ``blocks`` by per-expert ``nn.Linear`` layers and mark the routers
        (:func:`gptq_plugin.moe.linearize_experts`); returns how many experts modules were split. Idempotent."""
        from .moe import linearize_experts

        return linearize_experts(model, blocks)

