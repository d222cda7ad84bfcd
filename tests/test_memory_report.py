"""Issue 17, items 2 and 5: the memory table of `inspect` against the files' bytes, and the PNG that
`quantize --report` draws (GPTQ vs RTN per layer). Tiny random Llama models only: a few seconds."""

from __future__ import annotations

import json
import struct
import sys
from pathlib import Path

import pytest
from torch import nn

from gptq_plugin.checkpoint import inspect_checkpoint
from gptq_plugin.memory import DTYPE_BYTES
from gptq_plugin.report_plot import DPI, FIGSIZE

from .mutations import tiny_checkpoint
from .test_reliability_cli import _calib_text, _save_tiny, cli
from .tiny import tiny_llama


def _headers(files: list[Path]) -> tuple[dict[str, tuple[str, int, int]], int]:
    """Every tensor's (dtype, numel, data bytes) read from the safetensors headers, and the headers' bytes."""
    tensors, header_bytes = {}, 0
    for f in files:
        raw = f.read_bytes()
        n = struct.unpack("<Q", raw[:8])[0]
        header_bytes += 8 + n
        for k, v in json.loads(raw[8:8 + n]).items():
            if k == "__metadata__":
                continue
            numel = 1
            for s in v["shape"]:
                numel *= s
            start, end = v["data_offsets"]
            tensors[k] = (v["dtype"], numel, end - start)
    return tensors, header_bytes


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory) -> Path:
    return tiny_checkpoint(tmp_path_factory.mktemp("mem") / "ck")


def test_memory_table_matches_the_files(tiny_ckpt):
    info = inspect_checkpoint(tiny_ckpt)
    mem = info["memory"]
    files = sorted(tiny_ckpt.glob("*.safetensors"))
    tensors, header_bytes = _headers(files)
    # the checkpoint column: the tensors' data bytes, i.e. the files' sizes less their safetensors headers
    assert mem["checkpoint_bytes"] == sum(b for _, _, b in tensors.values())
    assert mem["checkpoint_bytes"] == sum(f.stat().st_size for f in files) - header_bytes
    rows = {r["part"]: r for r in mem["rows"]}
    quant_keys = [k for k in tensors if k.rpartition(".")[0] in {l["name"] for l in info["layers"]}]
    assert rows["quantized linears"]["checkpoint_bytes"] == sum(tensors[k][2] for k in quant_keys)
    assert rows["quantized linears"]["tensors"] == len(quant_keys)
    for k in quant_keys:  # every layer's bytes are its format's tensors: 4-bit codes packed in int32, fp16 scales
        assert tensors[k][0] in ("I32", "F16")
    # the original column: 2 bytes per weight of the same model in 16 bits
    model = tiny_llama()
    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and n != "lm_head"}
    assert rows["quantized linears"]["original_16bit_bytes"] == sum(m.weight.numel() * 2 for m in linears.values())
    others = {k: v for k, v in model.state_dict().items() if k.rpartition(".")[0] not in linears}
    assert mem["original_16bit_bytes"] - rows["quantized linears"]["original_16bit_bytes"] == \
        sum(v.numel() * 2 for v in others.values())
    assert rows["embeddings + lm_head"]["original_16bit_bytes"] == 2 * 128 * 64 * 2  # untied: both stored
    assert rows["norms"]["tensors"] == 2 * 2 + 1
    unquant = [r for r in mem["rows"] if r["part"] != "quantized linears"]
    for r in unquant:  # the unquantized tensors are stored in 16 bits: same bytes as the original's
        assert r["checkpoint_bytes"] == r["original_16bit_bytes"]
    assert mem["original_16bit_bytes"] == info["fp16_equivalent_bytes"]
    assert mem["saving_percent"] == pytest.approx(100 * (1 - mem["checkpoint_bytes"] / mem["original_16bit_bytes"]))
    share = sum(r["original_16bit_bytes"] for r in unquant) / mem["original_16bit_bytes"]
    assert mem["stays_16bit_share_percent"] == pytest.approx(100 * share)
    assert not mem["tied_embeddings"]
    assert DTYPE_BYTES[tensors["model.embed_tokens.weight"][0]] * tensors["model.embed_tokens.weight"][1] == \
        tensors["model.embed_tokens.weight"][2]


def test_inspect_prints_the_memory_table(tiny_ckpt, capsys):
    rc, out, err = cli(capsys, "inspect", tiny_ckpt)
    assert rc in (0, None), err
    assert "quantized linears" in out and "embeddings + lm_head" in out and "% of the original stays 16-bit" in out
    rc, out, err = cli(capsys, "inspect", tiny_ckpt, "--json")
    info = json.loads(out)
    assert info["memory"]["checkpoint_bytes"] > 0 and info["compression_ratio"] > 1


def _png_size(path: Path) -> tuple[int, int]:
    raw = path.read_bytes()
    assert raw[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    assert raw[12:16] == b"IHDR"
    return struct.unpack(">II", raw[16:24])


@pytest.fixture(scope="module")
def tiny_src(tmp_path_factory) -> Path:
    return _save_tiny(tmp_path_factory.mktemp("tiny") / "model")


def test_quantize_report_writes_a_png(tiny_src, tmp_path, capsys):
    pytest.importorskip("matplotlib", reason="the report's plot needs matplotlib (the report extra)")
    data = _calib_text(tmp_path / "calib.txt")
    report = tmp_path / "rep.json"
    rc, out, err = cli(capsys, "quantize", tiny_src, tmp_path / "q", "--group-size", "32", "--dataset", data,
                       "--nsamples", "4", "--seqlen", "32", "--report", report)
    assert rc in (0, None), err
    png = tmp_path / "rep.png"
    assert json.loads(report.read_text())["layers"]
    assert f"per-layer error plot (GPTQ vs RTN): {png}" in out
    assert _png_size(png) == (int(FIGSIZE[0] * DPI), int(FIGSIZE[1] * DPI))


def test_report_without_matplotlib_warns_once(tiny_src, tmp_path, capsys, monkeypatch):
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` raises ImportError
    data = _calib_text(tmp_path / "calib.txt")
    report = tmp_path / "rep.json"
    rc, out, err = cli(capsys, "quantize", tiny_src, tmp_path / "q", "--group-size", "32", "--dataset", data,
                       "--nsamples", "4", "--seqlen", "32", "--report", report)
    assert rc in (0, None), err
    assert json.loads(report.read_text())["layers"] and not (tmp_path / "rep.png").exists()
    warnings = [l for l in err.splitlines() if "matplotlib" in l]
    assert len(warnings) == 1 and "pip install 'gptq-plugin[report]'" in warnings[0], err
