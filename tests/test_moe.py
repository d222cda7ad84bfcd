"""Mixture-of-experts models (issue 16): every expert quantized as its own GPTQ layer, calibrated, reported, saved
under the checkpoint's per-expert names, loaded back (core loader, Transformers, streaming), nothing left
unquantized silently. Tiny random Qwen3-MoE and Mixtral models; the references are independent of the code under
test: the fused Transformers module run with the dequantized weights written back into its 3-D parameters, and
token counts taken from the router itself."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from kernels.reference import dequantize_weight
from gptq_plugin.checkpoint import inspect_checkpoint, load_quantized, save_quantized
from gptq_plugin.config import QuantizeConfig
from gptq_plugin.errors import ConfigError
from gptq_plugin.linear import QuantLinear
from gptq_plugin.moe import ExpertLinears, checkpoint_projection_names, is_fused_experts
from gptq_plugin.pipeline import quantize_model

from .tiny import tiny_moe

ARCHS = ("qwen3_moe", "mixtral")
E, TOP_K, LAYERS = 8, 2, 2
CALIB = torch.randint(0, 128, (8, 32), generator=torch.Generator().manual_seed(1))
MOE = {"qwen3_moe": "mlp", "mixtral": "block_sparse_moe"}  # the MoE module's name in the checkpoints
PROJ = {"qwen3_moe": ("gate_proj", "up_proj", "down_proj"), "mixtral": ("w1", "w3", "w2")}


def _quantize(arch: str, **kw):
    model = tiny_moe(arch, layers=LAYERS, experts=E, top_k=TOP_K)
    float_model = tiny_moe(arch, layers=LAYERS, experts=E, top_k=TOP_K)
    cfg = QuantizeConfig(bits=4, group_size=32, **kw)
    report = quantize_model(model, CALIB, cfg, batch_size=4, progress=False)
    return model, float_model, cfg, report


def _dequantized_fused(model: nn.Module, float_model: nn.Module) -> nn.Module:
    """``float_model`` (the untouched Transformers model, fused experts) with every quantized weight of ``model``
    written back, dequantized with the reference formula: the reference the quantized model must reproduce."""
    for name, m in model.named_modules():
        if not isinstance(m, QuantLinear):
            continue
        W = dequantize_weight(m.qweight, m.qzeros, m.scales, m.g_idx, m.bits, m.in_features)  # [out, in]
        parts = name.split(".")
        with torch.no_grad():
            if "experts" in parts and parts[parts.index("experts") + 1].isdigit():
                i = parts.index("experts")
                e, fused = int(parts[i + 1]), float_model.get_submodule(".".join(parts[:i + 1]))
                which = model.get_submodule(".".join(parts[:i + 2])).names.index(parts[-1])  # gate, up, down
                inter = fused.down_proj.shape[2]
                target = (fused.gate_up_proj[e, :inter], fused.gate_up_proj[e, inter:], fused.down_proj[e])[which]
                target.copy_(W)
            else:
                float_model.get_submodule(name).weight.copy_(W)
    return float_model


@pytest.mark.parametrize("arch", ARCHS)
def test_every_expert_is_quantized_and_the_model_equals_its_dequantized_reference(arch):
    model, float_model, cfg, report = _quantize(arch)
    experts = [n for n, m in model.named_modules() if isinstance(m, QuantLinear) and ".experts." in n]
    assert len(experts) == E * 3 * LAYERS
    assert sum(isinstance(m, QuantLinear) for m in model.modules()) == LAYERS * (4 + 3 * E)
    assert all(isinstance(layer.mlp.experts, ExpertLinears) for layer in model.model.layers)
    assert not any(isinstance(m, nn.Linear) and not getattr(m, "gptq_plugin_role", None)
                   for m in model.model.layers.modules())  # only the routers stay float
    assert report.unquantized == [f"model.layers.{l}.{MOE[arch]}.gate.weight" for l in range(LAYERS)]
    ref = _dequantized_fused(model, float_model)
    ids = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        got, want = model(ids).logits, ref(ids).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def _router_counts(float_model, arch) -> list[list[int]]:
    """Routed tokens per expert of each layer, from the float model's own routers (hooks on the fused experts)."""
    counts = []

    def hook(module, args):
        counts.append(torch.bincount(args[1].flatten(), minlength=E).tolist())

    hs = [layer.mlp.experts.register_forward_pre_hook(hook) for layer in float_model.model.layers]
    with torch.no_grad():
        float_model(CALIB)
    for h in hs:
        h.remove()
    return counts


@pytest.mark.parametrize("mode", ["all", "routed"])
def test_report_counts_each_experts_routed_tokens(mode):
    model, float_model, cfg, report = _quantize("qwen3_moe", moe_calibration=mode, moe_min_tokens=0)
    experts = report.experts()
    assert len(experts) == E * LAYERS
    for layer in range(LAYERS):
        seen = [experts[f"model.layers.{layer}.mlp.experts.{e}"]["tokens"] for e in range(E)]
        assert sum(seen) == CALIB.numel() * TOP_K
    # without true-sequential, block 0's Hessians come from the float block: its routing is the float model's
    model, float_model, cfg, report = _quantize("qwen3_moe", moe_calibration=mode, moe_min_tokens=0,
                                                true_sequential=False)
    experts = report.experts()
    first = [experts[f"model.layers.0.mlp.experts.{e}"]["tokens"] for e in range(E)]
    assert first == _router_counts(float_model, "qwen3_moe")[0]
    assert {e["path"] for e in experts.values()} == {f"gptq ({mode} tokens)"}
    row = next(l for l in report.layers if l.name == "model.layers.0.mlp.experts.3.down_proj")
    assert row.tokens == first[3]


def _starve_expert(model, expert: int) -> None:
    """Make every router of ``model`` never choose ``expert`` (its logit is -inf)."""
    for layer in model.model.layers:
        gate = layer.mlp.gate
        forward = gate.forward

        def masked(hidden_states, forward=forward, gate=gate):
            w = gate.weight.data.clone()
            gate.weight.data[expert] = 0
            try:
                logits = nn.functional.linear(hidden_states.reshape(-1, w.shape[1]), w)
                logits[:, expert] = float("-inf")
                probs = torch.softmax(logits, dim=-1)
                top, idx = torch.topk(probs, TOP_K, dim=-1)
                return logits, top / top.sum(-1, keepdim=True), idx
            finally:
                gate.weight.data = w
        gate.forward = masked


@pytest.mark.parametrize("mode", ["all", "routed"])
def test_an_expert_without_tokens_is_quantized_by_the_named_path(mode, caplog):
    model = tiny_moe("mixtral", layers=1, experts=E, top_k=TOP_K)
    _starve_expert(model, 5)
    cfg = QuantizeConfig(bits=4, group_size=32, moe_calibration=mode, moe_min_tokens=8)
    report = quantize_model(model, CALIB, cfg, batch_size=4, progress=False)
    starved = report.experts()["model.layers.0.block_sparse_moe.experts.5"]  # the checkpoint's names
    assert starved["tokens"] == 0
    layers = [n for n, m in model.named_modules() if isinstance(m, QuantLinear) and ".experts.5." in n]
    assert len(layers) == 3  # quantized, never skipped
    if mode == "all":  # every calibration token's Hessian: GPTQ as for any expert
        assert starved["path"] == "gptq (all tokens)"
    else:
        assert starved["path"].startswith("rtn: its expert saw 0 routed calibration tokens (< moe_min_tokens=8)")
        assert "block_sparse_moe.experts.5.w1" in caplog.text and "quantized with RTN" in caplog.text
        others = [v for k, v in report.experts().items() if not k.endswith(".5")]
        assert all(v["path"] == "gptq (routed tokens)" for v in others if v["tokens"] >= 8)


class _OddExperts(nn.Module):
    """Fused experts with a forward this version does not know (e.g. gpt-oss's clamped SwiGLU)."""

    def __init__(self, inner):
        super().__init__()
        self.gate_up_proj, self.down_proj = inner.gate_up_proj, inner.down_proj

    def forward(self, hidden_states, top_k_index, top_k_weights):
        return hidden_states


def test_a_weight_the_driver_cannot_quantize_is_refused_by_name():
    model = tiny_moe("qwen3_moe", layers=2)
    model.model.layers[1].mlp.experts = _OddExperts(model.model.layers[1].mlp.experts)
    assert not is_fused_experts(model.model.layers[1].mlp.experts)  # its router is kept in float, as any router
    with pytest.raises(ConfigError, match=r"model\.layers\.1\.mlp\.experts\.gate_up_proj \(2 weight tensors in all, "
                                          r"in _OddExperts\) would be left unquantized"):
        quantize_model(model, CALIB, QuantizeConfig(bits=4, group_size=32), batch_size=4, progress=False)


@pytest.mark.parametrize("arch", ARCHS)
def test_checkpoint_stores_each_expert_under_the_architectures_names_and_loads_back(arch, tmp_path):
    model, _, cfg, report = _quantize(arch)
    out = save_quantized(model, cfg, tmp_path / "q", extra_meta=report.checkpoint_meta())
    state = load_file(out / "model.safetensors")
    moe, (gate, up, down) = MOE[arch], PROJ[arch]
    for layer in range(LAYERS):
        for e in range(E):
            for proj in (gate, up, down):
                for leaf in ("qweight", "qzeros", "scales", "g_idx"):
                    assert f"model.layers.{layer}.{moe}.experts.{e}.{proj}.{leaf}" in state
        assert state[f"model.layers.{layer}.{moe}.gate.weight"].dtype == torch.float16  # router: unquantized
    assert not [k for k in state if ".experts." in k and k.endswith(".weight")]
    meta = json.loads((out / "config.json").read_text())["quantization_config"]["meta"]
    assert set(meta["experts"]) == {f"model.layers.{l}.{moe}.experts.{e}" for l in range(LAYERS) for e in range(E)}
    assert meta["unquantized"] == [f"model.layers.{l}.{moe}.gate.weight" for l in range(LAYERS)]
    info = inspect_checkpoint(out)
    kinds = info["layer_kinds"]
    assert (kinds["attention"], kinds["experts"], kinds["n_experts"], kinds["excluded"]) == (8, 48, 16, 2)
    assert info["format_check"].startswith("ok")
    loaded = load_quantized(out)
    ids = torch.randint(0, 128, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=2e-3, atol=2e-3)


def test_projection_names_come_from_transformers_conversion_mapping():
    assert checkpoint_projection_names(tiny_moe("mixtral", layers=1)) == ("w1", "w3", "w2")
    assert checkpoint_projection_names(tiny_moe("qwen3_moe", layers=1)) == ("gate_proj", "up_proj", "down_proj")


@pytest.mark.parametrize("arch", ARCHS)
def test_streaming_writes_the_in_memory_tensors(arch, tmp_path):
    from gptq_plugin.streaming import quantize_streaming

    src = tmp_path / "src"
    tiny_moe(arch, layers=LAYERS, experts=E, top_k=TOP_K).save_pretrained(src)
    cfg = QuantizeConfig(bits=4, group_size=32, moe_calibration="routed", moe_min_tokens=40)
    quantize_streaming(src, tmp_path / "s", CALIB, cfg, batch_size=4, progress=False)
    model, _, _, report = _quantize(arch, moe_calibration="routed", moe_min_tokens=40)
    save_quantized(model, cfg, tmp_path / "m", extra_meta=report.checkpoint_meta())
    a = {}
    for f in (tmp_path / "s").glob("*.safetensors"):
        a.update(load_file(f))
    b = load_file(tmp_path / "m" / "model.safetensors")
    assert set(a) == set(b)
    assert all(torch.equal(a[k], b[k]) for k in a)
    meta_s = json.loads((tmp_path / "s" / "config.json").read_text())["quantization_config"]["meta"]
    assert meta_s["experts"] == json.loads((tmp_path / "m" / "config.json").read_text())["quantization_config"][
        "meta"]["experts"]
    assert any(v["path"].startswith("rtn:") for v in meta_s["experts"].values())  # some experts under 40 tokens


@pytest.mark.parametrize("arch", ARCHS)
def test_transformers_loads_and_quantizes_moe_checkpoints(arch, tmp_path):
    from transformers import AutoModelForCausalLM

    from gptq_plugin import GPTQPluginConfig

    model, _, cfg, report = _quantize(arch)
    out = save_quantized(model, cfg, tmp_path / "q", extra_meta=report.checkpoint_meta())
    hf = AutoModelForCausalLM.from_pretrained(out, quantization_config=GPTQPluginConfig(), dtype=torch.float32)
    assert isinstance(hf.model.layers[0].mlp.experts, ExpertLinears)
    ref = load_quantized(out)
    ids = torch.randint(0, 128, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, ref(ids).logits)
    src = tmp_path / "src"
    tiny_moe(arch, layers=1).save_pretrained(src)
    text = tmp_path / "calib.txt"
    from tests.vllm.vllm_tiny import make_tokenizer

    make_tokenizer(128).save_pretrained(src)
    text.write_text(" ".join(f"t{3 + i % 120}" for i in range(4000)))
    q = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32, quantization_config=GPTQPluginConfig(
        bits=4, group_size=32, dataset=str(text), nsamples=4, seqlen=32))
    assert sum(isinstance(m, QuantLinear) for m in q.modules()) == 4 + 3 * E
    meta = q.config.quantization_config.meta
    assert len(meta["experts"]) == E and meta["unquantized"] == [f"model.layers.0.{MOE[arch]}.gate.weight"]
    q.save_pretrained(tmp_path / "hf")
    again = load_quantized(tmp_path / "hf")
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, q(ids).logits, rtol=2e-3, atol=2e-3)


# --- the CLI, resume and ranks ---------------------------------------------------------------------------------------
def _save_moe(folder, arch: str = "mixtral", layers: int = 2):
    from tests.vllm.vllm_tiny import make_tokenizer

    tiny_moe(arch, layers=layers, experts=E, top_k=TOP_K).save_pretrained(folder)
    make_tokenizer(128).save_pretrained(folder)
    return folder


MOE_ARGS = ["--nsamples", "13", "--seqlen", "32", "--batch-size", "2", "--group-size", "32", "--threads", "1",
            "--moe-calibration", "routed", "--moe-min-tokens", "40"]


@pytest.fixture(scope="module")
def moe_files(tmp_path_factory):
    from .test_reliability_cli import _calib_text

    d = tmp_path_factory.mktemp("moe")
    return {"model": _save_moe(d / "model"), "calib": _calib_text(d / "calib.txt"), "dir": d}


def test_cli_reports_experts_and_inspect_counts_kinds(moe_files, tmp_path, capsys):
    from .test_reliability_cli import cli

    out = tmp_path / "q"
    rc, stdout, err = cli(capsys, "quantize", moe_files["model"], out, "--dataset", moe_files["calib"], *MOE_ARGS)
    assert rc == 0, err
    assert f"quantized {LAYERS * (4 + 3 * E)} layers" in stdout
    assert f"experts: {LAYERS * E} experts quantized ({LAYERS * E * 3} layers), Hessians from routed tokens" in stdout
    assert "experts quantized with RTN for want of routed calibration tokens" in stdout
    assert f"kept in float: {LAYERS} MoE router weights (e.g. model.layers.0.block_sparse_moe.gate.weight)" in stdout
    rc, stdout, err = cli(capsys, "inspect", out)
    assert rc == 0, err
    assert f"attention {4 * LAYERS}, dense MLP 0, experts {3 * E * LAYERS} ({E * LAYERS} experts), other 0" in stdout
    assert f"{LAYERS} weight matrices in the blocks (e.g. model.layers.0.block_sparse_moe.gate.weight)" in stdout


def test_a_killed_moe_run_resumes_to_the_same_bytes(moe_files, tmp_path, capsys, monkeypatch, caplog):
    """The first block's shard is recorded, then the run dies; the same command resumes at block 1 and writes the
    bytes of an uninterrupted run."""
    from gptq_plugin.resume import ResumeState

    from .test_reliability_cli import cli, digests

    args = ["--dataset", moe_files["calib"], *MOE_ARGS]
    rc, _, err = cli(capsys, "quantize", moe_files["model"], tmp_path / "whole", *args)
    assert rc == 0, err
    real = ResumeState.save_block

    def die_after_block_0(self, index, *a, **k):
        real(self, index, *a, **k)
        raise KeyboardInterrupt

    monkeypatch.setattr(ResumeState, "save_block", die_after_block_0)
    rc, _, err = cli(capsys, "quantize", moe_files["model"], tmp_path / "out", *args)
    assert rc != 0 and not (tmp_path / "out").exists()
    monkeypatch.setattr(ResumeState, "save_block", real)
    rc, _, err = cli(capsys, "quantize", moe_files["model"], tmp_path / "out", *args)
    assert rc == 0, err
    assert "1 blocks already quantized" in caplog.text
    assert digests(tmp_path / "out") == digests(tmp_path / "whole")


def test_two_ranks_write_the_bytes_of_one_process(moe_files, tmp_path, capsys):
    """Under torchrun (2 gloo ranks, each a share of the batches), the routed token counts and Hessians are summed
    across ranks: the same experts fall back, with the same counts, and the same bytes are written."""
    import subprocess

    from .test_distributed import TIMEOUT_S, _env, _torchrun
    from .test_reliability_cli import cli, digests

    args = ["--dataset", str(moe_files["calib"]), *MOE_ARGS, "--streaming"]
    rc, _, err = cli(capsys, "quantize", moe_files["model"], tmp_path / "one", *args)
    assert rc == 0, err
    p = subprocess.run([*_torchrun(2), "-m", "gptq_plugin.cli", "quantize", str(moe_files["model"]),
                        str(tmp_path / "two"), *args], env=_env(), capture_output=True, text=True, timeout=TIMEOUT_S)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "2 ranks" in p.stdout
    assert digests(tmp_path / "two") == digests(tmp_path / "one")


def test_a_shared_experts_gate_stays_float_and_the_shared_expert_is_quantized():
    """Qwen2-MoE: vLLM builds ``shared_expert_gate`` (1 output) unquantized, so it is kept in float and reported."""
    model = tiny_moe("qwen2_moe", layers=1, experts=4)
    report = quantize_model(model, CALIB, QuantizeConfig(bits=4, group_size=32), batch_size=4, progress=False)
    mlp = model.model.layers[0].mlp
    assert all(isinstance(getattr(mlp.shared_expert, p), QuantLinear) for p in ("gate_proj", "up_proj", "down_proj"))
    assert isinstance(mlp.shared_expert_gate, nn.Linear) and not isinstance(mlp.shared_expert_gate, QuantLinear)
    assert report.unquantized == ["model.layers.0.mlp.gate.weight", "model.layers.0.mlp.shared_expert_gate.weight"]
    assert len(report.experts()) == 4


OTHER = dict(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             head_dim=16, intermediate_size=64, moe_intermediate_size=32, num_experts=4, n_routed_experts=4,
             num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=64, tie_word_embeddings=False,
             first_k_dense_replace=0, n_shared_experts=1, n_group=1, topk_group=1, kv_lora_rank=16, q_lora_rank=None,
             qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16, decoder_sparse_step=1, mlp_only_layers=[],
             moe_num_experts=4, moe_k=2, moe_topk=2, pad_token_id=0, layer_types=["full_attention"] * 2)


@pytest.mark.parametrize("arch,routers", [
    ("deepseek_v3", ["mlp.gate.weight"]),
    ("hunyuan_v1_moe", ["mlp.gate.wg.weight"]),  # the router nn.Linear one level down
    ("afmoe", ["mlp.router.gate.weight"]),
    ("ernie4_5_moe", ["mlp.gate.weight"]),  # and its (1, E) score bias: kept, not a linear layer
])
def test_other_architectures_keep_their_routers_and_equal_the_reference(arch, routers):
    from transformers import AutoConfig, AutoModelForCausalLM

    def build():
        torch.manual_seed(0)
        cfg = AutoConfig.for_model(arch, **dict(OTHER, **({"head_dim": 8} if arch.startswith("deepseek") else {})))
        return AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()

    model = build()
    report = quantize_model(model, CALIB, QuantizeConfig(bits=4, group_size=16), batch_size=4, progress=False)
    assert report.experts() and all(e["path"] == "gptq (all tokens)" for e in report.experts().values())
    moe_layers = sorted({int(n.split(".")[2]) for n in report.experts()})
    assert report.unquantized[:report.routers] == [f"model.layers.{l}.{r}" for l in moe_layers for r in routers]
    for name in report.unquantized[:report.routers]:
        assert not isinstance(model.get_submodule(name.rpartition(".")[0]), QuantLinear)
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, _dequantized_fused(model, build())(ids).logits,
                                   rtol=1e-4, atol=1e-4)


@pytest.fixture(scope="module")
def mixtral_ckpt(tmp_path_factory):
    model, _, cfg, report = _quantize("mixtral")
    return save_quantized(model, cfg, tmp_path_factory.mktemp("mixtral") / "q", extra_meta=report.checkpoint_meta())


def _edited(src, dst, edit):
    import shutil

    from safetensors.torch import save_file

    shutil.copytree(src, dst)
    state = load_file(dst / "model.safetensors")
    edit(state)
    save_file(state, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def test_a_missing_expert_tensor_is_named_as_the_file_names_it(mixtral_ckpt, tmp_path):
    from gptq_plugin.errors import CheckpointError

    bad = _edited(mixtral_ckpt, tmp_path / "bad",
                  lambda s: s.pop("model.layers.1.block_sparse_moe.experts.3.w2.qweight"))
    with pytest.raises(CheckpointError, match=r"tensor model\.layers\.1\.block_sparse_moe\.experts\.3\.w2\.qweight is "
                                              r"missing"):
        load_quantized(bad)


def test_transformers_refuses_an_expert_stored_in_float(mixtral_ckpt, tmp_path):
    """Transformers would fuse a float expert weight into its 3-D parameter and leave the per-expert layer random."""
    from transformers import AutoModelForCausalLM

    from gptq_plugin import GPTQPluginConfig
    from gptq_plugin.errors import CheckpointError

    p = "model.layers.1.block_sparse_moe.experts.4.w1"

    def to_float(state):
        for leaf in ("qweight", "qzeros", "scales", "g_idx"):
            state.pop(f"{p}.{leaf}")
        state[f"{p}.weight"] = torch.zeros(64, 64, dtype=torch.float16)

    bad = _edited(mixtral_ckpt, tmp_path / "float", to_float)
    with pytest.raises(CheckpointError, match=rf"expert layer {p}\.weight is stored unquantized"):
        AutoModelForCausalLM.from_pretrained(bad, quantization_config=GPTQPluginConfig())
    load_quantized(bad)  # the core's loader takes a float expert as it is


def test_compressed_tensors_ignores_the_routers(mixtral_ckpt, tmp_path):
    from gptq_plugin.convert import convert_checkpoint

    convert_checkpoint(mixtral_ckpt, tmp_path / "ct", "compressed-tensors")
    ignore = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]["ignore"]
    assert [n for n in ignore if "gate" in n] == [f"model.layers.{l}.block_sparse_moe.gate" for l in range(LAYERS)]
    ids = torch.randint(0, 128, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(load_quantized(tmp_path / "ct")(ids).logits, load_quantized(mixtral_ckpt)(ids).logits)


def test_inspect_fails_a_checkpoint_missing_a_whole_expert(mixtral_ckpt, tmp_path):
    """The layers that are there are valid, but the model needs expert 7: inspect says so, as load_quantized would."""
    from gptq_plugin.errors import CheckpointError

    gone = "model.layers.1.block_sparse_moe.experts.7."
    bad = _edited(mixtral_ckpt, tmp_path / "no7", lambda s: [s.pop(k) for k in list(s) if k.startswith(gone)])
    info = inspect_checkpoint(bad)
    assert info["format_check"] == (f"FAILED: tensor {gone}w1.weight is missing: the checkpoint is incomplete or for "
                                    "another architecture (load_quantized refuses it)")
    with pytest.raises(CheckpointError, match=rf"tensor {gone}w1\.weight is missing"):
        load_quantized(bad)
    assert inspect_checkpoint(mixtral_ckpt)["format_check"].startswith("ok")
