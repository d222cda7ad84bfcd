"""compressed-tensors ``pack-quantized`` checkpoints through the Transformers adapter: a small random Llama,
GPTQ-quantized and saved by the core, then converted with ``gptq-plugin convert --to compressed-tensors``. Loaded
from the converted copy it must be the model loaded from the GPTQ original (same buffers, same fp32 logits, same
greedy tokens), and a copy that contradicts its own config must fail before loading, naming the tensor."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers", reason="Transformers is not installed: pip install 'gptq-plugin[transformers]'")

from safetensors.torch import load_file, save_file  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

from gptq_plugin import CheckpointError, GPTQPluginConfig, QuantizeConfig, QuantLinear  # noqa: E402
from gptq_plugin.adapters.transformers import GPTQPluginHfQuantizer  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tiny import tiny_llama  # noqa: E402

CASES = {
    "4bit-g32-actorder-asym": dict(bits=4, group_size=32, desc_act=True, static_groups=False, sym=False),
    "3bit-g32-sym": dict(bits=3, group_size=32, desc_act=False, sym=True),
}
IDS = torch.tensor([[1, 17, 99, 5, 64, 3, 120, 42, 42, 7, 11, 80]])


@pytest.fixture(scope="module", params=list(CASES))
def pair(request, tmp_path_factory) -> tuple[Path, Path]:
    """``(gptq, compressed-tensors)`` folders of the same quantized model."""
    from gptq_plugin.checkpoint import save_quantized
    from gptq_plugin.convert import convert_checkpoint
    from gptq_plugin.pipeline import quantize_model

    root = tmp_path_factory.mktemp(request.param)
    model = tiny_llama(seed=3)
    cfg = QuantizeConfig(**CASES[request.param])
    calib = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(4))
    quantize_model(model, calib, cfg, batch_size=4, progress=False)
    save_quantized(model, cfg, root / "gptq")
    convert_checkpoint(root / "gptq", root / "ct", "compressed-tensors")
    return root / "gptq", root / "ct"


def quant_layers(model) -> dict[str, QuantLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}


@torch.no_grad()
def logits(model) -> torch.Tensor:
    return model(IDS).logits.float()


@torch.no_grad()
def greedy(model, n: int = 8) -> list[int]:
    out = model.generate(IDS, attention_mask=torch.ones_like(IDS), max_new_tokens=n, min_new_tokens=n,
                         do_sample=False)
    return out[0, IDS.shape[1]:].tolist()


def test_converted_checkpoint_is_compressed_tensors(pair):
    gptq, ct = pair
    qcfg = json.loads((ct / "config.json").read_text())["quantization_config"]
    assert qcfg["quant_method"] == "compressed-tensors" and qcfg["format"] == "pack-quantized"
    assert "lm_head" in qcfg["ignore"]
    state = load_file(str(ct / "model.safetensors"))
    assert not any(k.endswith(".qweight") for k in state) and "lm_head.weight" in state
    w = qcfg["config_groups"]["group_0"]["weights"]
    assert any(k.endswith(".weight_zero_point") for k in state) == (not w["symmetric"])
    assert any(k.endswith(".weight_g_idx") for k in state) == (w["actorder"] == "group")


def test_loads_as_the_gptq_checkpoint(pair):
    """The same QuantLinear buffers (GPTQ v1 layout), logits and greedy tokens as the GPTQ original, which the core's
    own loader (no Transformers quantizer) reads the same way."""
    from gptq_plugin.checkpoint import load_quantized

    gptq, ct = pair
    from_ct = AutoModelForCausalLM.from_pretrained(ct, quantization_config=GPTQPluginConfig(), dtype=torch.float32)
    from_gptq = AutoModelForCausalLM.from_pretrained(gptq, quantization_config=GPTQPluginConfig(),
                                                     dtype=torch.float32)
    core = load_quantized(gptq, dtype=torch.float32)
    assert isinstance(from_ct.hf_quantizer, GPTQPluginHfQuantizer)
    a, b = quant_layers(from_ct), quant_layers(from_gptq)
    assert sorted(a) == sorted(b) and len(a) == 14
    for name, m in a.items():
        assert not hasattr(m, "weight_packed"), name  # the checkpoint's buffers are gone after the conversion
        for leaf in ("qweight", "qzeros", "scales", "g_idx"):
            assert torch.equal(getattr(m, leaf), getattr(b[name], leaf)), f"{name}.{leaf}"
    assert type(from_ct.lm_head) is torch.nn.Linear  # in the ignore list: unquantized
    ref = logits(core)
    assert torch.equal(logits(from_ct), logits(from_gptq))
    torch.testing.assert_close(logits(from_ct), ref, rtol=1e-5, atol=1e-5)
    assert greedy(from_ct) == greedy(core)


@pytest.mark.skipif(__import__("importlib.util").util.find_spec("compressed_tensors") is not None,
                    reason="compressed-tensors is installed: a plain from_pretrained goes to Transformers' backend")
def test_plain_from_pretrained_uses_the_plugin_without_compressed_tensors(pair):
    gptq, ct = pair
    model = AutoModelForCausalLM.from_pretrained(ct, dtype=torch.float32)
    assert isinstance(model.hf_quantizer, GPTQPluginHfQuantizer)
    ref = AutoModelForCausalLM.from_pretrained(gptq, quantization_config=GPTQPluginConfig(), dtype=torch.float32)
    assert torch.equal(logits(model), logits(ref))


def _rewrite(ct: Path, out: Path, weights: dict | None = None, drop: str | None = None) -> Path:
    """A copy of ``ct`` with fields of its weights scheme replaced and/or tensor ``drop`` removed."""
    shutil.copytree(ct, out)
    if weights:
        d = json.loads((out / "config.json").read_text())
        d["quantization_config"]["config_groups"]["group_0"]["weights"].update(weights)
        (out / "config.json").write_text(json.dumps(d))
    if drop:
        state = load_file(str(out / "model.safetensors"))
        del state[drop]
        save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


def test_mismatched_checkpoint_is_one_clear_error(pair, tmp_path):
    _, ct = pair
    wrong_groups = _rewrite(ct, tmp_path / "g16", {"group_size": 16})
    with pytest.raises(CheckpointError, match=r"model\.layers\.0\.\S+\.weight_scale has shape .*group_size=16"):
        AutoModelForCausalLM.from_pretrained(wrong_groups, quantization_config=GPTQPluginConfig())
    bits = 8 if json.loads((ct / "config.json").read_text())["quantization_config"]["config_groups"]["group_0"][
        "weights"]["num_bits"] != 8 else 4
    wrong_bits = _rewrite(ct, tmp_path / "bits", {"num_bits": bits})
    with pytest.raises(CheckpointError, match=rf"weight_packed has shape .*bits={bits}"):
        AutoModelForCausalLM.from_pretrained(wrong_bits, quantization_config=GPTQPluginConfig())
    partial = _rewrite(ct, tmp_path / "partial", drop="model.layers.1.mlp.up_proj.weight_shape")
    with pytest.raises(CheckpointError, match=r"model\.layers\.1\.mlp\.up_proj\.weight_shape is missing"):
        AutoModelForCausalLM.from_pretrained(partial, quantization_config=GPTQPluginConfig())
