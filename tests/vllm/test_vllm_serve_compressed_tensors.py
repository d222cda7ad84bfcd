"""End to end: a compressed-tensors ``pack-quantized`` checkpoint (``gptq-plugin convert --to compressed-tensors`` of a
GPTQ checkpoint) served with ``vllm serve CT --quantization gptq-plugin`` gives what the GPTQ original gives: the
same greedy tokens and prompt log-probabilities (fp32) at tensor-parallel size 1, and the plugin's own PyTorch model's
at tensor-parallel size 2. Small random Llama of vllm_tiny.py (8 heads, biases), quantized here."""

from __future__ import annotations

import json

import pytest

from vllm_helpers import Reference, require_vllm, start_server

require_vllm()

pytestmark = [pytest.mark.integration, pytest.mark.slow]

PROMPTS = [[0] + list(range(5, 40)), [0, 17, 300, 42, 42, 7, 99, 250, 11, 12, 13, 500, 3, 64]]
N_TOKENS = 16
ARGS = ["--quantization", "gptq-plugin", "--dtype", "float32", "--max-model-len", "128", "--enforce-eager",
        "--max-num-seqs", "4"]
VARIANTS = {
    # name: (bits, group_size, desc_act, sym, serve the GPTQ original too)
    "4bit-g32-actorder-asym": (4, 32, True, False, True),
    "3bit-g32-actorder-sym": (3, 32, True, True, False),
}


def _run(server) -> dict:
    return {"greedy": [server.greedy_tokens(p, N_TOKENS) for p in PROMPTS],
            "logprobs": [server.prompt_logprobs(p) for p in PROMPTS]}


@pytest.fixture(scope="module", params=list(VARIANTS))
def results(request, vllm_available, tmp_path_factory, server_logs):
    from gptq_plugin.convert import convert_checkpoint
    from vllm_tiny import quantize_and_save

    bits, gs, desc_act, sym, serve_gptq = VARIANTS[request.param]
    root = tmp_path_factory.mktemp(request.param)
    gptq = quantize_and_save(root / "gptq", bits, gs, desc_act, sym)
    ct = root / "ct"
    convert_checkpoint(gptq, ct, "compressed-tensors")
    assert json.loads((ct / "config.json").read_text())["quantization_config"]["quant_method"] == "compressed-tensors"
    ref = Reference(gptq)
    out = {"ref": {"greedy": [ref.greedy(p, N_TOKENS) for p in PROMPTS],
                   "logprobs": [ref.prompt_logprobs(p) for p in PROMPTS]}}
    if serve_gptq:
        with start_server(gptq, ARGS + ["--tensor-parallel-size", "1"], server_logs, f"{request.param}-gptq") as s:
            out["gptq"] = _run(s)
    with start_server(ct, ARGS + ["--tensor-parallel-size", "1"], server_logs, f"{request.param}-ct-tp1") as s:
        out["ct-tp1"] = _run(s)
    with start_server(ct, ARGS + ["--tensor-parallel-size", "2"], server_logs, f"{request.param}-ct-tp2",
                      env={"VLLM_CPU_OMP_THREADS_BIND": "0|1"}) as s:
        out["ct-tp2"] = _run(s)
    return out


def _max_abs_diff(a, b) -> float:
    return max(abs(x - y) for pa, pb in zip(a, b) for x, y in zip(pa, pb, strict=True))


def test_ct_equals_gptq(results):
    if "gptq" not in results:
        pytest.skip("this variant serves only the compressed-tensors copy (compared with the reference below)")
    assert results["ct-tp1"]["greedy"] == results["gptq"]["greedy"]
    assert _max_abs_diff(results["ct-tp1"]["logprobs"], results["gptq"]["logprobs"]) < 1e-5


@pytest.mark.parametrize("run", ["ct-tp1", "ct-tp2"])
def test_ct_matches_reference(results, run):
    assert results[run]["greedy"] == results["ref"]["greedy"]
    assert _max_abs_diff(results[run]["logprobs"], results["ref"]["logprobs"]) < 5e-3
