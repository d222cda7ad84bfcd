"""Resumable quantization (gptq_plugin.resume): kill -9 in the middle of a run, rerun the same command, get the
same bytes as an uninterrupted run; a changed config is refused until --restart."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.integration
N_BLOCKS = 8


@pytest.fixture(scope="module")
def small_model(demo_model_dir, tmp_path_factory) -> Path:
    """The demo model cut to its first N_BLOCKS decoder blocks, as a model folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path_factory.mktemp("src") / "smollm2-8"
    m = AutoModelForCausalLM.from_pretrained(demo_model_dir, dtype=torch.float32)
    m.model.layers = m.model.layers[:N_BLOCKS]
    m.config.num_hidden_layers = N_BLOCKS
    m.save_pretrained(out)
    AutoTokenizer.from_pretrained(demo_model_dir).save_pretrained(out)
    return out


def _cmd(src: Path, out: Path, data_dir: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "gptq_plugin.cli", "quantize", str(src), str(out), "--nsamples", "8", "--seqlen",
            "128", "--batch-size", "2", "--group-size", "64", "--act-order", "--mse", "0", "--threads", "1",
            "--dataset", str(data_dir / "wikitext-2" / "valid.tokens.txt"), *extra]


def _env() -> dict:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def _digests(folder: Path) -> dict[str, str]:
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(folder.iterdir())}


def _done(partial: Path) -> int:
    try:
        return json.loads((partial / "manifest.json").read_text())["done"]
    except (OSError, ValueError, KeyError):
        return 0


def _kill_after(cmd: list[str], partial: Path, blocks: int) -> int:
    """Start ``cmd``, SIGKILL it as soon as its resume state records ``blocks`` finished blocks; return how many
    the state records after the kill."""
    p = subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 600
    while _done(partial) < blocks and p.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    p.send_signal(signal.SIGKILL)
    p.wait()
    return _done(partial)


@pytest.mark.parametrize("driver", ["--in-memory", "--streaming"])
def test_kill_9_then_resume_is_byte_identical(small_model, data_dir, tmp_path, driver):
    from gptq_plugin.resume import state_dir

    whole = tmp_path / "whole"
    subprocess.run(_cmd(small_model, whole, data_dir, driver), env=_env(), check=True, capture_output=True)
    assert not state_dir(whole).exists(), "the resume state must be removed once the checkpoint is complete"

    out = tmp_path / "killed"
    partial = state_dir(out)
    done = _kill_after(_cmd(small_model, out, data_dir, driver), partial, 2)
    assert not out.exists(), "the run finished before it could be killed: nothing was tested"
    assert 2 <= done < N_BLOCKS

    r = subprocess.run(_cmd(small_model, out, data_dir, driver, "--verbose"), env=_env(), capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"resuming from {partial}: {done} blocks already quantized" in r.stderr
    assert _digests(out) == _digests(whole)
    assert not partial.exists()


def test_changed_config_is_refused_until_restart(small_model, data_dir, tmp_path):
    from gptq_plugin.resume import state_dir

    out = tmp_path / "q"
    partial = state_dir(out)
    assert _kill_after(_cmd(small_model, out, data_dir), partial, 1) >= 1 and not out.exists()

    r = subprocess.run(_cmd(small_model, out, data_dir, "--bits", "3"), env=_env(), capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stderr.startswith("error: ") and "different config" in r.stderr and "--restart" in r.stderr
    assert not out.exists()

    r = subprocess.run(_cmd(small_model, out, data_dir, "--bits", "3", "--restart"), env=_env(), capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads((out / "config.json").read_text())["quantization_config"]["bits"] == 3
    assert not partial.exists()


def test_state_of_an_older_layout_is_refused_before_any_block(tmp_path):
    """A partial run written by a version whose state files differ (layout 1: no ``state_layout`` in the manifest,
    ``shard-NNNNN`` block files) is refused at once, not resumed and redone block by block until a file is missing."""
    import json

    from gptq_plugin.errors import ConfigError
    from gptq_plugin.resume import MANIFEST, STATE_LAYOUT, ResumeState, state_dir

    out = tmp_path / "q"
    fp = {"config": {"bits": 4}, "driver": "streaming", "state_layout": STATE_LAYOUT}
    state = ResumeState.open(out, fp)
    state.folder.joinpath(MANIFEST).write_text(json.dumps({"fingerprint": {k: v for k, v in fp.items()
                                                                           if k != "state_layout"},
                                                           "done": 2, "reports": [[], []]}))
    with pytest.raises(ConfigError, match="another gptq-plugin version.*--restart"):
        ResumeState.open(out, fp)
    assert ResumeState.open(out, fp, restart=True).done == 0 and state_dir(out).is_dir()


def test_files_parked_by_a_killed_run_are_removed_on_resume(tmp_path):
    """A run killed while batches waited leaves their parked activations (and offloaded Hessians) in the state
    folder: resuming removes them, and keeps the state's own files."""
    from gptq_plugin.resume import STATE_LAYOUT, ResumeState

    out = tmp_path / "q"
    fp = {"config": {"bits": 4}, "driver": "in-memory", "state_layout": STATE_LAYOUT}
    folder = ResumeState.open(out, fp).folder
    stale = [folder / "paused-activation-abc.bin", folder / "hessian-def.bin"]
    for f in stale:
        f.write_bytes(b"x" * 10)
    kept = sorted(p.name for p in folder.iterdir() if p not in stale)
    ResumeState.open(out, fp)
    assert sorted(p.name for p in folder.iterdir()) == kept and kept
