"""The WikiText-2 copy shipped with the package: the originals' exact bytes and text, found without ``../shared``."""

from __future__ import annotations

import gzip
import hashlib
import re
from pathlib import Path

import pytest

from gptq_plugin.calibration import load_calibration
from gptq_plugin.calibration_data import ENV_DATA, SHIPPED_DATA, default_calibration_file, default_eval_file, read_text
from gptq_plugin.errors import CalibrationError

REPO = Path(__file__).resolve().parents[1]
SHA256 = {  # of the originals (../shared/data/README.md, gptq_plugin/data/wikitext-2/README.md)
    "wiki.test.raw": "4f3e427e4aff23acff917a8a51aeae21bf12832256e26914c8fc250dcef4103c",
    "valid.tokens.txt": "f0737ed31fc1329026e95cb8b98e19c2a182c39c240ab909dc31abf2f8af58e8",
}


@pytest.mark.parametrize("name", sorted(SHA256))
def test_shipped_file_is_the_original_and_reads_as_python_text_mode(name, tmp_path):
    gz = SHIPPED_DATA / "wikitext-2" / f"{name}.gz"
    raw = gzip.decompress(gz.read_bytes())
    assert hashlib.sha256(raw).hexdigest() == SHA256[name]
    assert SHA256[name] in (SHIPPED_DATA / "wikitext-2" / "README.md").read_text(encoding="utf-8")
    (tmp_path / name).write_bytes(raw)
    with open(tmp_path / name, "r", encoding="utf-8") as f:  # the protocol: Python text mode, CRLF -> LF
        assert read_text(gz) == f.read()


def test_defaults_are_the_shipped_copy_unless_the_env_overrides(monkeypatch, tmp_path, data_dir):
    monkeypatch.delenv(ENV_DATA, raising=False)
    assert default_calibration_file() == SHIPPED_DATA / "wikitext-2" / "valid.tokens.txt.gz"
    assert default_eval_file() == SHIPPED_DATA / "wikitext-2" / "wiki.test.raw.gz"
    monkeypatch.setenv(ENV_DATA, str(data_dir))
    assert default_eval_file() == data_dir / "wikitext-2" / "wiki.test.raw"
    monkeypatch.setenv(ENV_DATA, str(tmp_path))
    with pytest.raises(CalibrationError, match=r"GPTQ_PLUGIN_DATA=.* has no wikitext-2/valid\.tokens\.txt .*unset it"):
        default_calibration_file()


def test_data_dir_fixture_needs_no_shared_folder(data_dir):
    for name, sha in SHA256.items():
        assert hashlib.sha256((data_dir / "wikitext-2" / name).read_bytes()).hexdigest() == sha


def test_default_calibration_windows_equal_the_uncompressed_files(monkeypatch, data_dir):
    """The same windows from the shipped copy and from the uncompressed original (equal text gives equal windows
    for any tokenizer; a word-level one keeps this fast)."""
    from tests.test_calibration import _tokenizer

    monkeypatch.delenv(ENV_DATA, raising=False)
    tok = _tokenizer()
    shipped = load_calibration(None, tok, nsamples=64, seqlen=256)
    assert shipped.shape == (64, 256)
    assert (shipped == load_calibration(data_dir / "wikitext-2" / "valid.tokens.txt", tok, 64, 256)).all()


def test_pyproject_ships_the_data():
    tomllib = pytest.importorskip("tomllib", reason="tomllib is in the standard library from Python 3.11")
    cfg = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))
    globs = cfg["tool"]["setuptools"]["package-data"]["gptq_plugin"]
    files = sorted(p.relative_to(SHIPPED_DATA.parent).as_posix() for p in SHIPPED_DATA.rglob("*") if p.is_file())
    assert files == ["data/wikitext-2/README.md", "data/wikitext-2/valid.tokens.txt.gz",
                     "data/wikitext-2/wiki.test.raw.gz"]
    for f in files:
        assert any(re.fullmatch(g.replace(".", r"\.").replace("*", "[^/]*"), f) for g in globs), f
