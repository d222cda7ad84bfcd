"""Property-based fuzzing of the Transformers adapter's load path (issue 13), as tests/test_fuzz.py fuzzes the
core's reader: mutated real (tiny) checkpoints loaded with ``from_pretrained(CKPT, quantization_config=
GPTQPluginConfig())``. The only allowed outcomes are the model ``load_quantized`` gives (equal logits) or the
project's own exception (GPTQPluginError and its subclasses); never a foreign SafetensorError/RuntimeError/KeyError,
never a model where ``load_quantized`` refuses the checkpoint. Bounded: a few dozen examples, seconds each."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import AutoModelForCausalLM

from gptq_plugin import GPTQPluginConfig
from gptq_plugin.checkpoint import load_quantized, save_quantized
from gptq_plugin.config import QuantizeConfig
from gptq_plugin.errors import GPTQPluginError
from gptq_plugin.pipeline import quantize_model
from tests.tiny import tiny_llama

# quant_method is left out: a checkpoint that says "awq" is Transformers' to load (or refuse), by design
FIELDS = ["bits", "group_size", "desc_act", "sym", "static_groups", "checkpoint_format", "format", "lm_head",
          "method", "meta", "pack_dtype", "is_marlin_format", "zzz"]
VALUES = st.one_of(st.none(), st.booleans(), st.integers(-3, 300), st.text(max_size=8),
                   st.sampled_from(["gptq", "gptq_v2", "int32", "compressed-tensors"]))
SETTINGS = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
IDS = torch.arange(1, 13).unsqueeze(0)


@pytest.fixture(scope="module")
def real_ckpt(tmp_path_factory) -> Path:
    model = tiny_llama(layers=1)
    cfg = QuantizeConfig(bits=4, group_size=32, desc_act=True)
    quantize_model(model, torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(0)), cfg,
                   progress=False)
    out = tmp_path_factory.mktemp("hf-fuzz") / "q"
    save_quantized(model, cfg, out)
    return out


def _fresh_copy(ckpt: Path, tmp_path: Path) -> Path:
    ck = tmp_path / "m"
    shutil.rmtree(ck, ignore_errors=True)
    shutil.copytree(ckpt, ck)
    return ck


@torch.no_grad()
def _logits_or_error(load):
    try:
        return load()(IDS).logits
    except GPTQPluginError as e:
        assert str(e)
        return e


def _check(ck: Path) -> None:
    ref = _logits_or_error(lambda: load_quantized(ck))
    got = _logits_or_error(lambda: AutoModelForCausalLM.from_pretrained(
        ck, quantization_config=GPTQPluginConfig(), dtype=torch.float32))
    if isinstance(got, Exception):
        return  # refused with the project's error: allowed whatever load_quantized did
    assert not isinstance(ref, Exception), f"Transformers loaded a checkpoint that load_quantized refuses: {ref}"
    torch.testing.assert_close(got, ref, rtol=0, atol=0, equal_nan=True)


@SETTINGS
@given(data=st.data())
def test_mutated_safetensors_bytes(real_ckpt, tmp_path, data):
    ck = _fresh_copy(real_ckpt, tmp_path)
    f = ck / "model.safetensors"
    raw = bytearray(f.read_bytes())
    header_len = int.from_bytes(raw[:8], "little")
    kind = data.draw(st.sampled_from(["truncate", "flip-header", "flip-anywhere", "header-length"]))
    if kind == "truncate":
        raw = raw[: data.draw(st.integers(0, len(raw) - 1))]
    elif kind == "flip-header":
        for _ in range(data.draw(st.integers(1, 4))):
            raw[data.draw(st.integers(8, 8 + header_len - 1))] = data.draw(st.integers(0, 255))
    elif kind == "flip-anywhere":
        for _ in range(data.draw(st.integers(1, 8))):
            raw[data.draw(st.integers(0, len(raw) - 1))] = data.draw(st.integers(0, 255))
    else:
        raw[:8] = data.draw(st.integers(0, 2**64 - 1)).to_bytes(8, "little")
    f.write_bytes(bytes(raw))
    _check(ck)


@SETTINGS
@given(data=st.data())
def test_mutated_tensors_and_configs(real_ckpt, tmp_path, data):
    from safetensors.torch import load_file, save_file

    ck = _fresh_copy(real_ckpt, tmp_path)
    state = load_file(str(ck / "model.safetensors"))
    keys = sorted(state)
    for _ in range(data.draw(st.integers(1, 3))):
        k = data.draw(st.sampled_from(keys))
        op = data.draw(st.sampled_from(["drop", "dtype", "shape", "values", "config"]))
        if op == "drop" and k in state:
            del state[k]
        elif op == "dtype" and k in state:
            state[k] = state[k].to(data.draw(st.sampled_from([torch.int8, torch.float32, torch.int64, torch.bfloat16,
                                                              torch.int16, torch.int32])))
        elif op == "shape" and k in state:
            t = state[k].reshape(-1)
            state[k] = t[: data.draw(st.integers(0, t.numel()))].clone()
        elif op == "values" and k in state and state[k].numel():
            t = state[k].clone().reshape(-1)
            value = data.draw(st.sampled_from([-1, 0, 7, 2**20, -2**31, float("nan"), float("inf")]))
            if not t.is_floating_point():
                info = torch.iinfo(t.dtype)
                value = int(min(max(value, info.min), info.max)) if value == value and abs(value) != float("inf") else 0
            t[data.draw(st.integers(0, t.numel() - 1))] = value
            state[k] = t.reshape(state[k].shape)
        elif op == "config":
            for name in ("config.json", "quantize_config.json"):
                c = json.loads((ck / name).read_text())
                q = c["quantization_config"] if name == "config.json" else c
                q[data.draw(st.sampled_from(FIELDS), label="field")] = data.draw(VALUES, label="value")
                (ck / name).write_text(json.dumps(c))
    save_file(state, str(ck / "model.safetensors"), metadata={"format": "pt"})
    _check(ck)
