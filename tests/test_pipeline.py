"""The model-level driver's two true-sequential passes (one pass in turn-taking threads; low memory, group by group)
must give identical quantized tensors, in fp32 and under bf16 autocast (autocast state is per thread: the one-pass
driver's batch threads must each enter it)."""

from __future__ import annotations

import pytest
import torch

from gptq_plugin.config import QuantizeConfig
from gptq_plugin.pipeline import quantize_model
from tests.tiny import tiny_llama

CALIB = torch.randint(0, 128, (6, 32), generator=torch.Generator().manual_seed(1))
CFG = QuantizeConfig(bits=4, group_size=32, desc_act=True, sym=False)


def _quantized(low_memory: bool, forward_dtype) -> dict[str, torch.Tensor]:
    model = tiny_llama(seed=3)
    quantize_model(model, CALIB, CFG, batch_size=2, progress=False, low_memory=low_memory,
                   forward_dtype=forward_dtype)
    return {k: v for k, v in model.state_dict().items() if k.endswith(("qweight", "qzeros", "scales", "g_idx"))}


@pytest.mark.parametrize("forward_dtype", [None, torch.bfloat16])
def test_one_pass_and_low_memory_drivers_agree(forward_dtype):
    a, b = _quantized(False, forward_dtype), _quantized(True, forward_dtype)
    assert a.keys() == b.keys() and len(a) == 2 * 7 * 4
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_bf16_forwards_are_applied():
    a, b = _quantized(False, None), _quantized(False, torch.bfloat16)
    assert any(not torch.equal(a[k], b[k]) for k in a)  # bf16 activations change some Hessians, so some codes
