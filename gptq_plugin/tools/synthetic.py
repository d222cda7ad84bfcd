"""Synthetic Llama-shaped models with random weights, written shard by shard (never the whole model in memory):
for measuring the memory of the streaming driver on model sizes this machine cannot hold.

``gptq-plugin synthetic-model OUT`` writes a Llama-2-7B-shaped model (hidden 4096, 32 layers, intermediate
11008, ~14 GB of bf16) by default.
"""

from __future__ import annotations

import json
import shutil
import zlib
from pathlib import Path

import torch

from ..checkpoint import TOKENIZER_FILES
from ..safetensors_io import atomic_output_dir


def write_synthetic_llama(out: str | Path, hidden: int = 4096, layers: int = 32, intermediate: int = 11008,
                          heads: int = 32, kv_heads: int = 32, vocab: int = 49152, seed: int = 0,
                          dtype: torch.dtype = torch.bfloat16, shard_bytes: int = 2 * 1024**3,
                          tokenizer_from: str | Path | None = None, overwrite: bool = False) -> Path:
    """Write a ``LlamaForCausalLM`` folder with random weights: linear and embedding weights ~ N(0, 0.02²), norm
    weights 1, in ``dtype``, as safetensors shards of at most ``shard_bytes`` plus the index (Transformers'
    layout), generated one tensor at a time (peak memory about one shard).

    Args:
        vocab: vocabulary size (49152 matches the demo model's tokenizer, copied from ``tokenizer_from``).
        seed: the weights depend only on the shapes and the seed (each tensor from its own generator).

    Returns:
        ``out`` resolved. The folder is created atomically.

    Raises:
        OutputError: ``out`` exists (without ``overwrite``), equals, lies inside or contains ``tokenizer_from``;
            or it cannot be written (no space left, read-only, no permission): nothing partial is left.
    """
    from accelerate import init_empty_weights
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                         max_position_embeddings=4096, tie_word_embeddings=False, torch_dtype=str(dtype)[6:])
    with init_empty_weights():
        skeleton = AutoModelForCausalLM.from_config(config)
    shapes = [(k, tuple(v.shape)) for k, v in skeleton.state_dict().items()]
    itemsize = torch.empty((), dtype=dtype).element_size()
    with atomic_output_dir(out, overwrite, tokenizer_from) as tmp:
        shards: list[list[tuple[str, tuple]]] = [[]]
        size = 0
        for k, shape in shapes:
            n = itemsize * torch.Size(shape).numel()
            if shards[-1] and size + n > shard_bytes:
                shards.append([])
                size = 0
            shards[-1].append((k, shape))
            size += n
        weight_map, total = {}, 0
        for i, shard in enumerate(shards, 1):
            fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            tensors = {}
            for j, (k, shape) in enumerate(shard):
                if k.endswith("norm.weight") or k.endswith("layernorm.weight"):
                    t = torch.ones(shape, dtype=dtype)
                else:
                    g = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(k.encode()))
                    t = (torch.randn(shape, generator=g) * 0.02).to(dtype)
                tensors[k] = t
                weight_map[k] = fname
                total += t.numel() * itemsize
            save_file(tensors, str(tmp / fname), metadata={"format": "pt"})
            del tensors
        (tmp / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2, sort_keys=True))
        config.save_pretrained(tmp)
        if tokenizer_from is not None:
            for name in TOKENIZER_FILES:
                f = Path(tokenizer_from) / name
                if f.is_file() and name != "generation_config.json":
                    shutil.copyfile(f, tmp / name)
    return Path(out).resolve()

