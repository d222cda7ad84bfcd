"""A tiny random Llama for tests that need a real Hugging Face model but not real weights."""

import torch
from transformers import AutoModelForCausalLM, LlamaConfig


def tiny_llama(seed: int = 0, layers: int = 2):
    """``LlamaForCausalLM`` with hidden 64, intermediate 96, 4 heads (2 KV), vocabulary 128, fp32 random weights."""
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=False)
    return AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)


def tiny_moe(arch: str = "qwen3_moe", seed: int = 0, layers: int = 2, experts: int = 8, top_k: int = 2):
    """A random mixture-of-experts causal LM (Transformers 5.x fused experts): ``"qwen3_moe"`` (``Qwen3MoeConfig``)
    ``"qwen2_moe"`` (a shared expert too) or ``"mixtral"`` (``MixtralConfig``); hidden 64, expert intermediate 64, 4 heads (2 KV), vocabulary 128."""
    from transformers import MixtralConfig, Qwen2MoeConfig, Qwen3MoeConfig

    torch.manual_seed(seed)
    common = dict(vocab_size=128, hidden_size=64, num_hidden_layers=layers, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False,
                  num_experts_per_tok=top_k)
    if arch == "qwen3_moe":
        cfg = Qwen3MoeConfig(num_experts=experts, moe_intermediate_size=64, intermediate_size=96, **common)
    elif arch == "qwen2_moe":  # with a shared expert and its 1-output gate
        cfg = Qwen2MoeConfig(num_experts=experts, moe_intermediate_size=64, shared_expert_intermediate_size=96,
                             intermediate_size=96, **common)
    elif arch == "mixtral":
        cfg = MixtralConfig(num_local_experts=experts, intermediate_size=64, **common)
    else:
        raise ValueError(arch)
    return AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
