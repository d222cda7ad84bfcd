"""vLLM front-end check (issue 13, item 10): a corrupt checkpoint is refused with the project's CheckpointError while
vLLM builds its config in the API server process (``VllmConfig`` -> ``maybe_update_config``), before any engine
process starts: NaN scales and an out-of-range ``g_idx`` used to pass the header check and fail in every engine
worker (~35-70 s, four tracebacks); a truncated or non-safetensors file, or an index naming a file outside the
folder, raised foreign errors. No engine is started here."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from vllm_helpers import require_vllm

require_vllm()

from safetensors.torch import load_file, save_file  # noqa: E402

from gptq_plugin.adapters import vllm as adapter  # noqa: E402
from gptq_plugin.errors import CheckpointError  # noqa: E402

L = "model.layers.0.self_attn.o_proj"


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    from tests.mutations import tiny_checkpoint

    return tiny_checkpoint(tmp_path_factory.mktemp("precheck") / "q", layers=1)


def _edit_tensor(key, fn):
    def edit(d: Path):
        sd = load_file(str(d / "model.safetensors"))
        sd[key] = fn(sd[key].clone())
        save_file(sd, str(d / "model.safetensors"), metadata={"format": "pt"})
    return edit


def _poke(i, value):
    def fn(t):
        t.view(-1)[i] = value
        return t
    return fn


def _truncate(d: Path):
    f = d / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


def _garbage(d: Path):
    (d / "model.safetensors").write_bytes(b"\xff" * 64)


def _outside(d: Path):
    os.replace(d / "model.safetensors", d.parent / "elsewhere.safetensors")
    (d / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {"model.norm.weight": "../elsewhere.safetensors"}}))


CORRUPT = {
    "nan-scales": (_edit_tensor(f"{L}.scales", _poke(3, float("nan"))), f"{L}.scales contains NaN or Inf"),
    "g_idx-out-of-range": (_edit_tensor(f"{L}.g_idx", _poke(0, 99)), f"{L}.g_idx has values in [0, 99]"),
    "g_idx-negative": (_edit_tensor(f"{L}.g_idx", _poke(0, -1)), f"{L}.g_idx has values in [-1,"),
    "int64-g_idx": (_edit_tensor(f"{L}.g_idx", lambda t: t.long()), "gptq-plugin convert"),
    "truncated": (_truncate, "corrupt or truncated safetensors file"),
    "not-safetensors": (_garbage, "corrupt or truncated safetensors file"),
    "index-outside": (_outside, "outside the checkpoint folder"),
}


@pytest.mark.parametrize("corruption", sorted(CORRUPT))
def test_front_end_refuses_a_corrupt_checkpoint(ckpt, tmp_path, corruption):
    edit, needle = CORRUPT[corruption]
    d = tmp_path / "ck"
    shutil.copytree(ckpt, d)
    edit(d)
    qcfg = json.loads((d / "config.json").read_text())["quantization_config"]
    cfg = adapter.GPTQPluginConfig.from_config(qcfg)
    with pytest.raises(CheckpointError) as e:
        cfg.maybe_update_config(str(d))
    assert needle in str(e.value), str(e.value)


def test_front_end_accepts_the_valid_checkpoint(ckpt):
    qcfg = json.loads((ckpt / "config.json").read_text())["quantization_config"]
    cfg = adapter.GPTQPluginConfig.from_config(qcfg)
    cfg.maybe_update_config(str(ckpt))
    assert len(cfg.quantized_modules) == 7 and cfg.has_g_idx


def test_vllm_config_creation_runs_the_check(ckpt, tmp_path):
    """The seam: building the engine config (what the API server does before it spawns the engine core) raises."""
    from vllm.engine.arg_utils import EngineArgs

    adapter.register()
    d = tmp_path / "ck"
    shutil.copytree(ckpt, d)
    CORRUPT["nan-scales"][0](d)
    with pytest.raises(CheckpointError, match=rf"{L}\.scales contains NaN"):
        EngineArgs(model=str(d), quantization="gptq-plugin", max_model_len=64).create_engine_config()
