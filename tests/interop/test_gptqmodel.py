"""GPTQModel <-> gptq-plugin: checkpoints GPTQModel writes (v1 ``gptq`` and ``gptq_v2``) load through the plugin,
and checkpoints the plugin writes load in GPTQModel, with the same perplexity (within 0.5%).

Needs ``$GPTQ_PLUGIN_GPTQMODEL_PYTHON`` (see conftest.py); skips with the reason otherwise.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from .conftest import assert_same_ppl, plugin_perplexity, run_tool, tool_output, tool_python

pytestmark = [pytest.mark.interop, pytest.mark.slow]
WORKER = "gptqmodel_worker.py"


@pytest.fixture(scope="session")  # first, so that a missing tool skips before any model is built
def gptqmodel_python() -> str:
    return tool_python("GPTQ_PLUGIN_GPTQMODEL_PYTHON", "gptqmodel", "bash benchmarks/setup_gptqmodel_venv.sh")


@pytest.fixture(scope="module")
def gptqmodel_ckpt(gptqmodel_python, small_model, calib_ids, interop_dir):
    """``factory(fmt) -> dir``: the 2-block demo model quantized by GPTQModel (4-bit sym, group 64) in ``fmt``."""
    cache = {}

    def factory(fmt: str) -> Path:
        if fmt not in cache:
            out, done = tool_output(interop_dir, f"gptqmodel-{fmt}")
            if not done:
                run_tool(gptqmodel_python, WORKER, "quantize", small_model, out, "--calib", calib_ids, "--bits", 4,
                         "--group-size", 64, "--format", fmt, log=interop_dir / f"gptqmodel-quantize-{fmt}.log")
            cache[fmt] = out
        return cache[fmt]

    return factory


@pytest.mark.parametrize("fmt", ["gptq", "gptq_v2"])
def test_gptqmodel_checkpoint_loads_through_the_plugin(gptqmodel_python, gptqmodel_ckpt, eval_ids, interop_dir, fmt):
    ckpt = gptqmodel_ckpt(fmt)
    qcfg = json.loads((ckpt / "config.json").read_text())["quantization_config"]
    assert qcfg.get("checkpoint_format", qcfg.get("format")) == fmt
    from gptq_plugin.checkpoint import inspect_checkpoint

    info = inspect_checkpoint(ckpt)
    assert info["format"] == fmt and info["format_check"].startswith("ok"), info["format_check"]
    tool = run_tool(gptqmodel_python, WORKER, "ppl", ckpt, "--ids", eval_ids,
                    log=interop_dir / f"gptqmodel-ppl-{fmt}.log")
    assert_same_ppl(plugin_perplexity(ckpt, eval_ids), tool["perplexity"],
                    f"GPTQModel {fmt} checkpoint: plugin vs GPTQModel")


@pytest.mark.parametrize("fmt", ["gptq", "gptq_v2"])
def test_plugin_checkpoint_loads_in_gptqmodel(gptqmodel_python, plugin_ckpt, eval_ids, interop_dir, fmt):
    """A 4-bit symmetric checkpoint written by the plugin (v1, and v2 by ``convert``) gives GPTQModel the same
    perplexity as the plugin."""
    ckpt = plugin_ckpt(fmt)
    tool = run_tool(gptqmodel_python, WORKER, "ppl", ckpt, "--ids", eval_ids,
                    log=interop_dir / f"plugin-{fmt}-in-gptqmodel.log")
    assert_same_ppl(tool["perplexity"], plugin_perplexity(ckpt, eval_ids),
                    f"plugin {fmt} checkpoint: GPTQModel vs plugin")


def test_given_gptqmodel_checkpoint(gptqmodel_python, eval_ids, interop_dir, demo_model_dir):
    """``$GPTQ_PLUGIN_GPTQMODEL_CKPT``: a GPTQModel checkpoint made elsewhere (e.g. of the full demo model by
    benchmarks/gptqmodel_baseline.py) loads through the plugin with GPTQModel's perplexity."""
    ckpt = os.environ.get("GPTQ_PLUGIN_GPTQMODEL_CKPT")
    if not ckpt:
        pytest.skip("$GPTQ_PLUGIN_GPTQMODEL_CKPT is not set (a checkpoint folder written by GPTQModel)")
    ckpt = Path(ckpt)
    meta = json.loads((ckpt / "config.json").read_text())["quantization_config"].get("meta") or {}
    assert any(str(q).startswith("gptqmodel") for q in meta.get("quantizer", [])), "not written by GPTQModel"
    from transformers import AutoTokenizer

    if AutoTokenizer.from_pretrained(ckpt).vocab_size != AutoTokenizer.from_pretrained(demo_model_dir).vocab_size:
        pytest.skip(f"{ckpt} is not a checkpoint of the demo model")
    tool = run_tool(gptqmodel_python, WORKER, "ppl", ckpt, "--ids", eval_ids, log=interop_dir / "given-gptqmodel-ppl.log")
    assert_same_ppl(plugin_perplexity(ckpt, eval_ids), tool["perplexity"], f"{ckpt}: plugin vs GPTQModel")
