"""Checkpoint writing and reading on a tiny random Llama: round trip, atomic output, hostile inputs."""

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from gptq_plugin.checkpoint import load_quantized, save_quantized
from gptq_plugin.config import QuantizeConfig
from gptq_plugin.errors import CheckpointError, GPTQPluginError, OutputError
from gptq_plugin.linear import QuantLinear
from gptq_plugin.pipeline import quantize_model
from tests.tiny import tiny_llama




@pytest.fixture
def ckpt(tmp_path):
    model = tiny_llama()
    cfg = QuantizeConfig(bits=3, group_size=24, method="gptq", desc_act=True)
    calib = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(0))
    quantize_model(model, calib, cfg, batch_size=2, progress=False)
    out = save_quantized(model, cfg, tmp_path / "q")
    return out, model


def test_round_trip_logits(ckpt):
    out, model = ckpt
    loaded = load_quantized(out)
    assert sum(isinstance(m, QuantLinear) for m in loaded.modules()) == 14
    ids = torch.randint(0, 128, (2, 16))
    with torch.no_grad():
        a = model(ids).logits
        b = loaded(ids).logits
    torch.testing.assert_close(a, b, rtol=2e-3, atol=2e-3)  # unquantized tensors go through fp16 on disk


def test_v2_round_trip_gives_identical_layers(ckpt, tmp_path):
    out, model = ckpt
    cfg2 = QuantizeConfig(bits=3, group_size=24, desc_act=True, checkpoint_format="gptq_v2")
    out2 = save_quantized(model, cfg2, tmp_path / "v2")
    a, b = load_file(str(out / "model.safetensors")), load_file(str(out2 / "model.safetensors"))
    z = "model.layers.0.self_attn.q_proj.qzeros"
    assert not torch.equal(a[z], b[z])  # v1 stores zero - 1, v2 stores zero
    la, lb = load_quantized(out), load_quantized(out2)
    for (n, x), (_, y) in zip(la.state_dict().items(), lb.state_dict().items()):
        assert torch.equal(x, y), n


def test_sharded_output_and_index(ckpt, tmp_path):
    _, model = ckpt
    cfg = QuantizeConfig(bits=3, group_size=24, desc_act=True)
    out = save_quantized(model, cfg, tmp_path / "sharded", max_shard_bytes=20_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    ids = torch.randint(0, 128, (1, 8))
    with torch.no_grad():
        torch.testing.assert_close(load_quantized(out)(ids).logits, model(ids).logits, rtol=2e-3, atol=2e-3)


def test_existing_output_is_kept_without_overwrite(ckpt, tmp_path):
    out, model = ckpt
    before = (out / "model.safetensors").read_bytes()
    with pytest.raises(GPTQPluginError, match="--overwrite"):
        save_quantized(model, QuantizeConfig(bits=4, group_size=32), out)
    assert (out / "model.safetensors").read_bytes() == before
    save_quantized(model, QuantizeConfig(bits=3, group_size=24, desc_act=True), out, overwrite=True)
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".q.")]


def test_failed_write_leaves_nothing(ckpt, tmp_path, monkeypatch):
    _, model = ckpt
    import gptq_plugin.checkpoint as ck

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr("safetensors.torch.save_file", boom)
    with pytest.raises(OutputError, match="cannot write .*fail: disk full"):  # one clear error, not the OSError
        ck.save_quantized(model, QuantizeConfig(bits=3, group_size=24), tmp_path / "fail")
    assert not (tmp_path / "fail").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".fail")]


def _mutate(out, fn):
    path = out / "model.safetensors"
    sd = load_file(str(path))
    fn(sd)
    os.remove(path)
    save_file(sd, str(path), metadata={"format": "pt"})


@pytest.mark.parametrize("mutation, needle", [
    (lambda sd: sd.pop("model.layers.1.mlp.down_proj.scales"), "down_proj.scales is missing"),
    (lambda sd: sd.update({"model.layers.0.mlp.up_proj.qweight": torch.zeros(3, 96, dtype=torch.int32)}), "up_proj.qweight has shape"),
    (lambda sd: sd.update({"model.layers.0.mlp.up_proj.qweight": sd["model.layers.0.mlp.up_proj.qweight"].float()}), "up_proj.qweight has dtype"),
    (lambda sd: sd["model.layers.0.self_attn.o_proj.g_idx"].__setitem__(0, 99), "o_proj.g_idx has values"),
    (lambda sd: sd.update({"model.layers.0.extra.qweight": torch.zeros(1, dtype=torch.int32)}), "extra.qweight"),
    (lambda sd: sd.pop("model.norm.weight"), "model.norm.weight is missing"),
])
def test_broken_tensors_give_clear_errors(ckpt, mutation, needle):
    out, _ = ckpt
    _mutate(out, mutation)
    with pytest.raises(CheckpointError, match=needle.replace(".", r"\.")):
        load_quantized(out)


def test_truncated_file(ckpt):
    out, _ = ckpt
    path = out / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load_quantized(out)


def test_index_outside_folder_is_refused(ckpt):
    out, _ = ckpt
    (out / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "../../etc/passwd"}}))
    with pytest.raises(CheckpointError, match="outside the checkpoint folder"):
        load_quantized(out)


def test_pickle_weights_refused_by_default(ckpt):
    out, _ = ckpt
    sd = load_file(str(out / "model.safetensors"))
    os.remove(out / "model.safetensors")
    torch.save(sd, out / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="pickle"):
        load_quantized(out)
    assert sum(isinstance(m, QuantLinear) for m in load_quantized(out, allow_pickle=True).modules()) == 14


def test_bits_mismatch_between_config_and_tensors(ckpt):
    out, _ = ckpt
    cfg = json.loads((out / "config.json").read_text())
    cfg["quantization_config"]["bits"] = 4
    (out / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="bits=4"):
        load_quantized(out)
