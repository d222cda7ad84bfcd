"""llm-compressor (compressed-tensors ``pack-quantized``) <-> gptq-plugin: checkpoints llm-compressor writes load
through the plugin with the perplexity Transformers + compressed-tensors give them (within 0.5%), and the
plugin's compressed-tensors writer produces checkpoints that compressed-tensors reads back the same way.

Needs ``$GPTQ_PLUGIN_LLMC_PYTHON`` (see conftest.py); skips with the reason otherwise.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from .conftest import assert_same_ppl, plugin_perplexity, run_tool, tool_output, tool_python

pytestmark = [pytest.mark.interop, pytest.mark.slow]
WORKER = "llmc_worker.py"
SCHEMES = {
    "w4-sym-g64": ["--bits", 4, "--group-size", 64],
    # compressed-tensors >= 0.19 removed actorder "group" (weight_g_idx): "weight" is what llm-compressor makes
    "w4-asym-g64-actorder-weight": ["--bits", 4, "--group-size", 64, "--no-sym", "--actorder", "weight"],
    "w3-asym-g64": ["--bits", 3, "--group-size", 64, "--no-sym"],
}


@pytest.fixture(scope="session")  # first, so that a missing tool skips before any model is built
def llmc_python() -> str:
    return tool_python("GPTQ_PLUGIN_LLMC_PYTHON", "llmcompressor", "bash tests/interop/setup_llmc_venv.sh")


@pytest.fixture(scope="module")
def llmc_ckpt(llmc_python, small_model, calib_ids, interop_dir):
    cache = {}

    def factory(scheme: str) -> Path:
        if scheme not in cache:
            out, done = tool_output(interop_dir, f"llmc-{scheme}")
            if not done:
                run_tool(llmc_python, WORKER, "quantize", small_model, out, "--calib", calib_ids, *SCHEMES[scheme],
                         log=interop_dir / f"llmc-quantize-{scheme}.log")
            cache[scheme] = out
        return cache[scheme]

    return factory


@pytest.mark.parametrize("scheme", list(SCHEMES))
def test_llmcompressor_checkpoint_loads_through_the_plugin(llmc_python, llmc_ckpt, eval_ids, interop_dir, scheme):
    ckpt = llmc_ckpt(scheme)
    qcfg = json.loads((ckpt / "config.json").read_text())["quantization_config"]
    assert qcfg["quant_method"] == "compressed-tensors" and qcfg["format"] == "pack-quantized"
    from gptq_plugin.checkpoint import inspect_checkpoint

    assert inspect_checkpoint(ckpt)["format"] == "compressed-tensors"
    tool = run_tool(llmc_python, WORKER, "ppl", ckpt, "--ids", eval_ids, log=interop_dir / f"llmc-ppl-{scheme}.log")
    assert_same_ppl(plugin_perplexity(ckpt, eval_ids), tool["perplexity"],
                    f"llm-compressor {scheme}: plugin vs Transformers+compressed-tensors")


@pytest.mark.parametrize("scheme", list(SCHEMES))
def test_plugin_round_trip_of_llmcompressor_checkpoint(llmc_python, llmc_ckpt, eval_ids, interop_dir, tmp_path, scheme):
    """llm-compressor -> gptq_v2 -> compressed-tensors (the plugin's writer) gives identical tensors, and
    compressed-tensors itself reads the plugin-written checkpoint with the same perplexity."""
    from safetensors.torch import load_file

    from gptq_plugin.convert import convert_checkpoint

    src = llmc_ckpt(scheme)
    convert_checkpoint(src, tmp_path / "v2", "gptq_v2")
    convert_checkpoint(tmp_path / "v2", tmp_path / "ct", "compressed-tensors")

    def tensors(p):
        out = {}
        for f in sorted(p.glob("*.safetensors")):
            out.update(load_file(str(f)))
        return out

    a, b = tensors(src), tensors(tmp_path / "ct")
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and (a[k] == b[k]).all(), k
    tool = run_tool(llmc_python, WORKER, "ppl", tmp_path / "ct", "--ids", eval_ids,
                    log=interop_dir / f"llmc-ppl-plugin-written-{scheme}.log")
    assert_same_ppl(tool["perplexity"], plugin_perplexity(tmp_path / "v2", eval_ids),
                    f"plugin-written compressed-tensors ({scheme}): compressed-tensors vs plugin (v2)")
