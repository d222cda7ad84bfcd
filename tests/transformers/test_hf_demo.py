"""The Transformers adapter on the real demo model (its first block): quantize on load, save, reload, generate,
and the same checkpoint as the CLI's. Skips with the reason when the demo model or the shared data is absent."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from hf_support import CLI_FLAGS, LOGGER, N_BLOCKS, NSAMPLES, SEQLEN, SETTINGS, rewrite_quantization_config
from gptq_plugin import CheckpointError, ConfigError, GPTQPluginConfig, QuantLinear
from gptq_plugin.adapters.transformers import GPTQPluginHfQuantizer
from gptq_plugin.checkpoint import load_quantized
from gptq_plugin.evaluate import eval_windows, perplexity

pytestmark = pytest.mark.integration
PROMPT = "The capital of France is"


def quant_layers(model) -> dict[str, QuantLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}


def kernels(model) -> set[str]:
    return {m.kernel_name for m in quant_layers(model).values()}


@torch.no_grad()
def logits(model, tokenizer) -> torch.Tensor:
    return model(**tokenizer(PROMPT, return_tensors="pt")).logits.float()


@torch.no_grad()
def greedy(model, tokenizer, n: int = 8) -> list[int]:
    ids = tokenizer(PROMPT, return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=n, min_new_tokens=n, do_sample=False)
    return out[0, ids["input_ids"].shape[1]:].tolist()


def test_quantize_on_load(hf_quantized):
    q = quant_layers(hf_quantized)
    assert len(q) == 7 * N_BLOCKS
    assert not any(isinstance(m, torch.nn.Linear) for m in hf_quantized.model.layers.modules())
    assert isinstance(hf_quantized.hf_quantizer, GPTQPluginHfQuantizer)
    report = hf_quantized.hf_quantizer.report
    assert len(report.layers) == 7 * N_BLOCKS and all(l.rel_err is not None for l in report.layers)
    cfg = hf_quantized.config.quantization_config
    assert isinstance(cfg, GPTQPluginConfig) and cfg.tokenizer is None  # the quantized model's config, no inputs
    assert (cfg.bits, cfg.group_size, cfg.desc_act) == (4, 128, True)
    assert cfg.meta["calibration"]["nsamples"] == NSAMPLES and cfg.meta["calibration"]["seqlen"] == SEQLEN
    # dtype "auto": the source's bf16 for the unquantized weights; GPTQ scales fp16
    assert hf_quantized.dtype == torch.bfloat16 and hf_quantized.config.dtype == torch.bfloat16
    assert all(m.scales.dtype == torch.float16 for m in q.values())
    assert any(m.desc_act for m in q.values())  # act-order reached the layers


def test_save_pretrained_writes_the_cli_checkpoint(hf_checkpoint, cli_checkpoint):
    """Same settings, same calibration windows: the same tensors, bit for bit, and the same quantization_config
    (both keep the bf16 source's dtype for the unquantized tensors and config.json)."""
    ours, cli = load_file(hf_checkpoint / "model.safetensors"), load_file(cli_checkpoint / "model.safetensors")
    assert sorted(ours) == sorted(cli)
    for k in cli:
        assert ours[k].dtype == cli[k].dtype and torch.equal(ours[k], cli[k]), k
    assert any(k.endswith(".qweight") for k in cli) and "lm_head.weight" not in cli
    q_ours = json.loads((hf_checkpoint / "config.json").read_text())["quantization_config"]
    q_cli = json.loads((cli_checkpoint / "config.json").read_text())["quantization_config"]
    assert q_ours == q_cli and q_ours["quant_method"] == "gptq"
    assert (hf_checkpoint / "quantize_config.json").read_text() == (cli_checkpoint / "quantize_config.json").read_text()


def test_gptaq_on_load_writes_the_cli_checkpoint(tiny_model_dir, calib_file, tokenizer, cli_checkpoint, tmp_path):
    """GPTQPluginConfig(gptaq=0.25) quantizes on load to the bytes of `gptq-plugin quantize ... --gptaq 0.25` with
    the same settings and windows; the checkpoint records the alpha, and the weights differ from plain GPTQ's."""
    from gptq_plugin.cli import main

    cfg = GPTQPluginConfig(**SETTINGS, gptaq=0.25, dataset=str(calib_file), tokenizer=tokenizer, nsamples=NSAMPLES,
                           seqlen=SEQLEN)
    AutoModelForCausalLM.from_pretrained(tiny_model_dir, quantization_config=cfg).save_pretrained(tmp_path / "hf")
    flags = [*CLI_FLAGS[:CLI_FLAGS.index("--gptaq")], "--gptaq", "0.25"]
    with pytest.raises(SystemExit) as done:
        main(["quantize", str(tiny_model_dir), str(tmp_path / "cli"), *flags, "--dataset", str(calib_file),
              "--nsamples", str(NSAMPLES), "--seqlen", str(SEQLEN)])
    assert done.value.code == 0
    ours, cli = load_file(tmp_path / "hf" / "model.safetensors"), load_file(tmp_path / "cli" / "model.safetensors")
    assert sorted(ours) == sorted(cli)
    for k in cli:
        assert torch.equal(ours[k], cli[k]), k
    plain = load_file(cli_checkpoint / "model.safetensors")
    assert any(not torch.equal(cli[k], plain[k]) for k in cli if k.endswith(".qweight"))
    q_ours = json.loads((tmp_path / "hf" / "config.json").read_text())["quantization_config"]
    q_cli = json.loads((tmp_path / "cli" / "config.json").read_text())["quantization_config"]
    assert q_ours == q_cli and q_ours["meta"]["gptaq"] == {"alpha": 0.25}


def test_reload_matches_in_memory_model(hf_quantized, hf_checkpoint, tokenizer):
    """Through GPTQPluginConfig() and through a plain from_pretrained: the same layers, kernels and logits as the
    model quantized in memory (both bf16, the dtype config.json records)."""
    ref = logits(hf_quantized, tokenizer)
    for kw in ({"quantization_config": GPTQPluginConfig()}, {}):
        model = AutoModelForCausalLM.from_pretrained(hf_checkpoint, **kw)
        assert isinstance(model.hf_quantizer, GPTQPluginHfQuantizer)
        assert sorted(quant_layers(model)) == sorted(quant_layers(hf_quantized))
        assert model.dtype == torch.bfloat16
        out = logits(model, tokenizer)
        assert kernels(model) == kernels(hf_quantized)
        torch.testing.assert_close(out, ref, rtol=1.6e-2, atol=1e-2)


def test_generation_matches_the_cli_checkpoint(hf_checkpoint, cli_checkpoint, tokenizer):
    """Greedy tokens (CPU, fp32) of the Transformers-quantized checkpoint reloaded through Transformers equal those
    of the CLI-quantized checkpoint loaded by the CLI's loader."""
    ours = AutoModelForCausalLM.from_pretrained(hf_checkpoint, dtype=torch.float32)
    cli = load_quantized(cli_checkpoint, dtype=torch.float32)
    tokens = greedy(ours, tokenizer)
    assert len(tokens) == 8
    assert tokens == greedy(cli, tokenizer)


@pytest.mark.parametrize("which", ["cli", "hf"])
def test_checkpoints_load_both_ways(which, hf_checkpoint, cli_checkpoint, tokenizer):
    """A CLI checkpoint loads through Transformers, a Transformers-saved one through the CLI's loader: same
    kernel, same logits (fp32)."""
    ckpt = cli_checkpoint if which == "cli" else hf_checkpoint
    via_hf = AutoModelForCausalLM.from_pretrained(ckpt, quantization_config=GPTQPluginConfig(), dtype=torch.float32)
    via_core = load_quantized(ckpt, dtype=torch.float32)
    a, b = logits(via_hf, tokenizer), logits(via_core, tokenizer)
    assert kernels(via_hf) == kernels(via_core)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_perplexity_equals_cli_eval(dtype, cli_checkpoint, tokenizer, data_dir, tmp_path, capsys):
    """WikiText-2 perplexity through Transformers equals `gptq-plugin eval` on the same checkpoint (within 0.1%),
    on the first 4 windows of 128 tokens (of the test text's first 20,000 characters: tokenizing all of it twice
    is the slow part). Transformers' default for this checkpoint is its config.json dtype, bf16 (the source's)."""
    from gptq_plugin.cli import main

    test_file = tmp_path / "wiki.test.head.txt"
    test_file.write_text((data_dir / "wikitext-2" / "wiki.test.raw").read_text(encoding="utf-8")[:20000],
                         encoding="utf-8")
    capsys.readouterr()
    with pytest.raises(SystemExit) as done:
        main(["eval", str(cli_checkpoint), "--dataset", str(test_file), "--seqlen", "128", "--windows", "4",
              "--dtype", dtype, "--json"])
    assert done.value.code == 0
    cli = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    kw = {"dtype": getattr(torch, dtype)}
    model = AutoModelForCausalLM.from_pretrained(cli_checkpoint, **kw)
    assert model.dtype == getattr(torch, dtype)
    ppl = perplexity(model, eval_windows(tokenizer, test_file, 128, 4), progress=False)
    with capsys.disabled():
        print(f"\n[perplexity {dtype}] transformers {ppl:.6f}  gptq-plugin eval {cli['perplexity']:.6f}  "
              f"relative difference {abs(ppl / cli['perplexity'] - 1):.2e}")
    assert abs(ppl / cli["perplexity"] - 1) < 1e-3


def test_device_map_and_default_dtype(cli_checkpoint, tokenizer, caplog):
    """device_map "cpu" and "auto" (no accelerator here) put everything on the CPU with the same logits; without
    a dtype the checkpoint's bfloat16 (the bf16 source's) is used (scales fp16) and logged; generate() works."""
    ref = logits(AutoModelForCausalLM.from_pretrained(cli_checkpoint, dtype=torch.float32), tokenizer)
    for device_map in ("cpu", "auto"):
        model = AutoModelForCausalLM.from_pretrained(cli_checkpoint, device_map=device_map, dtype=torch.float32)
        tensors = list(model.parameters()) + list(model.buffers())
        assert {t.device.type for t in tensors} == {"cpu"}
        torch.testing.assert_close(logits(model, tokenizer), ref, rtol=0, atol=0)
    with caplog.at_level(logging.INFO, logger=LOGGER):
        model = AutoModelForCausalLM.from_pretrained(cli_checkpoint)
    assert "computing in torch.bfloat16" in caplog.text
    assert model.dtype == torch.bfloat16
    assert all(m.scales.dtype == torch.float16 for m in quant_layers(model).values())
    assert len(greedy(model, tokenizer, 4)) == 4


def test_mismatched_config_is_one_clear_error(cli_checkpoint):
    with pytest.raises(ConfigError, match=r"GPTQPluginConfig\(bits=3\) contradicts .*\(bits=4\)"):
        AutoModelForCausalLM.from_pretrained(cli_checkpoint, quantization_config=GPTQPluginConfig(bits=3))


def test_checkpoint_not_matching_its_own_config_is_refused(cli_checkpoint, tmp_path):
    """Tensors laid out for group_size=128 under a config saying 64; a layer without g_idx: CheckpointError
    naming the tensor (Transformers itself does not check the shapes of a quantizer's tensors)."""
    from safetensors.torch import save_file

    wrong = rewrite_quantization_config(cli_checkpoint, tmp_path / "g64", group_size=64)
    with pytest.raises(CheckpointError, match=r"model.layers.0.* has shape .*group_size=64"):
        AutoModelForCausalLM.from_pretrained(wrong)
    partial = rewrite_quantization_config(cli_checkpoint, tmp_path / "partial")
    state = load_file(partial / "model.safetensors")
    del state["model.layers.0.mlp.up_proj.g_idx"]
    save_file(state, str(partial / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"model.layers.0.mlp.up_proj.g_idx is missing"):
        AutoModelForCausalLM.from_pretrained(partial)


@pytest.mark.filterwarnings("ignore:You passed `quantization_config`:UserWarning")  # Transformers' own, for GPTQConfig
def test_other_tools_checkpoints(cli_checkpoint, tokenizer, tmp_path, monkeypatch):
    """A GPTQ checkpoint written by another tool (here: AutoGPTQ's name, the v2 zero-point convention) loads
    through the plugin with the documented line, and with a plain from_pretrained when Transformers' own GPTQ
    backend is not installed; GPTQConfig still goes to Transformers' backend; a v1 checkpoint mislabelled as
    v2 is refused instead of loading garbage."""
    from transformers import GPTQConfig

    from gptq_plugin.adapters import transformers as adapter
    from gptq_plugin.packing import pack_qzeros, unpack_qzeros
    from safetensors.torch import save_file

    ref = logits(load_quantized(cli_checkpoint, dtype=torch.float32), tokenizer)
    other = {"quantizer": ["auto_gptq:0.7.1"]}
    v2 = rewrite_quantization_config(cli_checkpoint, tmp_path / "v2", checkpoint_format="gptq_v2", meta=other)
    state = load_file(v2 / "model.safetensors")
    for k in [k for k in state if k.endswith(".qzeros")]:
        n = state[k[: -len("qzeros")] + "scales"].shape[1]
        state[k] = pack_qzeros(unpack_qzeros(state[k], 4, n, "gptq"), 4, "gptq_v2")
    save_file(state, str(v2 / "model.safetensors"), metadata={"format": "pt"})

    model = AutoModelForCausalLM.from_pretrained(v2, quantization_config=GPTQPluginConfig(), dtype=torch.float32)
    torch.testing.assert_close(logits(model, tokenizer), ref, rtol=1e-5, atol=1e-4)
    monkeypatch.setattr(adapter, "_transformers_gptq_available", lambda: False)
    model = AutoModelForCausalLM.from_pretrained(v2, dtype=torch.float32)
    assert isinstance(model.hf_quantizer, GPTQPluginHfQuantizer)
    torch.testing.assert_close(logits(model, tokenizer), ref, rtol=1e-5, atol=1e-4)
    with pytest.raises(Exception, match="optimum|gptqmodel|GPU"):  # Transformers' own backend, not installed
        AutoModelForCausalLM.from_pretrained(v2, quantization_config=GPTQConfig(bits=4))

    mislabelled = rewrite_quantization_config(cli_checkpoint, tmp_path / "bad", checkpoint_format="gptq_v2", meta=other)
    with pytest.raises(CheckpointError, match="gptq_v2"):
        AutoModelForCausalLM.from_pretrained(mislabelled, quantization_config=GPTQPluginConfig())
