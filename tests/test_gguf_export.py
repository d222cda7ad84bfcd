"""GGUF export (llama.cpp, Ollama) checked by independent readers, and the TensorRT-LLM precondition check.

A tiny Llama (hidden 128, so groups of 32/64/128 fit) with a byte-level BPE tokenizer trained here is quantized
with RTN or GPTQ; gguf-py's reader and ``gguf.quants.dequantize`` must give the plugin's dequantized weights bit
for bit, Transformers' GGUF loader must give the plugin's logits, and the refusals must name the layer.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf", reason="the GGUF export needs the `gguf` package: pip install 'gptq-plugin[test]'")

from gptq_plugin.checkpoint import load_quantized, save_quantized  # noqa: E402
from gptq_plugin.config import QuantizeConfig  # noqa: E402
from gptq_plugin.errors import GPTQPluginError  # noqa: E402
from gptq_plugin.reader import read_checkpoint  # noqa: E402
from gptq_plugin.gguf_blocks import GGUFExportError  # noqa: E402
from gptq_plugin.gguf_export import _head_permutation, export_gguf  # noqa: E402
from gptq_plugin.kernels.reference import dequantize_weight  # noqa: E402
from gptq_plugin.pipeline import quantize_model  # noqa: E402
from gptq_plugin.targets import check_target  # noqa: E402

TEXT = ["The quick brown fox jumps over the lazy dog. " * 3, "GPTQ quantizes weights, one column at a time, 1234.",
        "Hello world! llama.cpp reads GGUF files; Ollama runs them."]
HEADS, KV_HEADS = 4, 2


def _tokenizer():
    """A byte-level BPE (GPT-2 style, like the demo model's) with three special tokens, trained on TEXT."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(TEXT, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                   unk_token="<|endoftext|>")


def _tiny_llama(tied: bool = False, bias: bool = False):
    """Hidden 128 (4 heads of 32, 2 KV heads), intermediate 256, vocabulary 320 (> the tokenizer's 300: padded);
    with ``bias``, attention biases drawn at random (Llama's ``attention_bias``)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=320, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, max_position_embeddings=128,
                      tie_word_embeddings=tied, attention_bias=bias)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    for name, p in model.named_parameters():
        if name.endswith(".bias"):
            torch.nn.init.normal_(p, std=0.5)
    return model


@pytest.fixture(scope="module")
def make_ckpt(tmp_path_factory):
    """``make_ckpt(tied=False, bias=False, **QuantizeConfig kwargs) -> folder``: the tiny Llama quantized (GPTQ on random
    calibration tokens, or RTN), with its tokenizer; cached per configuration."""
    cache: dict = {}
    tok = _tokenizer()

    def make(tied: bool = False, bias: bool = False, **kw) -> Path:
        key = (tied, bias, tuple(sorted(kw.items())))
        if key not in cache:
            model, cfg = _tiny_llama(tied, bias), QuantizeConfig(**kw)
            calib = torch.randint(0, 300, (4, 32), generator=torch.Generator().manual_seed(0))
            quantize_model(model, calib if cfg.method == "gptq" else None, cfg, batch_size=2, progress=False)
            cache[key] = save_quantized(model, cfg, tmp_path_factory.mktemp("ckpt") / "q", tokenizer=tok)
        return cache[key]

    return make


def _plugin_weights(ckpt: Path) -> dict[str, torch.Tensor]:
    """Every quantized layer's weight as the plugin dequantizes it (kernels/reference.py), rows in GGUF order."""
    cfg, state = read_checkpoint(ckpt)
    out = {}
    for key in state:
        if not key.endswith(".qweight"):
            continue
        p = key[: -len(".qweight")]
        w = dequantize_weight(state[key], state[f"{p}.qzeros"], state[f"{p}.scales"], state[f"{p}.g_idx"], cfg.bits,
                              int(state[f"{p}.g_idx"].numel()))
        if p.endswith("q_proj"):
            w = w[_head_permutation(w.shape[0], HEADS)]
        elif p.endswith("k_proj"):
            w = w[_head_permutation(w.shape[0], KV_HEADS)]
        block, proj = p.split(".")[2], p.rsplit(".", 1)[1]
        name = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
                "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}[proj]
        out[f"blk.{block}.{name}.weight"] = w.contiguous()
    return out


SCHEMES = [  # (QuantizeConfig kwargs, expected GGUF type)
    (dict(bits=4, group_size=32, method="rtn"), "Q4_0"),
    (dict(bits=4, group_size=64, method="rtn"), "Q4_0"),
    (dict(bits=4, group_size=128, method="rtn"), "Q4_0"),
    (dict(bits=4, group_size=32, desc_act=True, static_groups=True), "Q4_0"),
    (dict(bits=4, group_size=64, desc_act=True, static_groups=True), "Q4_0"),
    (dict(bits=4, group_size=128, desc_act=True, static_groups=True), "Q4_0"),
    (dict(bits=3, group_size=32, method="rtn"), "Q4_0"),
    (dict(bits=3, group_size=64, desc_act=True, static_groups=True), "Q4_0"),
    (dict(bits=2, group_size=64, method="rtn"), "Q4_0"),
    (dict(bits=4, group_size=64, sym=False, method="rtn"), "Q5_0"),
    (dict(bits=4, group_size=32, sym=False, desc_act=True, static_groups=True), "Q5_0"),
    (dict(bits=8, group_size=128, method="rtn"), "Q8_0"),
]


@pytest.mark.parametrize("kw, qtype", SCHEMES, ids=lambda v: "-".join(f"{k}{x}" for k, x in v.items())
                         if isinstance(v, dict) else v)
def test_gguf_py_reads_back_the_plugin_weights_bit_for_bit(make_ckpt, tmp_path, kw, qtype):
    ckpt = make_ckpt(**kw)
    rep = export_gguf(ckpt, tmp_path / "m.gguf")
    assert rep.exact and len(rep.layers) == 14
    reader = gguf.GGUFReader(tmp_path / "m.gguf")
    tensors = {t.name: t for t in reader.tensors}
    want = _plugin_weights(ckpt)
    assert set(want) <= set(tensors)
    for name, w in want.items():
        t = tensors[name]
        assert t.tensor_type.name == qtype, name
        got = gguf.quants.dequantize(t.data, t.tensor_type)
        assert got.shape == tuple(w.shape), name
        assert np.array_equal(got.view(np.int32), w.numpy().view(np.int32)), f"{name} differs from the plugin's weights"
    assert tensors["token_embd.weight"].tensor_type.name == "F16"
    assert tensors["blk.0.attn_norm.weight"].tensor_type.name == "F32"


def test_v2_and_compressed_tensors_checkpoints_export_the_same_blocks(make_ckpt, tmp_path):
    from gptq_plugin.convert import convert_checkpoint

    v1 = make_ckpt(bits=4, group_size=64, method="rtn")
    v2 = make_ckpt(bits=4, group_size=64, method="rtn", checkpoint_format="gptq_v2")
    ct = convert_checkpoint(v1, tmp_path / "ct", "compressed-tensors").dst
    blobs = []
    for i, ck in enumerate((v1, v2, ct)):
        export_gguf(ck, tmp_path / f"{i}.gguf", modelfile=False)
        blobs.append({t.name: bytes(t.data) for t in gguf.GGUFReader(tmp_path / f"{i}.gguf").tensors})
    assert blobs[0] == blobs[1] == blobs[2]


def test_transformers_gguf_loader_gives_the_plugin_logits(make_ckpt, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ckpt = make_ckpt(bits=4, group_size=64, desc_act=True, static_groups=True)
    export_gguf(ckpt, tmp_path / "m.gguf")
    model = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf", dtype=torch.float32)
    plugin = load_quantized(ckpt)
    ids = torch.randint(0, 320, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a, b = model(ids).logits, plugin(ids).logits
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)  # same weights; embeddings/norms through fp16 both ways
    tok, ref = AutoTokenizer.from_pretrained(tmp_path, gguf_file="m.gguf"), AutoTokenizer.from_pretrained(ckpt)
    text = "Hello world! The quick fox, 1234.<|im_end|>"
    assert tok(text).input_ids == ref(text).input_ids
    assert tok.eos_token == "<|im_end|>" and tok.bos_token == "<|im_start|>"


def test_attention_biases_follow_the_row_permutation(make_ckpt, tmp_path):
    """llama.cpp permutes q/k biases with their rows (Transformers' GGUF loader drops Llama biases: not checked there)."""
    ckpt = make_ckpt(bias=True, bits=4, group_size=32, method="rtn")
    export_gguf(ckpt, tmp_path / "m.gguf")
    tensors = {t.name: t for t in gguf.GGUFReader(tmp_path / "m.gguf").tensors}
    _, state = read_checkpoint(ckpt)
    for proj, name, heads in (("q_proj", "attn_q", HEADS), ("k_proj", "attn_k", KV_HEADS), ("v_proj", "attn_v", None)):
        want = state[f"model.layers.1.self_attn.{proj}.bias"].float()
        if heads:
            want = want[_head_permutation(want.shape[0], heads)]
        assert np.array_equal(tensors[f"blk.1.{name}.bias"].data, want.numpy()), proj


def test_tokenizer_metadata(make_ckpt, tmp_path):
    export_gguf(make_ckpt(bits=4, group_size=32, method="rtn"), tmp_path / "m.gguf")
    f = gguf.GGUFReader(tmp_path / "m.gguf").fields
    assert f["tokenizer.ggml.model"].contents() == "gpt2" and f["tokenizer.ggml.pre"].contents() == "gpt-2"
    tokens, types = f["tokenizer.ggml.tokens"].contents(), f["tokenizer.ggml.token_type"].contents()
    assert len(tokens) == 320 == f["llama.vocab_size"].contents()
    assert tokens[:3] == ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] and types[:3] == [3, 3, 3]  # CONTROL
    assert tokens[300] == "[PAD300]" and types[300] == 5  # UNUSED padding up to the model's vocabulary
    assert f["tokenizer.ggml.eos_token_id"].contents() == 2 and len(f["tokenizer.ggml.merges"].contents()) > 0
    assert f["general.architecture"].contents() == "llama" and f["llama.attention.head_count_kv"].contents() == 2


def test_other_tensor_types_and_tied_embeddings(make_ckpt, tmp_path):
    ckpt = make_ckpt(tied=True, bits=4, group_size=32, method="rtn")
    rep = export_gguf(ckpt, tmp_path / "bf16.gguf", outtype="bf16", modelfile=False)
    assert rep.other["token_embd.weight"] == "bf16" and "output.weight" not in rep.other  # tied: llama.cpp reuses it
    rep = export_gguf(make_ckpt(bits=4, group_size=32, method="rtn"), tmp_path / "q8.gguf", outtype="q8_0",
                      modelfile=False)
    assert rep.other["token_embd.weight"] == rep.other["output.weight"] == "q8_0"
    assert rep.other["output_norm.weight"] == "f32"


@pytest.mark.parametrize("kw, needle", [
    (dict(bits=4, group_size=32, desc_act=True, static_groups=False), "g_idx is not in input order"),
    (dict(bits=4, group_size=48, method="rtn"), "multiple of 32"),
])
def test_inexact_layers_are_refused_then_written_approximately_on_request(make_ckpt, tmp_path, kw, needle):
    ckpt = make_ckpt(**kw)
    with pytest.raises(GGUFExportError, match=needle) as e:
        export_gguf(ckpt, tmp_path / "m.gguf")
    msg = str(e.value)
    assert "model.layers.0." in msg and "--allow-approximate" in msg and "static groups" in msg
    assert not list(tmp_path.iterdir())  # nothing written, no temporary file left
    rep = export_gguf(ckpt, tmp_path / "m.gguf", allow_approximate=True)
    assert not rep.exact and all(l.qtype == "q4_0" and 0 < l.max_abs_err < 0.1 for l in rep.layers)
    assert "approximate model.layers.0." in rep.summary() and "max abs error" in rep.summary()


def test_asymmetric_into_q4_1_is_approximate(make_ckpt, tmp_path):
    ckpt = make_ckpt(bits=4, group_size=64, sym=False, method="rtn")
    with pytest.raises(GGUFExportError, match="Q4_1"):
        export_gguf(ckpt, tmp_path / "m.gguf", qtype="q4_1")
    rep = export_gguf(ckpt, tmp_path / "m.gguf", qtype="q4_1", allow_approximate=True)
    assert all(l.qtype == "q4_1" and not l.exact and l.rel_err < 1e-2 for l in rep.layers)  # m = -d*z in fp16
    with pytest.raises(GGUFExportError, match="Q4_0"):  # asymmetric codes span more than Q4_0's -8..7
        export_gguf(ckpt, tmp_path / "m2.gguf", qtype="q4_0", modelfile=False)


def test_modelfile_is_what_ollama_documents(make_ckpt, tmp_path):
    rep = export_gguf(make_ckpt(bits=4, group_size=32, method="rtn"), tmp_path / "smol.gguf")
    assert rep.modelfile == tmp_path / "Modelfile"
    lines = [l for l in rep.modelfile.read_text().splitlines() if l and not l.startswith("#")]
    assert lines == ["FROM ./smol.gguf"]  # Ollama's import docs: `FROM /path/to/file.gguf`, then `ollama create`
    assert "ollama create NAME -f Modelfile" in rep.modelfile.read_text()


def test_output_paths_are_refused(make_ckpt, tmp_path):
    ckpt = make_ckpt(bits=4, group_size=32, method="rtn")
    with pytest.raises(GGUFExportError, match="inside the checkpoint folder"):
        export_gguf(ckpt, ckpt / "m.gguf")
    with pytest.raises(GGUFExportError, match=r"\.gguf"):
        export_gguf(ckpt, tmp_path / "m.bin")
    (tmp_path / "m.gguf").write_text("keep")
    with pytest.raises(GGUFExportError, match="--overwrite"):
        export_gguf(ckpt, tmp_path / "m.gguf")
    assert (tmp_path / "m.gguf").read_text() == "keep"
    export_gguf(ckpt, tmp_path / "m.gguf", overwrite=True)
    assert gguf.GGUFReader(tmp_path / "m.gguf").tensors and not list(tmp_path.glob(".m.gguf.tmp-*"))


def test_other_architectures_are_refused(make_ckpt, tmp_path):
    import shutil

    ckpt = tmp_path / "gpt2"
    shutil.copytree(make_ckpt(bits=4, group_size=32, method="rtn"), ckpt)
    cfg = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps(dict(cfg, architectures=["GPT2LMHeadModel"])))
    with pytest.raises(GGUFExportError, match="GPT2LMHeadModel is not supported.*LlamaForCausalLM"):
        export_gguf(ckpt, tmp_path / "m.gguf")


def test_cli_export_and_refusal(make_ckpt, tmp_path):
    def run(*args):
        p = subprocess.run([sys.executable, "-m", "gptq_plugin.cli", *map(str, args)], capture_output=True, text=True,
                           env={**os.environ, "HF_HUB_OFFLINE": "1"})
        return p.returncode, p.stdout, p.stderr

    rc, out, err = run("export", make_ckpt(bits=4, group_size=64, method="rtn"), tmp_path / "m.gguf")
    assert rc == 0 and "14 Q4_0" in out and "all exact" in out, err
    rc, out, err = run("export", make_ckpt(bits=4, group_size=32, desc_act=True, static_groups=False),
                       tmp_path / "d.gguf", "--no-modelfile")
    lines = [l for l in err.splitlines() if l.startswith("error:")]
    assert rc == 2 and len(lines) == 1 and "act-order with dynamic groups" in lines[0], err
    assert not (tmp_path / "d.gguf").exists()


# --- TensorRT-LLM preconditions -----------------------------------------------------------------------------
def test_tensorrt_llm_accepts_4bit_g64_static_groups(make_ckpt):
    rep = check_target(make_ckpt(bits=4, group_size=64, desc_act=True, static_groups=True))
    assert rep.ok, rep.describe()
    assert "--weight_only_precision int4_gptq --per_group --group_size 64" in rep.commands[0]


@pytest.mark.parametrize("kw, failing", [
    (dict(bits=4, group_size=32, method="rtn"), {"group size"}),
    (dict(bits=3, group_size=64, method="rtn"), {"bits"}),
    (dict(bits=4, group_size=64, desc_act=True, static_groups=False), {"groups in input order"}),
    (dict(bits=4, group_size=64, method="rtn", checkpoint_format="gptq_v2"), {"zero-point convention"}),
    (dict(tied=True, bits=4, group_size=128, method="rtn"), {"unquantized tensors"}),
])
def test_tensorrt_llm_names_each_failed_precondition(make_ckpt, kw, failing):
    rep = check_target(make_ckpt(**kw))
    assert not rep.ok and {c.name for c in rep.checks if not c.ok} == failing, rep.describe()
    assert "FAIL" in rep.describe()


def test_unknown_target_is_refused(make_ckpt):
    with pytest.raises(GPTQPluginError, match="known targets tensorrt-llm"):
        check_target(make_ckpt(bits=4, group_size=64, method="rtn"), "onnx")


# --- the demo model -----------------------------------------------------------------------------------------
@pytest.mark.integration
@pytest.mark.slow
def test_demo_model_perplexity_through_transformers_gguf_loader(demo_ckpt_factory, data_dir, tmp_path):
    """The demo model with its first two blocks GPTQ'd (act-order + static groups, g64), exported: perplexity through
    Transformers' GGUF loader equals the plugin's within 0.1% on 2 windows of 512 tokens."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from gptq_plugin.evaluate import eval_windows, perplexity

    ckpt = demo_ckpt_factory(2, truncate=False, bits=4, group_size=64, desc_act=True, static_groups=True)
    rep = export_gguf(ckpt, tmp_path / "demo.gguf")
    assert rep.exact and len(rep.layers) == 14
    ids = eval_windows(AutoTokenizer.from_pretrained(ckpt), data_dir / "wikitext-2" / "wiki.test.raw", 512, 2)
    plugin = perplexity(load_quantized(ckpt), ids, progress=False)
    model = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="demo.gguf", dtype=torch.float32)
    via_gguf = perplexity(model, ids, progress=False)
    assert abs(via_gguf / plugin - 1) < 1e-3, (via_gguf, plugin)


@pytest.mark.integration
@pytest.mark.slow
def test_demo_model_through_llama_cpp(demo_ckpt_factory, data_dir, tmp_path):
    """Opt-in: llama.cpp itself (llama-cpp-python in its own environment, GPTQ_PLUGIN_LLAMA_CPP_PYTHON=its python)
    runs the export; its perplexity on 2 windows matches the plugin's within 1% (llama.cpp computes in its own
    kernels: Q8_0-quantized activations against Q4_0 weights on CPU)."""
    py = os.environ.get("GPTQ_PLUGIN_LLAMA_CPP_PYTHON")
    if not py:
        pytest.skip("set GPTQ_PLUGIN_LLAMA_CPP_PYTHON to a python with llama-cpp-python installed (docs/gguf.md)")
    from transformers import AutoTokenizer

    from gptq_plugin.evaluate import eval_windows, perplexity

    ckpt = demo_ckpt_factory(2, truncate=False, bits=4, group_size=64, desc_act=True, static_groups=True)
    export_gguf(ckpt, tmp_path / "demo.gguf")
    ids = eval_windows(AutoTokenizer.from_pretrained(ckpt), data_dir / "wikitext-2" / "wiki.test.raw", 512, 2)
    plugin = perplexity(load_quantized(ckpt), ids, progress=False)
    script = Path(__file__).parent.parent / "benchmarks" / "llama_cpp_ppl.py"
    (tmp_path / "ids.json").write_text(json.dumps(ids.tolist()))
    p = subprocess.run([py, str(script), str(tmp_path / "demo.gguf"), str(tmp_path / "ids.json")],
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    ppl = json.loads(p.stdout.strip().splitlines()[-1])["perplexity"]
    assert abs(ppl / plugin - 1) < 1e-2, (ppl, plugin)
