"""Fixtures of the Transformers adapter tests: a one-block copy of the demo model, the same GPTQ settings and
calibration windows quantized once through ``from_pretrained(..., quantization_config=GPTQPluginConfig(...))``
and once through the CLI. Everything skips with the reason when the demo model or the shared data is absent.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from hf_support import CLI_FLAGS, N_BLOCKS, NSAMPLES, SEQLEN, SETTINGS  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model_dir(demo_model_dir, tmp_path_factory) -> Path:
    """The demo model (bf16) cut to its first ``N_BLOCKS`` decoder blocks, as a Hugging Face folder."""
    from transformers import AutoModelForCausalLM

    out = tmp_path_factory.mktemp("tiny") / "smollm2-tiny"
    model = AutoModelForCausalLM.from_pretrained(demo_model_dir, dtype=torch.bfloat16)
    model.model.layers = model.model.layers[:N_BLOCKS]
    model.config.num_hidden_layers = N_BLOCKS
    model.save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"):
        if (demo_model_dir / name).is_file():
            shutil.copyfile(demo_model_dir / name, out / name)
    return out


@pytest.fixture(scope="session")
def calib_file(data_dir) -> Path:
    return data_dir / "wikitext-2" / "valid.tokens.txt"


@pytest.fixture(scope="session")
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="session")
def hf_quantized(tiny_model_dir, calib_file, tokenizer):
    """Quantized on load by Transformers through the plugin (default dtype: "auto", the source's bf16)."""
    from transformers import AutoModelForCausalLM

    from gptq_plugin import GPTQPluginConfig

    cfg = GPTQPluginConfig(**SETTINGS, dataset=str(calib_file), tokenizer=tokenizer, nsamples=NSAMPLES, seqlen=SEQLEN)
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, quantization_config=cfg)


@pytest.fixture(scope="session")
def hf_checkpoint(hf_quantized, tokenizer, tmp_path_factory) -> Path:
    """``save_pretrained`` of the model quantized on load, plus its tokenizer and ``quantize_config.json``."""
    out = tmp_path_factory.mktemp("hf") / "q"
    hf_quantized.save_pretrained(out)
    tokenizer.save_pretrained(out)
    hf_quantized.config.quantization_config.to_json_file(out / "quantize_config.json")
    return out


@pytest.fixture(scope="session")
def cli_checkpoint(tiny_model_dir, calib_file, tmp_path_factory) -> Path:
    """``gptq-plugin quantize`` with the same settings and calibration windows (run in this process)."""
    from gptq_plugin.cli import main

    out = tmp_path_factory.mktemp("cli") / "q"
    with pytest.raises(SystemExit) as done:
        main(["quantize", str(tiny_model_dir), str(out), *CLI_FLAGS, "--dataset", str(calib_file),
              "--nsamples", str(NSAMPLES), "--seqlen", str(SEQLEN)])
    assert done.value.code == 0
    return out
