"""Calibration data: text sources -> int64 token windows ``[nsamples, seqlen]``.

Protocol (shared/data/README.md): read the text in Python text mode, tokenize it once with the model's
tokenizer (no special tokens), and take consecutive non-overlapping windows of ``seqlen`` tokens from the
start.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from .errors import CalibrationError

ENV_DATA = "GPTQ_PLUGIN_DATA"


def data_dir() -> Path | None:
    """The shared data folder: ``$GPTQ_PLUGIN_DATA``, else ``../shared/data`` next to the source checkout or
    the current directory. None when absent."""
    env = os.environ.get(ENV_DATA)
    candidates = [Path(env)] if env else []
    here = Path(__file__).resolve().parent.parent
    candidates += [here.parent / "shared" / "data", Path.cwd().parent / "shared" / "data", Path.cwd() / "shared" / "data"]
    for c in candidates:
        if (c / "wikitext-2").is_dir():
            return c
    return None


def default_calibration_file() -> Path | None:
    d = data_dir()
    return d / "wikitext-2" / "valid.tokens.txt" if d else None


def default_eval_file() -> Path | None:
    d = data_dir()
    return d / "wikitext-2" / "wiki.test.raw" if d else None


def tokenize_text(text: str, tokenizer) -> torch.Tensor:
    """All token ids of ``text`` (no special tokens), int64 ``[n_tokens]``."""
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def windows(ids: torch.Tensor, seqlen: int, n: int | None, what: str) -> torch.Tensor:
    """The first ``n`` consecutive non-overlapping windows of ``seqlen`` tokens: int64 ``[n, seqlen]``
    (all full windows when ``n`` is None).

    Raises:
        CalibrationError: fewer tokens than one window.
    """
    total = ids.numel() // seqlen
    if total == 0:
        raise CalibrationError(f"{what} has {ids.numel()} tokens, fewer than one window of seqlen={seqlen}: "
                               "use a longer text or a smaller --seqlen")
    if n is None:
        n = total
    if n > total:
        n = total  # use what exists; callers log the shortfall
    return ids[: n * seqlen].view(n, seqlen).clone()


class FileSource:
    """A local UTF-8 text file."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.name = str(self.path)

    def load(self, tokenizer, nsamples: int, seqlen: int) -> torch.Tensor:
        if not self.path.is_file():
            raise CalibrationError(f"calibration file {self.path} does not exist: pass --dataset PATH to a text file")
        try:
            text = self.path.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise CalibrationError(f"calibration file {self.path} is not UTF-8 text ({e})") from None
        return windows(tokenize_text(text, tokenizer), seqlen, nsamples, f"calibration file {self.path}")


class HFDatasetSource:
    """A Hugging Face ``datasets`` text dataset (needs Hub access): ``wikitext2`` or ``c4``."""

    def __init__(self, name: str, path: str, config: str | None, split: str, field: str, data_files=None):
        self.name, self._args = name, (path, config, split, field, data_files)

    def load(self, tokenizer, nsamples: int, seqlen: int) -> torch.Tensor:
        path, config, split, field, data_files = self._args
        try:
            import datasets
        except ImportError:
            raise CalibrationError(f"dataset {self.name!r} needs the `datasets` package: pip install 'gptq-plugin[datasets]', "
                                   "or pass --dataset PATH to a local text file") from None
        try:
            ds = datasets.load_dataset(path, config, split=split, data_files=data_files)
        except Exception as e:
            raise CalibrationError(f"dataset {self.name!r} could not be loaded ({type(e).__name__}: {e}); "
                                   "without Hub access pass --dataset PATH to a local text file") from None
        text = "\n\n".join(t for t in ds[field] if t)
        return windows(tokenize_text(text, tokenizer), seqlen, nsamples, f"dataset {self.name}")


def builtin_sources() -> list:
    return [
        HFDatasetSource("wikitext2", "wikitext", "wikitext-2-raw-v1", "train", "text"),
        HFDatasetSource("c4", "allenai/c4", None, "train", "text",
                        data_files={"train": "en/c4-train.00000-of-01024.json.gz"}),
    ]


def load_calibration(dataset: str | Path | list[str] | None, tokenizer, nsamples: int = 128, seqlen: int = 512
                     ) -> torch.Tensor:
    """Calibration token windows, int64 ``[<= nsamples, seqlen]``.

    Args:
        dataset: a path to a text file; a registered source name (``"wikitext2"``, ``"c4"`` or one from a
            plugin); a list of strings (joined with blank lines); or None for the shared WikiText-2
            validation text (``$GPTQ_PLUGIN_DATA/wikitext-2/valid.tokens.txt``).
        tokenizer: a Hugging Face tokenizer of the model.

    Raises:
        CalibrationError: no such file or source, or fewer tokens than one window.
    """
    from .plugins import calibration_sources

    if nsamples < 1 or seqlen < 1:
        raise CalibrationError(f"nsamples={nsamples}, seqlen={seqlen}: both must be >= 1")
    if isinstance(dataset, (list, tuple)):
        if not dataset or not all(isinstance(t, str) for t in dataset):
            raise CalibrationError("a calibration dataset given as a list must be a non-empty list of strings")
        return windows(tokenize_text("\n\n".join(dataset), tokenizer), seqlen, nsamples, "the calibration texts")
    if dataset is None:
        path = default_calibration_file()
        if path is None:
            raise CalibrationError(f"no calibration data given and no shared data found (set ${ENV_DATA}): "
                                   "pass --dataset PATH to a text file, or 'wikitext2' / 'c4' with Hub access")
        return FileSource(path).load(tokenizer, nsamples, seqlen)
    sources = calibration_sources()
    if str(dataset) in sources and not Path(dataset).exists():
        return sources[str(dataset)].load(tokenizer, nsamples, seqlen)
    if Path(dataset).exists():
        return FileSource(dataset).load(tokenizer, nsamples, seqlen)
    raise CalibrationError(f"--dataset {dataset!r} is neither a file nor a known source "
                           f"({', '.join(sources)}): pass a path to a text file")
