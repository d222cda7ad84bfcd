"""The one checkpoint validator (gptq_plugin.validate) and the entry points that use it: ``convert`` refuses a
damaged source and writes nothing (issue 13, item 4), ``inspect`` shows the validator's verdict and exits 2 for
checkpoints that ``load_quantized`` refuses (item 5), an int64 ``g_idx`` is named with its fix (item 8)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from gptq_plugin.checkpoint import inspect_checkpoint, load_quantized
from gptq_plugin.config import QuantizeConfig
from gptq_plugin.convert import convert_checkpoint
from gptq_plugin.errors import CheckpointError
from gptq_plugin.plugins import get_format
from gptq_plugin.safetensors_io import TensorMeta
from gptq_plugin.validate import check_layer_header, validate_checkpoint
from tests.mutations import tiny_checkpoint

L = "model.layers.0.self_attn.o_proj"  # 64 -> 64, group_size 32: 2 groups


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return tiny_checkpoint(tmp_path_factory.mktemp("validate") / "q")


def _copy(ckpt: Path, dst: Path, tensors=None, qcfg=None) -> Path:
    shutil.copytree(ckpt, dst)
    if tensors is not None:
        sd = load_file(str(dst / "model.safetensors"))
        tensors(sd)
        save_file(sd, str(dst / "model.safetensors"), metadata={"format": "pt"})
    if qcfg is not None:
        for name in ("config.json", "quantize_config.json"):
            d = json.loads((dst / name).read_text())
            (d["quantization_config"] if name == "config.json" else d).update(qcfg)
            (dst / name).write_text(json.dumps(d))
    return dst


def _set(key, fn):
    return lambda sd: sd.update({key: fn(sd[key])})


def _poke(t: torch.Tensor, i: int, value) -> torch.Tensor:
    t = t.clone()
    t.view(-1)[i] = value
    return t


DAMAGE = {  # name -> (tensor mutation, config change, a needle of the message)
    "qweight-shape": (_set(f"{L}.qweight", lambda t: t[:3].clone()), None, f"{L}.qweight has shape (3, 64)"),
    "qweight-dtype": (_set(f"{L}.qweight", lambda t: t.float()), None, f"{L}.qweight has dtype torch.float32"),
    "scales-dtype": (_set(f"{L}.scales", lambda t: t.to(torch.int16)), None, f"{L}.scales has dtype torch.int16"),
    "g_idx-out-of-range": (_set(f"{L}.g_idx", lambda t: _poke(t, 0, 99)), None, f"{L}.g_idx has values in [0, 99]"),
    "g_idx-negative": (_set(f"{L}.g_idx", lambda t: _poke(t, 5, -1)), None, f"{L}.g_idx has values in [-1,"),
    "nan-scales": (_set(f"{L}.scales", lambda t: _poke(t, 3, float("nan"))), None, f"{L}.scales contains NaN"),
    "group-size": (None, {"group_size": 64}, "group_size=64"),
    "bits": (None, {"bits": 8}, "bits=8"),
    "no-qzeros": (lambda sd: sd.pop(f"{L}.qzeros"), None, f"{L}.qzeros is missing"),
    "no-g_idx": (lambda sd: sd.pop(f"{L}.g_idx"), None, f"{L}.g_idx is missing"),
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_convert_refuses_a_damaged_source_and_writes_nothing(ckpt, tmp_path, damage):
    """Item 4: convert used to exit 0 and write a relabelled copy of the damage."""
    tensors, qcfg, needle = DAMAGE[damage]
    src = _copy(ckpt, tmp_path / "src", tensors, qcfg)
    for to in ("gptq_v2", "compressed-tensors"):
        with pytest.raises(CheckpointError) as e:
            convert_checkpoint(src, tmp_path / "dst", to)
        assert needle in str(e.value), str(e.value)
        assert not (tmp_path / "dst").exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".dst")]


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_inspect_verdict_agrees_with_load_quantized(ckpt, tmp_path, damage):
    """Item 5: inspect said `format_check: ok` for checkpoints load_quantized refuses."""
    tensors, qcfg, needle = DAMAGE[damage]
    src = _copy(ckpt, tmp_path / "src", tensors, qcfg)
    with pytest.raises(CheckpointError):
        load_quantized(src)
    info = inspect_checkpoint(src)
    assert info["format_check"].startswith("FAILED: ") and needle in info["format_check"], info["format_check"]
    assert info["problems"] and not validate_checkpoint(src).ok


def test_inspect_of_a_valid_checkpoint_is_ok(ckpt):
    info = inspect_checkpoint(ckpt)
    assert info["format_check"].startswith("ok: 14 layers valid") and info["problems"] == []
    assert {"name": L, "in_features": 64, "out_features": 64} in info["layers"]
    assert validate_checkpoint(ckpt).ok


def run_cli(*args):
    p = subprocess.run([sys.executable, "-m", "gptq_plugin.cli", *map(str, args)], capture_output=True, text=True,
                       env={**os.environ, "HF_HUB_OFFLINE": "1"})
    return p.returncode, p.stdout, p.stderr


def test_cli_inspect_shows_failed_and_exits_2(ckpt, tmp_path):
    tensors, _, needle = DAMAGE["no-qzeros"]
    src = _copy(ckpt, tmp_path / "src", tensors)
    rc, out, err = run_cli("inspect", src)
    assert rc == 2 and f"format_check: FAILED: tensor {needle}" in out, out + err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and needle in errors[0] and "Traceback" not in err, err
    rc, out, err = run_cli("inspect", src, "--json")
    assert rc == 2 and needle in json.loads(out)["problems"][0], out + err


def test_int64_g_idx_names_the_tensor_and_the_fix(ckpt, tmp_path):
    """Item 8: an int64 g_idx was refused without naming the tensor or a fix; convert is the fix."""
    src = _copy(ckpt, tmp_path / "src", _set(f"{L}.g_idx", lambda t: t.long()))
    with pytest.raises(CheckpointError, match=rf"tensor {L}\.g_idx has dtype torch\.int64, expected torch\.int32: "
                                              r".*gptq-plugin convert"):
        load_quantized(src)
    convert_checkpoint(src, tmp_path / "fixed", "gptq")
    assert load_file(str(tmp_path / "fixed" / "model.safetensors"))[f"{L}.g_idx"].dtype == torch.int32
    ref, fixed = load_quantized(ckpt), load_quantized(tmp_path / "fixed")
    ids = torch.arange(10).unsqueeze(0)
    assert torch.equal(ref(ids).logits, fixed(ids).logits)


def test_convert_still_converts_a_valid_checkpoint(ckpt, tmp_path):
    rep = convert_checkpoint(ckpt, tmp_path / "ct", "compressed-tensors")
    assert rep.n_layers == 14 and validate_checkpoint(tmp_path / "ct").ok


# --- the header level, as vLLM's front end uses it ----------------------------------------------------------
def _meta(k=64, n=96, bits=4, gs=32, dtype="I32", g_dtype="I32"):
    g = -(-k // gs)
    return {"qweight": TensorMeta([k * bits // 32, n], dtype), "qzeros": TensorMeta([g, n * bits // 32], "I32"),
            "scales": TensorMeta([g, n], "F16"), "g_idx": TensorMeta([k], g_dtype)}


@pytest.mark.parametrize("meta, cfg, needle", [
    (_meta(), dict(bits=4, group_size=32), None),
    (_meta(), dict(bits=8, group_size=32), "x.qweight has shape [8, 96], expected [16, 96]"),
    (_meta(), dict(bits=4, group_size=64), "x.scales has shape [2, 96], expected [1, 96]"),
    (_meta(dtype="F32"), dict(bits=4, group_size=32), "x.qweight has dtype F32, expected I32"),
    (_meta(g_dtype="I64"), dict(bits=4, group_size=32), "x.g_idx has dtype I64, expected I32: rewrite"),
])
def test_header_check(meta, cfg, needle):
    handler = get_format("gptq")
    if needle is None:
        assert check_layer_header(handler, QuantizeConfig(**cfg), "x", meta) == (64, 96)
        return
    with pytest.raises(CheckpointError) as e:
        check_layer_header(handler, QuantizeConfig(**cfg), "x", meta)
    assert needle in str(e.value), str(e.value)
