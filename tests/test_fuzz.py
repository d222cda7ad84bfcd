"""Property-based fuzzing of the two parsers that take untrusted input: the quantization-config parser and the
checkpoint reader (on mutated real checkpoints). The only allowed outcomes are a correct result or the
project's own exception type (GPTQPluginError and its subclasses) with a message; never a stray KeyError,
struct.error, RuntimeError from deep inside torch or safetensors."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gptq_plugin.checkpoint import load_quantized
from gptq_plugin.config import QuantizeConfig
from gptq_plugin.errors import GPTQPluginError
from gptq_plugin.reader import read_checkpoint
from tests.mutations import fresh_copy, mutate_bytes, mutate_tensors_and_config, tiny_checkpoint

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
    return tiny_checkpoint(tmp_path_factory.mktemp("fuzz") / "q")


def _load_or_clear_error(path: Path) -> None:
    for read in (lambda: load_quantized(path), lambda: read_checkpoint(path)):
        try:
            read()
        except GPTQPluginError as e:
            assert str(e)


@SETTINGS
@given(data=st.data())
def test_mutated_safetensors_load_or_fail_clearly(real_ckpt, tmp_path, data):
    ck = fresh_copy(real_ckpt, tmp_path)
    mutate_bytes(ck / "model.safetensors", data)
    _load_or_clear_error(ck)


@SETTINGS
@given(data=st.data())
def test_mutated_tensors_and_configs_load_or_fail_clearly(real_ckpt, tmp_path, data):
    ck = fresh_copy(real_ckpt, tmp_path)
    mutate_tensors_and_config(ck, data, [torch.int8, torch.float32, torch.int64, torch.bfloat16], FIELDS, VALUES)
    _load_or_clear_error(ck)
