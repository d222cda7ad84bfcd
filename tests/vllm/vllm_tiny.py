"""A small Llama with random weights, 8 attention heads (divisible by a tensor-parallel size of 2, unlike the
demo model's 9) and biases, GPTQ-quantized and written as a GPTQ checkpoint with a word-level tokenizer.

Needs no download. The weights are drawn with a large ``initializer_range`` so that next-token distributions
are peaked and greedy decoding is not decided by rounding noise.
"""

from __future__ import annotations

from pathlib import Path

import torch

VOCAB = 512
TINY = dict(hidden_size=256, intermediate_size=704, num_hidden_layers=2, num_attention_heads=8,
            num_key_value_heads=4, max_position_embeddings=256, rms_norm_eps=1e-5, rope_theta=10000.0,
            tie_word_embeddings=False, initializer_range=0.08, attention_bias=True, mlp_bias=False)


def make_tokenizer(vocab_size: int = VOCAB):
    """A word-level tokenizer over ``t0 .. t{vocab_size-1}`` (``t0`` bos, ``t1`` eos, ``t2`` unk)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab_size)}, unk_token="t2"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins tokens with spaces
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="t0", eos_token="t1", unk_token="t2")


def build_float_model(seed: int = 0):
    """The random fp32 ``LlamaForCausalLM`` (biases of q/k/v/o drawn too)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, bos_token_id=0, eos_token_id=1, architectures=["LlamaForCausalLM"], **TINY)
    model = LlamaForCausalLM(cfg).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.normal_(0.0, 0.05)
    return model


def quantize_and_save(out: Path, bits: int, group_size: int, desc_act: bool, sym: bool = True, seed: int = 0) -> Path:
    """GPTQ-quantize the random model on random token windows and save it with
    :func:`gptq_plugin.checkpoint.save_quantized` (fp16 tensors, like every checkpoint the core writes)."""
    from gptq_plugin.checkpoint import save_quantized
    from gptq_plugin.config import QuantizeConfig
    from gptq_plugin.pipeline import quantize_model

    model = build_float_model(seed)
    cfg = QuantizeConfig(bits=bits, group_size=group_size, desc_act=desc_act, sym=sym)
    calib = torch.randint(2, VOCAB, (8, 64), generator=torch.Generator().manual_seed(seed + 1))
    quantize_model(model, calib, cfg, batch_size=8, progress=False)
    return save_quantized(model, cfg, out, tokenizer=make_tokenizer())
