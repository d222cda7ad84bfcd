"""Property-based fuzzing of the Transformers adapter's load path (issue 13), as tests/test_fuzz.py fuzzes the
core's reader: mutated real (tiny) checkpoints loaded with ``from_pretrained(CKPT, quantization_config=
GPTQPluginConfig())``. The only allowed outcomes are the model ``load_quantized`` gives (equal logits) or the
project's own exception (GPTQPluginError and its subclasses); never a foreign SafetensorError/RuntimeError/KeyError,
never a model where ``load_quantized`` refuses the checkpoint. Bounded: a few dozen examples, seconds each."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import AutoModelForCausalLM

from gptq_plugin import GPTQPluginConfig
from gptq_plugin.checkpoint import load_quantized
from gptq_plugin.errors import GPTQPluginError
from tests.mutations import fresh_copy, mutate_bytes, mutate_tensors_and_config, tiny_checkpoint

# quant_method is left out: a checkpoint that says "awq" is Transformers' to load (or refuse), by design
FIELDS = ["bits", "group_size", "desc_act", "sym", "static_groups", "checkpoint_format", "format", "lm_head",
          "method", "meta", "pack_dtype", "is_marlin_format", "zzz"]
VALUES = st.one_of(st.none(), st.booleans(), st.integers(-3, 300), st.text(max_size=8),
                   st.sampled_from(["gptq", "gptq_v2", "int32", "compressed-tensors"]))
SETTINGS = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
IDS = torch.arange(1, 13).unsqueeze(0)


@pytest.fixture(scope="module")
def real_ckpt(tmp_path_factory) -> Path:
    return tiny_checkpoint(tmp_path_factory.mktemp("hf-fuzz") / "q", layers=1)


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
    ck = fresh_copy(real_ckpt, tmp_path)
    mutate_bytes(ck / "model.safetensors", data)
    _check(ck)


@SETTINGS
@given(data=st.data())
def test_mutated_tensors_and_configs(real_ckpt, tmp_path, data):
    ck = fresh_copy(real_ckpt, tmp_path)
    mutate_tensors_and_config(ck, data, [torch.int8, torch.float32, torch.int64, torch.bfloat16, torch.int16,
                                         torch.int32], FIELDS, VALUES, ("config.json", "quantize_config.json"))
    _check(ck)
