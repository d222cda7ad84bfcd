"""Corrupt checkpoints through the Transformers adapter (issue 13, item 2): every one that ``load_quantized``
refuses is refused with the project's CheckpointError (never a randomly initialised layer, a float ``qweight``
used as codes, or a foreign SafetensorError/RuntimeError/UnpicklingError), and a folder that is not quantized is
not quantized by ``GPTQPluginConfig()`` unless asked to. A tiny random Llama: seconds, no download."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from gptq_plugin import CheckpointError, ConfigError, GPTQPluginConfig, QuantLinear
from gptq_plugin.checkpoint import load_quantized, save_quantized
from gptq_plugin.config import QuantizeConfig
from gptq_plugin.pipeline import quantize_model
from tests.tiny import tiny_llama

L = "model.layers.0.self_attn.q_proj"


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory) -> tuple[Path, Path]:
    """``(float model folder, its GPTQ checkpoint)``: 4 bits, group 32, act-order."""
    root = tmp_path_factory.mktemp("hf-corrupt")
    model = tiny_llama()
    model.save_pretrained(root / "dense")
    cfg = QuantizeConfig(bits=4, group_size=32, desc_act=True)
    quantize_model(model, torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(0)), cfg,
                   progress=False)
    save_quantized(model, cfg, root / "q")
    return root / "dense", root / "q"


def _tensors(fn):
    def edit(d: Path):
        sd = load_file(str(d / "model.safetensors"))
        fn(sd)
        save_file(sd, str(d / "model.safetensors"), metadata={"format": "pt"})
    return edit


def _truncate(d: Path):
    f = d / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


def _bad_pickle(d: Path):
    os.remove(d / "model.safetensors")
    (d / "pytorch_model.bin").write_bytes(b"\x80\x04not a pickle at all")


def _index_to(target):
    def edit(d: Path):
        sd = load_file(str(d / "model.safetensors"))
        os.remove(d / "model.safetensors")
        path = target(d)
        save_file(sd, str(path), metadata={"format": "pt"})
        name = str(path) if target is _abs else f"../{path.name}"
        (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": {k: name for k in sd}}))
    return edit


def _abs(d: Path) -> Path:
    return d.parent / f"{d.name}-outside-abs.safetensors"


def _up(d: Path) -> Path:
    return d.parent / f"{d.name}-outside-up.safetensors"


def _set(key, fn):
    return _tensors(lambda sd: sd.update({key: fn(sd[key])}))


CORRUPT = {  # name -> (edit, needle)
    "no-qweight": (_tensors(lambda sd: sd.pop(f"{L}.qweight")), f"{L}.qweight is missing"),
    "no-layer": (_tensors(lambda sd: [sd.pop(f"{L}.{leaf}") for leaf in ("qweight", "qzeros", "scales", "g_idx")]),
                 f"{L}.qweight (or {L}.weight) is missing"),
    "no-norm": (_tensors(lambda sd: sd.pop("model.norm.weight")), "model.norm.weight is missing"),
    "float-qweight": (_set(f"{L}.qweight", lambda t: t.float()), f"{L}.qweight has dtype F32, expected I32"),
    "int16-scales": (_set(f"{L}.scales", lambda t: t.to(torch.int16)), f"{L}.scales has dtype I16"),
    "int64-g_idx": (_set(f"{L}.g_idx", lambda t: t.long()), "gptq-plugin convert"),
    "int8-embedding": (_set("model.embed_tokens.weight", lambda t: t.to(torch.int8)),
                       "model.embed_tokens.weight has dtype I8"),
    "truncated": (_truncate, "corrupt or truncated safetensors file"),
    "bad-pickle": (_bad_pickle, "cannot be read as a weights-only torch file"),
    "index-absolute": (_index_to(_abs), "outside the checkpoint folder"),
    "index-dotdot": (_index_to(_up), "outside the checkpoint folder"),
}


@pytest.mark.parametrize("corruption", sorted(CORRUPT))
@pytest.mark.parametrize("route", ["plugin-config", "plain"])
def test_corrupt_checkpoint_is_one_checkpoint_error(tiny_dirs, tmp_path, corruption, route):
    edit, needle = CORRUPT[corruption]
    d = tmp_path / "ck"
    shutil.copytree(tiny_dirs[1], d)
    edit(d)
    kw = {"quantization_config": GPTQPluginConfig()} if route == "plugin-config" else {}
    with pytest.raises(CheckpointError) as e:
        AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32, **kw)
    assert needle in str(e.value), str(e.value)


def test_valid_checkpoint_still_loads_like_load_quantized(tiny_dirs):
    model = AutoModelForCausalLM.from_pretrained(tiny_dirs[1], quantization_config=GPTQPluginConfig(),
                                                 dtype=torch.float32)
    assert sum(isinstance(m, QuantLinear) for m in model.modules()) == 14
    ids = torch.arange(12).unsqueeze(0)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, load_quantized(tiny_dirs[1])(ids).logits)


def test_folder_without_quantization_config_is_not_quantized_by_default(tiny_dirs):
    """``GPTQPluginConfig()`` means "load a quantized checkpoint": for a float folder it used to run GPTQ with the
    default settings and calibration text; now it says the folder is not quantized and how to quantize on load."""
    with pytest.raises(ConfigError, match=r"has no quantization_config: it is not a quantized checkpoint.*"
                                          r"GPTQPluginConfig\(bits=4, dataset="):
        AutoModelForCausalLM.from_pretrained(tiny_dirs[0], quantization_config=GPTQPluginConfig())


def test_quantized_folder_without_its_config_is_refused(tiny_dirs, tmp_path):
    """A GPTQ checkpoint whose config.json lost its quantization_config: quantizing "on load" would run GPTQ on
    randomly initialised float layers (the qweight tensors match none of them)."""
    d = tmp_path / "stripped"
    shutil.copytree(tiny_dirs[1], d)
    cfg = json.loads((d / "config.json").read_text())
    del cfg["quantization_config"]
    (d / "config.json").write_text(json.dumps(cfg))
    os.remove(d / "quantize_config.json")
    with pytest.raises(CheckpointError, match=rf"holds quantized tensors \({L.replace('.', '[.]')}|quantized tensors"):
        AutoModelForCausalLM.from_pretrained(d, quantization_config=GPTQPluginConfig(bits=4, dataset=["x " * 64]))
