"""Numerical faults in the model-level driver, each with a clear outcome naming the layer or block: NaN/Inf
calibration activations stop the run; a layer no calibration token reaches is quantized with RTN and reported;
fp16 overflow of scales is logged; a Hessian that stays non positive definite falls back to RTN per layer."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

from gptq_plugin.config import QuantizeConfig
from gptq_plugin.errors import NumericalError
from gptq_plugin.linear import QuantLinear
from gptq_plugin.pipeline import quantize_model
from tests.tiny import tiny_llama

CALIB = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(0))
CFG = QuantizeConfig(bits=4, group_size=32, desc_act=True)


@pytest.mark.parametrize("low_memory", [False, True])
def test_nan_calibration_inputs_stop_naming_the_block(low_memory):
    model = tiny_llama()
    with torch.no_grad():
        model.model.embed_tokens.weight[CALIB[0, 3]] = float("nan")
    with pytest.raises(NumericalError, match=r"model\.layers\.0: its calibration inputs contain NaN or Inf"):
        quantize_model(model, CALIB, CFG, progress=False, low_memory=low_memory)


def test_overflowing_activations_name_the_layer():
    model = tiny_llama()
    with torch.no_grad():  # block 1's MLP input overflows to inf: its Hessian is not finite
        model.model.layers[1].post_attention_layernorm.weight.fill_(float("inf"))
    with pytest.raises(NumericalError, match=r"model\.layers\.1\.mlp\.(gate|up)_proj: the Hessian contains NaN or Inf"):
        quantize_model(model, CALIB, CFG, progress=False)


def test_layer_without_calibration_tokens_gets_rtn_and_is_reported(caplog):
    model = tiny_llama()
    model.model.layers[0].mlp.unused_expert = nn.Linear(64, 96, bias=False)  # never called by forward
    with caplog.at_level(logging.WARNING, logger="gptq_plugin.pipeline"):
        report = quantize_model(model, CALIB, CFG, progress=False)
    assert isinstance(model.model.layers[0].mlp.unused_expert, QuantLinear)  # never silently left unquantized
    rows = {r.name: r for r in report.layers}
    assert "RTN" in rows["model.layers.0.mlp.unused_expert"].fallback
    assert rows["model.layers.0.mlp.up_proj"].fallback is None
    assert "model.layers.0.mlp.unused_expert: no calibration tokens reached this layer: quantized with RTN" in caplog.text


def test_fp16_scale_overflow_is_logged(caplog):
    model = tiny_llama(layers=1)
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight[0, :32] = 1e7  # scale 1e7 / 7 > 65504
    with caplog.at_level(logging.WARNING, logger="gptq_plugin.pipeline"):
        report = quantize_model(model, CALIB, QuantizeConfig(bits=4, group_size=32, method="rtn"), progress=False)
    row = {r.name: r for r in report.layers}["model.layers.0.mlp.down_proj"]
    assert "reached fp16's maximum" in row.note and "model.layers.0.mlp.down_proj" in caplog.text
    assert all(r.note is None for r in report.layers if r is not row)
