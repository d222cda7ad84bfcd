"""Mutations of a real (tiny) GPTQ checkpoint for the property-based fuzz tests of the readers
(tests/test_fuzz.py: the core's; tests/transformers/test_hf_fuzz.py: the Transformers adapter's)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from hypothesis import strategies as st

from gptq_plugin.checkpoint import save_quantized
from gptq_plugin.config import QuantizeConfig
from gptq_plugin.pipeline import quantize_model
from tests.tiny import tiny_llama

EXTREME_VALUES = [-1, 0, 7, 2**20, -2**31, float("nan"), float("inf")]


def tiny_checkpoint(out: Path, layers: int = 2) -> Path:
    """A 4-bit g32 act-order GPTQ checkpoint of :func:`tests.tiny.tiny_llama` at ``out``."""
    model = tiny_llama(layers=layers)
    cfg = QuantizeConfig(bits=4, group_size=32, desc_act=True)
    calib = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(0))
    quantize_model(model, calib, cfg, progress=False)
    save_quantized(model, cfg, out)
    return out


def fresh_copy(ckpt: Path, tmp_path: Path) -> Path:
    """A new copy of ``ckpt`` for one example (hypothesis reuses ``tmp_path`` across examples)."""
    ck = tmp_path / "m"
    shutil.rmtree(ck, ignore_errors=True)
    shutil.copytree(ckpt, ck)
    return ck


def mutate_bytes(f: Path, data) -> None:
    """Damage a safetensors file: truncate it, flip bytes of its header or anywhere, or set its header length."""
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


def mutate_tensors_and_config(ck: Path, data, dtypes, fields, values, config_files=("config.json",)) -> None:
    """One to three mutations of the checkpoint folder ``ck``: drop a tensor, cast it to one of ``dtypes``, cut its
    shape, set one element to an extreme value, or set a ``quantization_config`` field (one of ``fields``) to one of
    ``values`` in each of ``config_files``; the tensors are written back to ``model.safetensors``."""
    from safetensors.torch import load_file, save_file

    state = load_file(str(ck / "model.safetensors"))
    keys = sorted(state)
    for _ in range(data.draw(st.integers(1, 3))):
        k = data.draw(st.sampled_from(keys))
        op = data.draw(st.sampled_from(["drop", "dtype", "shape", "values", "config"]))
        if op == "drop" and k in state:
            del state[k]
        elif op == "dtype" and k in state:
            state[k] = state[k].to(data.draw(st.sampled_from(dtypes)))
        elif op == "shape" and k in state:
            t = state[k].reshape(-1)
            state[k] = t[: data.draw(st.integers(0, t.numel()))].clone()
        elif op == "values" and k in state and state[k].numel():
            t = state[k].clone().reshape(-1)
            value = data.draw(st.sampled_from(EXTREME_VALUES))
            if not t.is_floating_point():
                info = torch.iinfo(t.dtype)
                value = int(min(max(value, info.min), info.max)) if value == value and abs(value) != float("inf") else 0
            t[data.draw(st.integers(0, t.numel() - 1))] = value
            state[k] = t.reshape(state[k].shape)
        elif op == "config":
            for name in config_files:
                c = json.loads((ck / name).read_text())
                q = c["quantization_config"] if name == "config.json" else c
                q[data.draw(st.sampled_from(fields), label="field")] = data.draw(values, label="value")
                (ck / name).write_text(json.dumps(c))
    save_file(state, str(ck / "model.safetensors"), metadata={"format": "pt"})
