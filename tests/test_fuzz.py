"""Property-based fuzzing of the two parsers that take untrusted input: the quantization-config parser and the
checkpoint reader (on mutated real checkpoints). The only allowed outcomes are a correct result or the
project's own exception type (GPTQPluginError and its subclasses) with a message; never a stray KeyError,
struct.error, RuntimeError from deep inside torch or safetensors."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gptq_plugin.checkpoint import load_quantized, save_quantized
from gptq_plugin.config import QuantizeConfig
from gptq_plugin.errors import GPTQPluginError
from gptq_plugin.formats import read_checkpoint
from gptq_plugin.pipeline import quantize_model
from tests.tiny import tiny_llama

FIELDS = ["bits", "group_size", "desc_act", "sym", "static_groups", "true_sequential", "damp_percent",
          "damp_auto_increment", "mse", "block_size", "checkpoint_format", "format", "lm_head", "method",
          "quant_method", "meta", "pack_dtype", "is_marlin_format", "dynamic", "zzz"]
VALUES = st.one_of(st.none(), st.booleans(), st.integers(-2**40, 2**40), st.floats(allow_nan=True),
                   st.text(max_size=12), st.sampled_from(["gptq", "gptq_v2", "int32", "rtn", "compressed-tensors"]),
                   st.lists(st.integers(-3, 300), max_size=3), st.dictionaries(st.text(max_size=5), st.integers(),
                                                                               max_size=2))
SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@SETTINGS
@given(st.dictionaries(st.sampled_from(FIELDS), VALUES, max_size=8))
def test_config_parser_returns_a_valid_config_or_a_config_error(d):
    try:
        cfg = QuantizeConfig.from_dict(d)
    except GPTQPluginError as e:
        assert str(e)
        return
    cfg.validate()
    again = QuantizeConfig.from_dict(cfg.to_dict())
    assert dataclasses.replace(again, meta={}) == dataclasses.replace(cfg, meta={})


@pytest.fixture(scope="module")
def real_ckpt(tmp_path_factory) -> Path:
    model = tiny_llama()
    cfg = QuantizeConfig(bits=4, group_size=32, desc_act=True)
    calib = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(0))
    quantize_model(model, calib, cfg, progress=False)
    out = tmp_path_factory.mktemp("fuzz") / "q"
    save_quantized(model, cfg, out)
    return out


def _fresh_copy(ckpt: Path, tmp_path: Path) -> Path:
    """A new copy of ``ckpt`` for one example (hypothesis reuses ``tmp_path`` across examples)."""
    ck = tmp_path / "m"
    shutil.rmtree(ck, ignore_errors=True)
    shutil.copytree(ckpt, ck)
    return ck


def _load_or_clear_error(path: Path) -> None:
    for read in (lambda: load_quantized(path), lambda: read_checkpoint(path)):
        try:
            read()
        except GPTQPluginError as e:
            assert str(e)


@SETTINGS
@given(data=st.data())
def test_mutated_safetensors_load_or_fail_clearly(real_ckpt, tmp_path, data):
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
    _load_or_clear_error(ck)


@SETTINGS
@given(data=st.data())
def test_mutated_tensors_and_configs_load_or_fail_clearly(real_ckpt, tmp_path, data):
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
            state[k] = state[k].to(data.draw(st.sampled_from([torch.int8, torch.float32, torch.int64, torch.bfloat16])))
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
            c = json.loads((ck / "config.json").read_text())
            c["quantization_config"][data.draw(st.sampled_from(FIELDS))] = data.draw(VALUES)
            (ck / "config.json").write_text(json.dumps(c))
    save_file(state, str(ck / "model.safetensors"), metadata={"format": "pt"})
    _load_or_clear_error(ck)
