"""Reliability of the write path and the CLI (issue 13): outputs that would delete an input, unwritable or full
output locations, SIGINT/SIGTERM during GPTQ, --dataset with RTN, messages that name the right thing, resume state
left by failed runs, and bf16 sources kept bf16. All on a tiny random Llama with a word-level tokenizer."""

from __future__ import annotations

import errno
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from gptq_plugin.cli import main
from gptq_plugin.errors import GPTQPluginError, OutputError

from .tiny import tiny_llama

RTN = ["--method", "rtn", "--group-size", "32"]


def _save_tiny(folder: Path, layers: int = 2, dtype: torch.dtype = torch.float32) -> Path:
    """tests/tiny.py's Llama (vocabulary 128) in ``dtype`` with a word-level tokenizer over ``t0 .. t127``."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(128)}, unk_token="t2"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tiny_llama(layers=layers).to(dtype).save_pretrained(folder)
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="t0", eos_token="t1", unk_token="t2").save_pretrained(folder)
    return folder


def _calib_text(path: Path, words: int = 4000) -> Path:
    rng = random.Random(0)
    path.write_text(" ".join(f"t{rng.randrange(3, 128)}" for _ in range(words)))
    return path


@pytest.fixture(scope="module")
def tiny_src(tmp_path_factory) -> Path:
    return _save_tiny(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="module")
def calib(tmp_path_factory) -> Path:
    return _calib_text(tmp_path_factory.mktemp("calib") / "calib.txt")


def cli(capsys, *args) -> tuple[int, str, str]:
    """``gptq-plugin ARGS`` in this process: (exit code, stdout, stderr)."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main([str(a) for a in args])
    out, err = capsys.readouterr()
    return e.value.code, out, err


def one_error(rc: int, err: str, *needles: str) -> str:
    assert rc == 2, err
    lines = [l for l in err.strip().splitlines() if l.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


def digests(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


# --- 1. an output must not contain, equal or lie inside an input --------------------------------------------------
@pytest.mark.parametrize("where", ["parent", "grandparent", "same", "symlink-to-parent"])
def test_quantize_output_containing_the_source_is_refused(tiny_src, tmp_path, capsys, where):
    src = tmp_path / "ow" / "src"
    src.parent.mkdir()
    shutil.copytree(tiny_src, src)
    before = digests(src)
    out = {"parent": src.parent, "grandparent": tmp_path, "same": src, "symlink-to-parent": tmp_path / "link"}[where]
    if where == "symlink-to-parent":
        out.symlink_to(src.parent, target_is_directory=True)
    rc, _, err = cli(capsys, "quantize", src, out, "--overwrite", *RTN)
    one_error(rc, err, str(src.resolve()))
    assert digests(src) == before


def test_convert_output_containing_the_source_is_refused(tiny_src, tmp_path, capsys):
    ck = tmp_path / "cv" / "a" / "ck"
    rc, _, err = cli(capsys, "quantize", tiny_src, ck, *RTN)
    assert rc == 0, err
    before = digests(ck)
    for out in (tmp_path / "cv", tmp_path / "cv" / "a", ck):
        rc, _, err = cli(capsys, "convert", ck, out, "--to", "gptq_v2", "--overwrite")
        one_error(rc, err, str(ck.resolve()))
        assert digests(ck) == before


def test_output_containing_the_calibration_file_is_refused(tiny_src, tmp_path, capsys):
    (tmp_path / "out").mkdir()
    data = _calib_text(tmp_path / "out" / "calib.txt")
    rc, _, err = cli(capsys, "quantize", tiny_src, tmp_path / "out", "--overwrite", "--dataset", data, "--nsamples",
                     "4", "--seqlen", "32")
    one_error(rc, err, "calib.txt", "contains")
    assert data.is_file()
    rc, _, err = cli(capsys, "quantize", tiny_src, tmp_path / "q", *RTN, "--report", tiny_src / "config.json")
    one_error(rc, err, "config.json")
    assert json.loads((tiny_src / "config.json").read_text())["model_type"] == "llama"


def test_python_api_refuses_output_containing_an_input(tiny_src, tmp_path):
    from gptq_plugin.checkpoint import save_quantized
    from gptq_plugin.config import QuantizeConfig
    from gptq_plugin.pipeline import quantize_model
    from gptq_plugin.streaming import quantize_streaming
    from gptq_plugin.tools.synthetic import write_synthetic_llama

    src = tmp_path / "a" / "src"
    shutil.copytree(tiny_src, src)
    before = digests(src)
    cfg = QuantizeConfig(bits=4, group_size=32, method="rtn")
    model = tiny_llama()
    quantize_model(model, None, cfg, progress=False)
    for out in (src.parent, tmp_path):
        with pytest.raises(OutputError, match="contains the source model folder"):
            save_quantized(model, cfg, out, source_dir=src, overwrite=True)
        with pytest.raises(OutputError, match="contains the source model folder"):
            quantize_streaming(src, out, None, cfg, progress=False, overwrite=True)
        with pytest.raises(OutputError, match="contains the source model folder"):
            write_synthetic_llama(out, hidden=64, layers=1, intermediate=96, heads=4, kv_heads=2, vocab=128,
                                  tokenizer_from=src, overwrite=True)
    assert digests(src) == before


def test_demo_model_never_replaces_an_existing_folder(tmp_path):
    from gptq_plugin.tools.demo import get_demo_model

    (tmp_path / "mine.txt").write_text("keep me")
    with pytest.raises(OutputError, match="is not the demo model"):
        get_demo_model(tmp_path)
    assert (tmp_path / "mine.txt").read_text() == "keep me"


# --- 3. unwritable or full output locations -----------------------------------------------------------------------
def test_output_under_proc_is_one_error(tiny_src, capsys):
    rc, _, err = cli(capsys, "quantize", tiny_src, "/proc/gptq-plugin-test-out", *RTN)
    one_error(rc, err, "/proc/", "cannot write", "choose an output folder")
    assert not Path("/proc/gptq-plugin-test-out").exists()


def _full_disk(monkeypatch, when):
    """Make safetensors' save_file fail with ENOSPC (as on a full disk) for the paths ``when(path)`` selects."""
    import safetensors.torch

    real = safetensors.torch.save_file

    def save_file(tensors, filename, metadata=None):
        if when(str(filename)):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(filename))
        return real(tensors, filename, metadata=metadata)

    monkeypatch.setattr(safetensors.torch, "save_file", save_file)


def test_disk_full_while_writing_the_checkpoint(tiny_src, tmp_path, monkeypatch, capsys):
    """The final write fails: one error naming the file and the fix, no temporary folder; the finished blocks'
    state is kept (it is what a rerun resumes from) and the message says so."""
    _full_disk(monkeypatch, lambda f: ".out.tmp-" in f)
    rc, _, err = cli(capsys, "quantize", tiny_src, tmp_path / "out", *RTN)
    line = one_error(rc, err, "No space left on device", "free space", str(tmp_path), "rerun the same command")
    assert "model.safetensors" in line
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == [".out.partial"]
    monkeypatch.undo()
    rc, _, err = cli(capsys, "quantize", tiny_src, tmp_path / "out", *RTN)
    assert rc == 0, err
    assert leftovers(tmp_path) == [] and (tmp_path / "out" / "model.safetensors").is_file()


def test_disk_full_while_writing_the_resume_state(tiny_src, tmp_path, monkeypatch, capsys):
    """The first block's state file cannot be written: one error naming it, and the state folder this run created
    (holding nothing to resume) is removed."""
    _full_disk(monkeypatch, lambda f: "block-00000" in f)
    rc, _, err = cli(capsys, "quantize", tiny_src, tmp_path / "out", *RTN)
    one_error(rc, err, ".out.partial", "block-00000", "No space left on device", "free space")
    assert leftovers(tmp_path) == [] and not (tmp_path / "out").exists()


@pytest.mark.parametrize("fault, needle", [
    (errno.ENOSPC, "No space left on device: free space"), (errno.EROFS, "Read-only file system: .*writable disk"),
    (errno.EACCES, "Permission denied: choose an output folder you can write to"),
    ("safetensors", "No space left on device: free space")], ids=["ENOSPC", "EROFS", "EACCES", "SafetensorError"])
def test_unwritable_output_python_api(tiny_src, tmp_path, monkeypatch, fault, needle):
    import safetensors.torch
    from safetensors import SafetensorError

    from gptq_plugin.checkpoint import save_quantized
    from gptq_plugin.config import QuantizeConfig
    from gptq_plugin.pipeline import quantize_model

    def save_file(tensors, filename, metadata=None):
        if fault == "safetensors":  # how safetensors reports an OS error while serializing
            raise SafetensorError(f"Error while serializing: I/O error: No space left on device (os error 28) at path "
                                  f"\"{Path(filename).parent}/.tmpKaI4Pf\"")
        raise OSError(fault, os.strerror(fault), str(filename))

    cfg = QuantizeConfig(bits=4, group_size=32, method="rtn")
    model = tiny_llama()
    quantize_model(model, None, cfg, progress=False)
    monkeypatch.setattr(safetensors.torch, "save_file", save_file)
    with pytest.raises(OutputError, match=f"cannot write .*{needle}"):
        save_quantized(model, cfg, tmp_path / "deep" / "out", source_dir=tiny_src)
    assert list(tmp_path.iterdir()) == []  # neither the temporary folder nor the parents it created


# --- 6. SIGINT / SIGTERM during GPTQ --------------------------------------------------------------------------------
def _done(partial: Path) -> int:
    try:
        return json.loads((partial / "manifest.json").read_text())["done"]
    except (OSError, ValueError, KeyError):
        return 0


@pytest.fixture(scope="module")
def deep_src(tmp_path_factory) -> Path:
    """A 24-block tiny Llama: long enough a run to be interrupted in the middle."""
    return _save_tiny(tmp_path_factory.mktemp("deep") / "model", layers=24)


def _interrupt(cmd: list[str], env: dict, partial: Path, sig: int, after: int) -> tuple[int, str]:
    """Start ``cmd``, send ``sig`` once its resume state records ``after`` finished blocks (while the one-pass
    driver's batch threads run); return (exit code, stderr)."""
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # not ignored when in background
    deadline = time.time() + 300
    while _done(partial) < after and p.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    p.send_signal(sig)
    try:
        _, err = p.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        p.kill()
        pytest.fail("the run hung after the signal")
    return p.returncode, err


def test_sigint_and_sigterm_during_one_pass_gptq_exit_cleanly_and_resume(deep_src, calib, tmp_path):
    """A signal while the one-pass driver's batch threads run: one `interrupted` line, exit 130 (SIGINT) / 143
    (SIGTERM), no "terminate called", no hang, no traceback, the finished blocks kept; the same command resumes
    (and can be interrupted again), and completes."""
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "gptq_plugin.cli", "quantize", str(deep_src), str(out), "--dataset", str(calib),
           "--nsamples", "32", "--seqlen", "32", "--batch-size", "4", "--group-size", "32", "--mse", "0", "--one-pass",
           "--threads", "1"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    partial = tmp_path / ".out.partial"
    done = 0
    for sig in (signal.SIGINT, signal.SIGTERM):
        rc, err = _interrupt(cmd, env, partial, sig, done + 1)
        assert rc == 128 + sig, err[-2000:]
        assert "terminate called" not in err and "Traceback" not in err, err[-2000:]
        lines = [l for l in err.splitlines() if l.startswith("interrupted")]
        assert len(lines) == 1 and signal.Signals(sig).name in lines[0], err[-2000:]
        assert str(partial) in lines[0] and "rerun the same command" in lines[0], lines[0]
        if done:
            assert f"{done} blocks already quantized" in err  # the second run resumed the first one's state
        done = _done(partial)
        assert 1 <= done < 24 and f"({done} blocks done)" in lines[0] and not out.exists()
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"{done} blocks already quantized" in r.stderr
    assert (out / "model.safetensors").is_file() and not partial.exists()


def test_interrupt_in_the_batch_threads_leaves_no_thread_running():
    """The one-pass driver's batch threads end before an interrupt of the calling thread propagates."""
    import threading

    from gptq_plugin.passes import sequential_pass as _sequential_pass

    model = tiny_llama(layers=1)
    block = model.model.layers[0]
    x = torch.randn(1, 8, 64)
    pos = torch.arange(8)[None]
    kw = {"position_embeddings": model.model.rotary_emb(x, pos), "attention_mask": None}
    calls = []

    def quantize_group(group, H, routed=None, halves=None):
        calls.append(group)
        if len(calls) == 2:  # Ctrl-C while the caller waits for the batch threads
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.2)  # the caller handles it while this batch thread is still busy

    old = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            _sequential_pass(block, [["self_attn.q_proj"], ["self_attn.o_proj"], ["mlp.gate_proj"], ["mlp.down_proj"]],
                             [x, x.clone()], [kw, kw], quantize_group)
    finally:
        signal.signal(signal.SIGINT, old)
    assert not [t for t in threading.enumerate() if t.name.startswith("gptq-batch-")]
    assert len(calls) == 2  # no group quantized after the interrupt


# --- 7. --method rtn and --dataset ----------------------------------------------------------------------------------
def test_rtn_with_a_missing_dataset_is_an_error(tiny_src, tmp_path, capsys):
    rc, _, err = cli(capsys, "quantize", tiny_src, tmp_path / "out", *RTN, "--dataset", tmp_path / "nope.txt")
    one_error(rc, err, "nope.txt", "drop --dataset")
    assert leftovers(tmp_path) == [] and not (tmp_path / "out").exists()


def test_rtn_with_an_existing_dataset_warns_it_is_unused(tiny_src, calib, tmp_path, capsys):
    rc, _, err = cli(capsys, "quantize", tiny_src, tmp_path / "out", *RTN, "--dataset", calib)
    assert rc == 0, err
    assert "calib.txt is not used" in err and "rtn" in err


# --- 8. messages that name the right thing --------------------------------------------------------------------------
def test_a_file_given_as_the_model(tiny_src, tmp_path, capsys):
    rc, _, err = cli(capsys, "quantize", tiny_src / "model.safetensors", tmp_path / "out")
    line = one_error(rc, err, "model.safetensors", "is a file, not a model folder")
    assert "does not exist" not in line
    rc, _, err = cli(capsys, "eval", tiny_src / "config.json")
    one_error(rc, err, "is a file, not a model folder")


def test_inspect_on_a_missing_path(tmp_path, capsys):
    rc, _, err = cli(capsys, "inspect", tmp_path / "nope")
    line = one_error(rc, err, "nope")
    assert "no such" in line or "does not exist" in line
    assert "quantization_config" not in line


def test_source_config_that_is_not_json(tiny_src, tmp_path, capsys, calib):
    src = tmp_path / "src"
    shutil.copytree(tiny_src, src)
    (src / "config.json").write_text("{not json")
    for args in (["quantize", src, tmp_path / "out", "--dataset", calib], ["eval", src]):
        rc, _, err = cli(capsys, *args)
        line = one_error(rc, err, "config.json", "not valid JSON", "line 1 column 2")
        assert "tokenizer" not in line
    assert leftovers(tmp_path) == []


# --- 9. a run that fails before its first block leaves no state -----------------------------------------------------
def test_failed_load_leaves_no_resume_state(tiny_src, tmp_path, capsys, calib):
    src = tmp_path / "src"
    shutil.copytree(tiny_src, src)
    with open(src / "model.safetensors", "r+b") as f:
        f.truncate(2000)
    rc, _, err = cli(capsys, "quantize", src, tmp_path / "out", "--dataset", calib, "--nsamples", "4", "--seqlen",
                     "32", "--group-size", "32")
    one_error(rc, err, "src")
    assert leftovers(tmp_path) == []


def test_an_earlier_runs_state_is_kept_when_a_rerun_fails(tiny_src, tmp_path, monkeypatch, capsys):
    import gptq_plugin.quantize_job

    def fail(*a, **k):
        raise GPTQPluginError("simulated failure")

    monkeypatch.setattr(gptq_plugin.quantize_job, "save_quantized", fail)  # after both blocks: state done=2
    rc, _, err = cli(capsys, "quantize", tiny_src, tmp_path / "out", *RTN)
    one_error(rc, err, "simulated failure")
    assert _done(tmp_path / ".out.partial") == 2
    monkeypatch.undo()
    monkeypatch.setattr(gptq_plugin.quantize_job, "load_model", fail)  # a rerun that fails while loading the source
    rc, _, err = cli(capsys, "quantize", tiny_src, tmp_path / "out", *RTN)
    one_error(rc, err, "simulated failure")
    assert _done(tmp_path / ".out.partial") == 2
    monkeypatch.undo()
    rc, _, err = cli(capsys, "quantize", tiny_src, tmp_path / "out", *RTN)
    assert rc == 0, err
    assert leftovers(tmp_path) == []


# --- 11. a bf16 source stays bf16 -----------------------------------------------------------------------------------
@pytest.mark.parametrize("driver", ["--in-memory", "--streaming"])
def test_bf16_source_gives_a_bf16_checkpoint(tmp_path, capsys, calib, driver):
    from safetensors.torch import load_file

    from gptq_plugin.checkpoint import load_quantized
    from gptq_plugin.safetensors_io import checkpoint_files

    src = _save_tiny(tmp_path / "src", dtype=torch.bfloat16)
    out = tmp_path / "out"
    rc, _, err = cli(capsys, "quantize", src, out, "--dataset", calib, "--nsamples", "4", "--seqlen", "32",
                     "--group-size", "32", "--mse", "0", driver)
    assert rc == 0, err
    config = json.loads((out / "config.json").read_text())
    assert config["dtype"] == "bfloat16" and config.get("torch_dtype", "bfloat16") == "bfloat16"
    state = {}
    for f in checkpoint_files(out):
        state.update(load_file(str(f)))
    for k in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight",
              "model.layers.0.input_layernorm.weight"):
        assert state[k].dtype == torch.bfloat16, k
    assert all(v.dtype == torch.float16 for k, v in state.items() if k.endswith(".scales"))
    ref = load_file(str(src / "model.safetensors"))
    assert torch.equal(state["model.embed_tokens.weight"], ref["model.embed_tokens.weight"])
    model = load_quantized(out, dtype=torch.bfloat16)
    logits = model(torch.tensor([[5, 6, 7]])).logits
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits.float()).all()


def test_fp32_source_is_still_written_as_fp16(tiny_src, tmp_path, capsys):
    from safetensors.torch import load_file

    rc, _, err = cli(capsys, "quantize", tiny_src, tmp_path / "out", *RTN)
    assert rc == 0, err
    assert json.loads((tmp_path / "out" / "config.json").read_text())["dtype"] == "float16"
    assert load_file(str(tmp_path / "out" / "model.safetensors"))["model.norm.weight"].dtype == torch.float16


@pytest.mark.parametrize("driver", ["--in-memory", "--streaming"])
def test_one_pass_parks_waiting_batches_unless_told_not_to(tiny_src, calib, tmp_path, capsys, monkeypatch, driver):
    """The CLI's one pass parks the waiting batches' inputs in the run's .OUT.partial folder, and
    --no-park-activations keeps them in memory; both write the same bytes, and no parked file is left."""
    import gptq_plugin.blockquant as bq
    import gptq_plugin.passes as passes

    monkeypatch.setattr(passes, "PARK_MIN_BYTES", 1)  # the tiny model's activations are a few KB
    seen = []
    real = bq.sequential_pass

    def spy(*a, park_dir=None, **k):
        seen.append(park_dir)
        return real(*a, park_dir=park_dir, **k)

    monkeypatch.setattr(bq, "sequential_pass", spy)
    args = ["--dataset", str(calib), "--nsamples", "8", "--seqlen", "32", "--batch-size", "2", "--group-size", "32",
            "--one-pass", driver]
    rc, _, err = cli(capsys, "quantize", str(tiny_src), str(tmp_path / "parked"), *args)
    assert rc == 0, err
    assert seen and all(p is not None and p.name == ".parked.partial" for p in seen)
    seen.clear()
    rc, _, err = cli(capsys, "quantize", str(tiny_src), str(tmp_path / "kept"), *args, "--no-park-activations")
    assert rc == 0, err
    assert seen and all(p is None for p in seen)
    assert digests(tmp_path / "parked") == digests(tmp_path / "kept")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kept", "parked"]
