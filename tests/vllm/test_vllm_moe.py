"""Mixture-of-experts layers under ``--quantization gptq-plugin`` (:mod:`gptq_plugin.adapters.vllm_moe`).

In this process (seconds): the MoE method on an emulated vLLM ``RoutedExperts`` layer, loaded expert by expert through
its weight loader the way vLLM's loader calls it, against the dequantized experts computed here, for 2/3/4/8 bits,
symmetric and asymmetric grids, group sizes -1/16/32/48 (a partial group), act-order, fp32/bf16, tensor-parallel
shards (the ranks' partial sums add up, including cuts inside packed words), expert parallelism and the load-time
errors.

Served (slow, one engine start per case): random Qwen3-MoE and Mixtral models (tests/vllm/vllm_tiny_moe.py) served by
vLLM must give the greedy tokens and prompt log-probabilities of the Transformers model holding the dequantized
weights: 4-bit symmetric g32 in vLLM's default torch.compile mode, 3-bit asymmetric act-order with tensor parallelism
2, and 8-bit act-order in bf16 (the registry's bf16 CPU kernels). vLLM's built-in GPTQ MoE path is checked only on
CPUs it can run on (AMX): elsewhere vLLM 0.32 has no WNA16 MoE kernel for x86 CPUs.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from vllm_helpers import Reference, require_vllm, start_server

require_vllm()

from vllm.model_executor.layers.fused_moe.activation import MoEActivation  # noqa: E402

from gptq_plugin.adapters import vllm as adapter  # noqa: E402
from gptq_plugin.adapters import vllm_moe  # noqa: E402
from gptq_plugin.config import QuantizeConfig  # noqa: E402
from gptq_plugin.errors import CheckpointError, ConfigError  # noqa: E402
from gptq_plugin.kernels import dequantize_weight  # noqa: E402
from vllm_tiny_moe import (build_moe_checkpoint, dequantized_reference, quantize_linear,  # noqa: E402
                           quantize_moe_checkpoint)

SHARDS = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}
LEAVES = ("qweight", "qzeros", "scales", "g_idx")


# --- the method on an emulated RoutedExperts layer, in this process ----------------------------------------------
class _Layer(torch.nn.Module):
    """What the MoE method sees of vLLM's ``RoutedExperts`` on one rank (parameters are registered on it)."""

    ckpt_gate_proj_name, ckpt_up_proj_name, ckpt_down_proj_name = "gate_proj", "up_proj", "down_proj"
    apply_router_weight_on_input = False

    def __init__(self, local_experts: list[int] | None = None, n_global: int = 0):
        super().__init__()
        self.expert_map = None
        if local_experts is not None:  # expert parallelism: global id -> local slot, -1 elsewhere
            self.expert_map = torch.full((n_global,), -1, dtype=torch.int32)
            self.expert_map[local_experts] = torch.arange(len(local_experts), dtype=torch.int32)

    def _map_global_expert_id_to_local_expert_id(self, expert_id: int) -> int:
        return expert_id if self.expert_map is None else int(self.expert_map[expert_id])


def _moe_config(inter: int, tp: int = 1, rank: int = 0, **over) -> SimpleNamespace:
    """The fields of vLLM's ``FusedMoEConfig`` that the method reads."""
    d = dict(activation=MoEActivation.SILU, has_bias=False, intermediate_size=inter, tp_size=tp, tp_rank=rank,
             swiglu_limit=None, swiglu_alpha=None, swiglu_beta=None, tp_shard_with_padding=False, intermediate_pad=None)
    d.update(over)
    return SimpleNamespace(**d)


def _experts(n: int, hidden: int, inter: int, cfg: QuantizeConfig, seed: int = 0) -> list[dict[str, dict]]:
    """``n`` experts' checkpoint tensors ``{"w1"|"w3"|"w2": {leaf: tensor}}`` (gate and up share the act-order)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        order_in = torch.randperm(hidden, generator=g) if cfg.desc_act else None
        order_mid = torch.randperm(inter, generator=g) if cfg.desc_act else None
        out.append({"w1": quantize_linear(torch.randn(inter, hidden, generator=g) * 0.1, cfg, order_in),
                    "w3": quantize_linear(torch.randn(inter, hidden, generator=g) * 0.1, cfg, order_in),
                    "w2": quantize_linear(torch.randn(hidden, inter, generator=g) * 0.1, cfg, order_mid)})
    return out


def _load(experts, cfg: QuantizeConfig, hidden: int, inter: int, dtype, tp=1, rank=0, local=None):
    """Create the method's parameters on a fresh layer and load every (local) expert through the parameters' weight
    loaders with the arguments ``RoutedExperts.load_weights`` passes; then prepare the kernels."""
    qc = adapter.GPTQPluginConfig.from_config(cfg.to_dict())
    layer = _Layer(local, len(experts))
    method = vllm_moe.GPTQPluginMoEMethod(qc, _moe_config(inter, tp, rank), "probe.experts")
    n_local = len(experts) if local is None else len(local)
    method.create_weights(layer, n_local, hidden, inter // tp, dtype, weight_loader=None)
    for e, tensors in enumerate(experts):
        for shard_id, leaves in tensors.items():
            for leaf in LEAVES:
                p = getattr(layer, f"{'w2' if shard_id == 'w2' else 'w13'}_{leaf}")
                ok = p.weight_loader(param=p, loaded_weight=leaves[leaf], weight_name=f"probe.experts.w13_{leaf}",
                                     shard_id=shard_id, expert_id=e, return_success=True)
                assert ok == (local is None or e in local)
    method.process_weights_after_loading(layer)
    return layer, method


def _reference(experts, cfg, x, topk_weights, topk_ids, only=None) -> torch.Tensor:
    """fp32 ``sum_j w_j * down(silu(gate x) * up x)`` from the dequantized checkpoint tensors (experts in ``only``)."""
    W = [{s: dequantize_weight(t["qweight"], t["qzeros"], t["scales"], t["g_idx"], cfg.bits, int(t["g_idx"].numel()))
          for s, t in ex.items()} for ex in experts]
    x = x.float()
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for w, e in zip(topk_weights[t].tolist(), topk_ids[t].tolist()):
            if only is not None and e not in only:
                continue
            h = torch.nn.functional.silu(x[t] @ W[e]["w1"].t()) * (x[t] @ W[e]["w3"].t())
            out[t] += w * (h @ W[e]["w2"].t())
    return out


def _routing(T: int, E: int, k: int, seed: int = 3, unused: int | None = None):
    """Distinct top-k expert ids per token (never ``unused``) and softmax weights, as vLLM's router gives them."""
    g = torch.Generator().manual_seed(seed)
    scores = torch.randn(T, E, generator=g)
    if unused is not None:
        scores[:, unused] = -math.inf
    w, ids = torch.topk(torch.softmax(scores, -1), k, dim=-1)
    return w.float(), ids.to(torch.int32)


def _close(y: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype):
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(y.float(), ref, rtol=tol, atol=tol * float(ref.abs().mean()) + 1e-6)


@pytest.fixture(scope="module")
def vllm_tp1():
    """vLLM's current config (custom-op registration reads it)."""
    from vllm.config import VllmConfig, set_current_vllm_config

    adapter.register()
    with set_current_vllm_config(VllmConfig()):
        yield


@pytest.mark.parametrize("bits, gs, desc_act, sym, hidden, inter, tp, dtype", [
    (4, 32, False, True, 64, 128, 1, torch.float32),
    (4, 32, True, False, 64, 128, 2, torch.bfloat16),   # act-order: down's g_idx rows split, all groups kept
    (3, 32, True, False, 64, 96, 2, torch.float32),     # 48 rows of 3-bit codes per rank: cuts inside packed words
    (2, -1, False, False, 64, 64, 2, torch.float32),
    (8, 16, False, True, 64, 64, 2, torch.bfloat16),    # 32 rows per rank = 2 whole groups: scales split with them
    (3, 48, False, True, 80, 64, 1, torch.float16),     # partial last group of the gate/up input (80 = 48 + 32)
], ids=["4b-g32-sym", "4b-g32-actorder-asym-tp2", "3b-g32-actorder-asym-tp2-odd", "2b-gall-asym-tp2",
        "8b-g16-sym-tp2", "3b-g48-partial-fp16"])
def test_method_matches_dequantized_experts(vllm_tp1, bits, gs, desc_act, sym, hidden, inter, tp, dtype):
    cfg = QuantizeConfig(bits=bits, group_size=gs, desc_act=desc_act, sym=sym)
    experts = _experts(4, hidden, inter, cfg, seed=bits)
    x = torch.randn(7, hidden, generator=torch.Generator().manual_seed(1)).to(dtype)
    w, ids = _routing(7, 4, 2, unused=2)  # expert 2 gets no token
    y = 0
    for rank in range(tp):  # the runner all-reduces the ranks' partial sums
        layer, method = _load(experts, cfg, hidden, inter, dtype, tp, rank)
        out = method.apply(layer, x, w, ids)
        assert out.dtype == dtype and out.shape == x.shape
        y = y + out.float()
    _close(y, _reference(experts, cfg, x, w, ids), dtype)


def test_expert_parallel_rank_runs_its_experts_only(vllm_tp1):
    cfg = QuantizeConfig(bits=4, group_size=32, desc_act=True, sym=False)
    experts = _experts(4, 64, 64, cfg)
    x = torch.randn(6, 64, generator=torch.Generator().manual_seed(1))
    w, ids = _routing(6, 4, 2)
    layer, method = _load(experts, cfg, 64, 64, torch.float32, local=[1, 3])
    _close(method.apply(layer, x, w, ids), _reference(experts, cfg, x, w, ids, only={1, 3}), torch.float32)


def test_router_weight_applied_on_input(vllm_tp1):
    cfg = QuantizeConfig(bits=8, group_size=32, sym=True)
    experts = _experts(3, 64, 64, cfg)
    x = torch.randn(5, 64, generator=torch.Generator().manual_seed(1))
    w, ids = _routing(5, 3, 1)
    layer, method = _load(experts, cfg, 64, 64, torch.float32)
    layer.apply_router_weight_on_input = True
    ref = _reference(experts, cfg, x * w, torch.ones_like(w), ids)  # top-1: scaling the input scales the gate/up
    _close(method.apply(layer, x, w, ids), ref, torch.float32)


def test_gate_and_up_with_different_act_order_are_rejected(vllm_tp1):
    cfg = QuantizeConfig(bits=4, group_size=32, desc_act=True, sym=True)
    experts = _experts(2, 64, 64, cfg)
    experts[1]["w3"]["g_idx"] = experts[1]["w3"]["g_idx"].flip(0).contiguous()
    with pytest.raises(CheckpointError, match=r"probe\.experts\.1\.gate_proj\.g_idx and .*up_proj\.g_idx differ"):
        _load(experts, cfg, 64, 64, torch.float32)


def test_unservable_layers_fail_at_load_naming_the_layer(vllm_tp1):
    qc = adapter.GPTQPluginConfig.from_config(QuantizeConfig(bits=4, group_size=32).to_dict())
    with pytest.raises(ConfigError, match=r"probe\.experts: expert activation 'gelu'"):
        vllm_moe.GPTQPluginMoEMethod(qc, _moe_config(64, activation=MoEActivation.GELU), "probe.experts")
    with pytest.raises(CheckpointError, match=r"probe\.experts: this model's experts have biases"):
        vllm_moe.GPTQPluginMoEMethod(qc, _moe_config(64, has_bias=True), "probe.experts")
    with pytest.raises(ConfigError, match=r"SwiGLU options"):
        vllm_moe.GPTQPluginMoEMethod(qc, _moe_config(64, swiglu_limit=7.0), "probe.experts")

    cfg = QuantizeConfig(bits=4, group_size=32)
    experts = _experts(1, 64, 64, cfg)
    layer = _Layer()
    method = vllm_moe.GPTQPluginMoEMethod(qc, _moe_config(64), "probe.experts")
    method.create_weights(layer, 1, 64, 64, torch.float32)
    p = layer.w13_qweight
    with pytest.raises(CheckpointError, match=r"fused expert tensors"):
        p.weight_loader(param=p, loaded_weight=torch.zeros(2, 8, 64, dtype=torch.int32),
                        weight_name="probe.experts.w13_qweight", shard_id="w1", expert_id=0, return_success=True)
    with pytest.raises(CheckpointError, match=r"probe\.experts\.0\.up_proj\.qweight has shape \(8, 32\)"):
        p.weight_loader(param=p, loaded_weight=experts[0]["w3"]["qweight"][:, :32],
                        weight_name="probe.experts.w13_qweight", shard_id="w3", expert_id=0, return_success=True)


def test_layers_without_quantized_experts_keep_vllms_method(vllm_tp1, monkeypatch):
    from vllm.model_executor.layers.fused_moe import unquantized_fused_moe_method as unquantized

    monkeypatch.setattr(unquantized, "UnquantizedFusedMoEMethod", lambda moe: ("unquantized", moe))
    qc = adapter.GPTQPluginConfig.from_config(QuantizeConfig(bits=4, group_size=32).to_dict())
    layer = SimpleNamespace(moe_config=_moe_config(64))
    qc.quantized_modules = ["model.layers.0.mlp.experts.0.gate_proj", "model.layers.0.self_attn.q_proj"]
    assert isinstance(vllm_moe.moe_quant_method(qc, layer, "model.layers.0.mlp.experts"),
                      vllm_moe.GPTQPluginMoEMethod)
    qc.quantized_modules = ["model.layers.0.self_attn.q_proj", "model.layers.0.mlp.experts_x.0.gate_proj"]
    assert vllm_moe.moe_quant_method(qc, layer, "model.layers.0.mlp.experts") == ("unquantized", layer.moe_config)


# --- served by vLLM ----------------------------------------------------------------------------------------------
PROMPTS = [
    [0] + list(range(5, 40)),
    [0, 17, 300, 42, 42, 7, 99, 250, 11, 12, 13, 500, 3, 64],
    [0] + [(37 * i) % 500 + 3 for i in range(48)],
]
N_TOKENS = 16
COMMON = ["--quantization", "gptq-plugin", "--max-model-len", "128", "--max-num-seqs", "4"]
LOGPROB_TOL = 1e-3  # fp32 server vs fp32 Transformers on the same dequantized weights (measured: < 1e-5)
BF16_GAP = 0.25  # nats: how far from the fp32 reference's argmax a bf16 server's greedy token may be

SERVED = {
    # name: (arch, bits, group_size, desc_act, sym, extra vLLM args, env); "core-": GPTQ by the core
    # (quantize_model + save_quantized, act-order with dynamic groups for the act-order case), else the RTN builder
    "core-qwen3-4bit-g32-sym-compiled": ("qwen3_moe", 4, 32, False, True, ["--dtype", "float32"], None),
    "core-mixtral-3bit-g64-actorder-asym-tp2": ("mixtral", 3, 64, True, False,
                                                ["--dtype", "float32", "--enforce-eager", "--tensor-parallel-size", "2"],
                                                {"VLLM_CPU_OMP_THREADS_BIND": "0|1"}),
    "qwen3-8bit-g64-actorder-sym-bf16": ("qwen3_moe", 8, 64, True, True, ["--dtype", "bfloat16", "--enforce-eager"],
                                         None),
}


class MoEReference(Reference):
    """The Transformers model with the checkpoint's dequantized weights (fp32), independent of vLLM and the plugin's
    kernels."""

    def __init__(self, ckpt):
        self.model = dequantized_reference(ckpt)


def _max_abs_diff(a: list[list[float]], b: list[list[float]]) -> float:
    return max(abs(x - y) for pa, pb in zip(a, b) for x, y in zip(pa, pb, strict=True))


@pytest.fixture(scope="module", params=list(SERVED))
def served(request, vllm_available, tmp_path_factory, server_logs):
    """Build the case's checkpoint, serve it once, and collect greedy tokens and prompt log-probabilities."""
    arch, bits, gs, desc_act, sym, extra, env = SERVED[request.param]
    folder = tmp_path_factory.mktemp("moe") / request.param
    if request.param.startswith("core-"):
        ckpt = quantize_moe_checkpoint(folder, arch, bits, gs, desc_act, sym)
    else:
        ckpt = build_moe_checkpoint(folder, arch, bits, gs, desc_act, sym)
    with start_server(ckpt, COMMON + extra, server_logs, request.param, env=env) as s:
        log = s.log_path.read_text(errors="replace")
        out = {"greedy": [s.greedy_tokens(p, N_TOKENS) for p in PROMPTS],
               "logprobs": [s.prompt_logprobs(p) for p in PROMPTS], "log": log}
    out["name"], out["ref"], out["bf16"] = request.param, MoEReference(ckpt), "bfloat16" in extra
    return out


@pytest.mark.integration
@pytest.mark.slow
def test_served_moe_matches_dequantized_reference(served):
    ref = served["ref"]
    assert "gptq-plugin: experts of model.layers.0." in served["log"]  # the plugin's MoE method ran
    if served["bf16"]:  # bf16 rounds differently: every greedy token must be (close to) the fp32 argmax
        for p, got in zip(PROMPTS, served["greedy"]):
            gap = ref.greedy_gap(p, got)
            assert gap < BF16_GAP, f"prompt {p}: vLLM {got}, reference {ref.greedy(p, N_TOKENS)} (gap {gap:.3f})"
        lp_ref = [ref.prompt_logprobs(p) for p in PROMPTS]
        ppl = [math.exp(-sum(a) / len(a)) for a in (sum(served["logprobs"], []), sum(lp_ref, []))]
        assert abs(ppl[0] / ppl[1] - 1) < 0.02, ppl
        return
    assert served["greedy"] == [ref.greedy(p, N_TOKENS) for p in PROMPTS]
    assert _max_abs_diff(served["logprobs"], [ref.prompt_logprobs(p) for p in PROMPTS]) < LOGPROB_TOL


def _cpu_has_amx() -> bool:
    fn = getattr(torch.cpu, "_is_amx_tile_supported", None)
    return bool(fn and fn())


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.skipif(not _cpu_has_amx(), reason="vLLM 0.32's built-in GPTQ MoE on CPU needs AMX (CPUExpertsInt4) or "
                    "zentorch; elsewhere it fails with 'No WNA16 MoE backend supports the deployment configuration'")
def test_builtin_gptq_serves_our_moe_checkpoint(vllm_available, tmp_path_factory, server_logs):
    ckpt = build_moe_checkpoint(tmp_path_factory.mktemp("moe") / "builtin", "qwen3_moe", 4, 32, False, True)
    ref = MoEReference(ckpt)
    args = ["--dtype", "bfloat16", "--enforce-eager", "--max-model-len", "128", "--max-num-seqs", "4"]
    with start_server(ckpt, args, server_logs, "moe-builtin-gptq") as s:  # no --quantization: vLLM's own method
        for p in PROMPTS:
            got = s.greedy_tokens(p, N_TOKENS)
            assert ref.greedy_gap(p, got) < 1.0, f"prompt {p}: built-in {got}, reference {ref.greedy(p, N_TOKENS)}"
