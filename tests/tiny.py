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
