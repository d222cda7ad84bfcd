"""The TGI loader runs the core's validator on every layer it builds (issue 13): NaN scales and integer scales,
which the loader used to hand to the kernels, are refused naming the tensor; an out-of-range g_idx too, before
any int32 cast could wrap it."""

from __future__ import annotations

import dataclasses
import shutil

import pytest
import torch

from gptq_plugin.errors import CheckpointError

from tgi_standin import ATTN, loader_of

NAME = f"{ATTN}.o_proj"


def _damaged(ckpts, tmp_path, key, fn):
    from safetensors.torch import load_file, save_file

    ckpt = dataclasses.replace(ckpts["4bit-g16"], path=tmp_path)
    for f in ckpts["4bit-g16"].files:
        t = load_file(str(f))
        if key in t:
            t[key] = fn(t[key].clone())
        save_file(t, str(tmp_path / f.name))
    shutil.copy(ckpts["4bit-g16"].path / "config.json", tmp_path / "config.json")
    return ckpt


def _nan(t):
    t.view(-1)[5] = float("nan")
    return t


def _wide(t):
    t = t.to(torch.int64)
    t[0] = 2**32 + 1  # wraps to 1 as int32
    return t


@pytest.mark.parametrize("leaf, fn, needle", [
    ("scales", _nan, r"o_proj\.scales contains NaN or Inf"),
    ("scales", lambda t: t.to(torch.int16), r"o_proj\.scales has dtype torch\.int16"),
    ("g_idx", _wide, r"o_proj\.g_idx has values in \[0, 429496729[67]\], outside"),
])
@pytest.mark.parametrize("method", ["get_weights", "get_weights_row"])
def test_damaged_layer_is_refused(ckpts, tmp_path, leaf, fn, needle, method):
    ckpt = _damaged(ckpts, tmp_path, f"{NAME}.{leaf}", fn)
    with pytest.raises(CheckpointError, match=needle):
        getattr(ckpt.weights(loader_of(ckpt)), method)(NAME)
