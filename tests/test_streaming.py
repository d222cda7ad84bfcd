"""The streaming driver (gptq_plugin.streaming) on small synthetic Llama models: the same tensors as the in-memory
driver, at most one decoder block materialised at a time, activations offloaded to disk, resumable, and clear
errors for broken sources (nothing written)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from gptq_plugin import driver, streaming
from gptq_plugin.checkpoint import load_quantized, save_quantized
from gptq_plugin.safetensors_io import checkpoint_files, read_tensors
from gptq_plugin.config import QuantizeConfig
from gptq_plugin.errors import CheckpointError
from gptq_plugin.pipeline import quantize_model
from gptq_plugin.resume import ActivationBuffer, ResumeState, fingerprint
from gptq_plugin.streaming import quantize_streaming
from gptq_plugin.tools.synthetic import write_synthetic_llama

LAYERS = 3
CALIB = torch.randint(0, 128, (6, 16), generator=torch.Generator().manual_seed(0))
CFG = QuantizeConfig(bits=4, group_size=32, desc_act=True, static_groups=False, sym=False)


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    """A 3-block synthetic Llama (hidden 64) in 3 safetensors shards of ~100 kB."""
    return write_synthetic_llama(tmp_path_factory.mktemp("synth") / "src", hidden=64, layers=LAYERS,
                                 intermediate=96, heads=4, kv_heads=2, vocab=128, shard_bytes=100_000)


def _in_memory(source: Path, out: Path, cfg: QuantizeConfig) -> Path:
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    quantize_model(m, CALIB if cfg.method == "gptq" else None, cfg, batch_size=2, progress=False, low_memory=True)
    return save_quantized(m, cfg, out, source_dir=source)


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    return read_tensors(checkpoint_files(path))


def _assert_same(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("cfg", [CFG, QuantizeConfig(bits=3, group_size=32, method="rtn"),
                                 QuantizeConfig(bits=4, group_size=-1, desc_act=True, static_groups=True,
                                                checkpoint_format="gptq_v2"),
                                 QuantizeConfig(bits=4, group_size=32, act_group_aware=True, refit_scales=True,
                                                gptaq=0.25)],
                         ids=["gptq-asym-act-order", "rtn-3bit", "gptq-static-v2", "gptaq"])
def test_streaming_writes_the_in_memory_drivers_tensors(source, tmp_path, cfg):
    calib = CALIB if cfg.method == "gptq" else None
    quantize_streaming(source, tmp_path / "stream", calib, cfg, batch_size=2, progress=False, activation_memory=0)
    _in_memory(source, tmp_path / "mem", cfg)
    _assert_same(_tensors(tmp_path / "stream"), _tensors(tmp_path / "mem"))
    # one shard per block + one for the embeddings/norm/lm_head, indexed; config as the in-memory writer's
    index = json.loads((tmp_path / "stream" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) == LAYERS + 1
    assert json.loads((tmp_path / "stream" / "config.json").read_text()) == \
        json.loads((tmp_path / "mem" / "config.json").read_text())
    x = torch.randint(0, 128, (1, 12))
    with torch.no_grad():
        assert torch.equal(load_quantized(tmp_path / "stream")(x).logits, load_quantized(tmp_path / "mem")(x).logits)
    assert not list(tmp_path.glob(".*")), "no temporary folder left behind"


def test_one_block_materialised_at_a_time(source, tmp_path, monkeypatch):
    """While a block is quantized, every other block's parameters and the embeddings/lm_head are on meta."""
    models: list[nn.Module] = []
    build = streaming.build_skeleton
    monkeypatch.setattr(streaming, "build_skeleton", lambda *a, **k: models.append(build(*a, **k)) or models[-1])
    seen = []
    real = driver.quantize_block

    def spy(block, block_name, *args, **kwargs):
        model = models[0]
        on_cpu = {n.rsplit(".", 1)[0] for n, p in model.named_parameters() if p.device.type != "meta"}
        seen.append((block_name, sorted(on_cpu)))
        return real(block, block_name, *args, **kwargs)

    monkeypatch.setattr(driver, "quantize_block", spy)
    quantize_streaming(source, tmp_path / "out", CALIB, CFG, batch_size=2, progress=False, activation_memory=0)
    assert [b for b, _ in seen] == [f"model.layers.{i}" for i in range(LAYERS)]
    for block_name, on_cpu in seen:
        assert on_cpu and all(n.startswith(block_name + ".") for n in on_cpu), (block_name, on_cpu)


def test_activation_buffer_generations(tmp_path):
    buf = ActivationBuffer(tmp_path, 3, max_resident_bytes=2 * 4 * 8)  # room for two of the six tensors
    for i in range(3):
        buf.put(i, torch.full((2, 4), float(i)))
    assert buf.resident_bytes == 64
    for i, x in enumerate(buf):
        buf[i] = x + 10  # the next generation; the current one still reads the old values
    assert [float(x[0, 0]) for x in buf] == [0.0, 1.0, 2.0]
    buf.advance()
    assert [float(x[0, 0]) for x in buf] == [10.0, 11.0, 12.0]
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"x-00001-0000{i}.safetensors" for i in range(3)]
    with pytest.raises(IndexError):
        buf[3]


def test_streaming_resumes_to_the_same_bytes(source, tmp_path, monkeypatch):
    fp = fingerprint(CFG, source, CALIB, 2, driver="streaming")
    quantize_streaming(source, tmp_path / "whole", CALIB, CFG, batch_size=2, progress=False,
                       resume=ResumeState.open(tmp_path / "whole", fp), activation_memory=0)
    real, calls = driver.quantize_block, []

    def crash_on_third(*args, **kwargs):
        calls.append(args[1])
        if len(calls) == 3:
            raise KeyboardInterrupt  # the process dies while block 2 is quantized
        return real(*args, **kwargs)

    monkeypatch.setattr(driver, "quantize_block", crash_on_third)
    with pytest.raises(KeyboardInterrupt):
        quantize_streaming(source, tmp_path / "out", CALIB, CFG, batch_size=2, progress=False,
                           resume=ResumeState.open(tmp_path / "out", fp), activation_memory=0)
    assert not (tmp_path / "out").exists()
    state = ResumeState.open(tmp_path / "out", fp)
    assert state.done == 2
    stale = state.folder / "hessian-stale.bin"
    stale.write_bytes(b"0" * 64)  # what a kill -9 during a solve leaves (up to a Hessian's size)

    def no_stale_file(*args, **kwargs):
        assert not stale.exists(), "the resumed run keeps a dead run's parked Hessian"
        return real(*args, **kwargs)

    monkeypatch.setattr(driver, "quantize_block", no_stale_file)
    calls.clear()
    quantize_streaming(source, tmp_path / "out", CALIB, CFG, batch_size=2, progress=False, resume=state,
                       activation_memory=0)
    for f in sorted((tmp_path / "whole").iterdir()):
        assert f.read_bytes() == (tmp_path / "out" / f.name).read_bytes(), f.name
    assert not state.folder.exists()


def _broken_copy(source: Path, tmp_path: Path, victim: str, mutate) -> Path:
    """A copy of ``source`` whose shard holding ``victim`` has ``mutate(tensors)`` applied."""
    from safetensors.torch import load_file, save_file

    broken = tmp_path / "broken"
    broken.mkdir()
    for f in source.iterdir():
        (broken / f.name).write_bytes(f.read_bytes())
    shard = broken / json.loads((source / "model.safetensors.index.json").read_text())["weight_map"][victim]
    tensors = load_file(str(shard))
    mutate(tensors)
    save_file(tensors, str(shard), metadata={"format": "pt"})
    return broken


def test_missing_tensor_is_named_and_nothing_written(source, tmp_path):
    victim = "model.layers.1.mlp.down_proj.weight"
    broken = _broken_copy(source, tmp_path, victim, lambda t: t.pop(victim))
    with pytest.raises(CheckpointError, match=victim.replace(".", r"\.")):
        quantize_streaming(broken, tmp_path / "out", CALIB, CFG, batch_size=2, progress=False)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))


def test_wrong_shape_is_named(source, tmp_path):
    victim = "model.layers.2.self_attn.q_proj.weight"
    broken = _broken_copy(source, tmp_path, victim, lambda t: t.update({victim: t[victim][:, :32].contiguous()}))
    with pytest.raises(CheckpointError, match=r"q_proj\.weight has shape \(64, 32\)"):
        quantize_streaming(broken, tmp_path / "out", CALIB, CFG, batch_size=2, progress=False)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))


def test_cli_streams_when_the_fp32_model_exceeds_half_the_available_memory(source, monkeypatch):
    from gptq_plugin import blockquant, models

    fp32 = 4 * sum(torch.Size(shape).numel() for shape, _ in streaming.SourceWeights(source).shapes.values())
    monkeypatch.setattr(blockquant, "available_memory", lambda: 2 * fp32 + 1024)
    assert not models.needs_streaming(source)
    monkeypatch.setattr(blockquant, "available_memory", lambda: 2 * fp32 - 1024)
    assert models.needs_streaming(source)


def test_available_memory_honours_a_cgroup_limit(monkeypatch):
    """MemAvailable is lowered to the cgroup's limit - usage + reclaimable page cache (v1 and v2 files faked)."""
    import io

    from gptq_plugin import blockquant

    files = {"/proc/meminfo": "MemTotal: 32000000 kB\nMemAvailable: 20000000 kB\n"}
    v1 = "/sys/fs/cgroup/memory/job"
    v1_files = {"/proc/self/cgroup": "4:memory:/job\n", f"{v1}/memory.limit_in_bytes": str(5 << 30),
                f"{v1}/memory.usage_in_bytes": str(3 << 30), f"{v1}/memory.stat": f"total_inactive_file {1 << 30}\n"}
    v2_files = {"/proc/self/cgroup": "0::/job\n", "/sys/fs/cgroup/job/memory.max": str(4 << 30),
                "/sys/fs/cgroup/job/memory.current": str(1 << 30)}
    for extra, expected in ((v1_files, (5 - 3 + 1) << 30), (v2_files, 3 << 30),
                            ({"/proc/self/cgroup": "0::/job\n", "/sys/fs/cgroup/job/memory.max": "max"},
                             20000000 * 1024)):
        table = {**files, **extra}

        def fake_open(path, *args, **kwargs):
            if path not in table:
                raise FileNotFoundError(path)
            return io.StringIO(table[path])

        monkeypatch.setattr(blockquant, "open", fake_open, raising=False)
        assert blockquant.available_memory() == expected
