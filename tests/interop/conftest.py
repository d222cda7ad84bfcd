"""Fixtures of the cross-tool tests: other tools (GPTQModel, llm-compressor, vLLM's built-in GPTQ) run in their
own virtual environments, named by environment variables; each test skips with the reason when its tool is
not configured or does not start.

=============================== ==========================================================================
``GPTQ_PLUGIN_GPTQMODEL_PYTHON`` python of a venv with GPTQModel (``bash benchmarks/setup_gptqmodel_venv.sh``)
``GPTQ_PLUGIN_GPTQMODEL_CKPT``   optional: a checkpoint GPTQModel wrote (e.g. of the full demo model)
``GPTQ_PLUGIN_LLMC_PYTHON``      python of a venv with llm-compressor (``bash tests/interop/setup_llmc_venv.sh``)
``GPTQ_PLUGIN_VLLM_PYTHON``      python of a venv with vLLM (its built-in GPTQ; with gptq-plugin installed there
                                 too, test_llmc_adapters.py also runs ``--quantization gptq-plugin``)
``GPTQ_PLUGIN_TGI_PYTHON``       python of a venv with TGI's server dependencies and gptq-plugin (docs/tgi.md),
                                 with ``TGI_SERVER_SRC``: a text-generation-inference checkout's ``server/``
``GPTQ_PLUGIN_INTEROP_WINDOWS``  evaluation windows (default 8) of 256 tokens of WikiText-2 test
``GPTQ_PLUGIN_INTEROP_CACHE``    optional folder where the checkpoints the other tools write are kept and reused
=============================== ==========================================================================

The model is the demo model cut to its first 2 decoder blocks (a small model whose perplexity is a sensitive
function of every quantized weight); perplexities of one checkpoint under two tools must agree within 0.5%.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent
REL_TOL = 0.005  # perplexities of one checkpoint under two tools
TOOL_TIMEOUT = float(os.environ.get("GPTQ_PLUGIN_INTEROP_TIMEOUT", "1800"))


def pytest_configure(config):
    config.addinivalue_line("markers", "interop: cross-tool test (needs another tool's venv, see tests/interop)")


def tool_python(var: str, module: str, setup: str) -> str:
    """The python of ``$var`` when it imports ``module``; else skip with the reason."""
    py = os.environ.get(var)
    if not py:
        pytest.skip(f"${var} is not set: point it at the python of a venv with {module} ({setup})")
    if not Path(py).is_file():
        pytest.skip(f"${var}={py} does not exist")
    p = subprocess.run([py, "-c", f"import {module}; print({module}.__version__)"], capture_output=True, text=True,
                       timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""})
    if p.returncode:
        pytest.skip(f"{module} does not import in {py}: {p.stderr.strip().splitlines()[-1] if p.stderr.strip() else '?'}")
    return py


def run_tool(python: str, script: str, *args, log: Path) -> dict:
    """Run ``script`` (in this folder) with ``python``; return its last stdout line as JSON. stderr goes to ``log``.

    Fails the test (not skip) when the tool ran and failed: that is a finding, with the log's tail."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": "",
           "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    env.pop("PYTHONPATH", None)
    with open(log, "w") as err:
        p = subprocess.run([python, str(HERE / script), *map(str, args)], stdout=subprocess.PIPE, stderr=err,
                           text=True, timeout=TOOL_TIMEOUT, env=env)
    lines = [l for l in p.stdout.strip().splitlines() if l.strip()]
    if p.returncode or not lines:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-25:])
        pytest.fail(f"{script} {args[0]} failed (exit {p.returncode}); log {log}:\n{tail}")
    return json.loads(lines[-1])


def tool_output(interop_dir: Path, name: str) -> tuple[Path, bool]:
    """Where a tool writes checkpoint ``name``, and whether a complete one is already there (reused from
    ``$GPTQ_PLUGIN_INTEROP_CACHE`` when set: the other tools are slow on a CPU)."""
    root = Path(os.environ.get("GPTQ_PLUGIN_INTEROP_CACHE") or interop_dir)
    root.mkdir(parents=True, exist_ok=True)
    out = root / name
    return out, (out / "config.json").is_file() and any(out.glob("*.safetensors"))


@pytest.fixture(scope="session")
def interop_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("interop")


@pytest.fixture(scope="session")
def small_model(demo_model_dir, interop_dir) -> Path:
    """The demo model cut to its first 2 decoder blocks, as a Hugging Face folder (weights as shipped)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = interop_dir / "smollm2-2blocks"
    if not (out / "config.json").is_file():
        model = AutoModelForCausalLM.from_pretrained(demo_model_dir)
        model.model.layers = model.model.layers[:2]
        model.config.num_hidden_layers = 2
        model.save_pretrained(out)
        AutoTokenizer.from_pretrained(demo_model_dir).save_pretrained(out)
    return out


def _windows_json(model_dir: Path, text: Path, n: int, out: Path) -> Path:
    from transformers import AutoTokenizer

    from gptq_plugin.evaluate import eval_windows

    ids = eval_windows(AutoTokenizer.from_pretrained(model_dir), text, 256, n)
    out.write_text(json.dumps(ids.tolist()))
    return out


@pytest.fixture(scope="session")
def eval_ids(small_model, data_dir, interop_dir) -> Path:
    n = int(os.environ.get("GPTQ_PLUGIN_INTEROP_WINDOWS", "8"))
    return _windows_json(small_model, data_dir / "wikitext-2" / "wiki.test.raw", n, interop_dir / "eval.json")


@pytest.fixture(scope="session")
def calib_ids(small_model, data_dir, interop_dir) -> Path:
    return _windows_json(small_model, data_dir / "wikitext-2" / "valid.tokens.txt", 16, interop_dir / "calib.json")


@pytest.fixture(scope="session")
def plugin_ckpt(small_model, calib_ids, interop_dir):
    """``factory(fmt) -> dir``: the 2-block demo model GPTQ-quantized by the plugin (4-bit sym, group 64, the
    GPTQ flavour every runtime serves), written as v1 and converted to ``fmt``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from gptq_plugin.checkpoint import save_quantized
    from gptq_plugin.config import QuantizeConfig
    from gptq_plugin.convert import convert_checkpoint
    from gptq_plugin.pipeline import quantize_model

    def factory(fmt: str = "gptq") -> Path:
        v1 = interop_dir / "plugin-gptq"
        if not v1.exists():
            cfg = QuantizeConfig(bits=4, group_size=64, sym=True)
            model = AutoModelForCausalLM.from_pretrained(small_model, dtype=torch.float32)
            calib = torch.tensor(json.loads(Path(calib_ids).read_text()), dtype=torch.long)
            quantize_model(model, calib, cfg, progress=False)
            save_quantized(model, cfg, v1, tokenizer=AutoTokenizer.from_pretrained(small_model), source_dir=small_model)
        out = interop_dir / f"plugin-{fmt}"
        if not out.exists():
            convert_checkpoint(v1, out, fmt)
        return out

    return factory


def plugin_perplexity(ckpt: Path, ids_json: Path, dtype: torch.dtype = torch.float32) -> float:
    """Perplexity of ``ckpt`` loaded through the plugin's reader (fp32 compute by default)."""
    from gptq_plugin.checkpoint import load_quantized
    from gptq_plugin.evaluate import perplexity

    ids = torch.tensor(json.loads(Path(ids_json).read_text()), dtype=torch.long)
    return perplexity(load_quantized(ckpt, dtype=dtype), ids, batch_size=4, progress=False)


def assert_same_ppl(a: float, b: float, what: str) -> None:
    rel = abs(a / b - 1)
    print(f"{what}: {a:.4f} vs {b:.4f} (rel {rel:.2e})")
    assert rel < REL_TOL, f"{what}: perplexity {a:.4f} vs {b:.4f} differ by {rel:.2%} (> {REL_TOL:.1%})"
