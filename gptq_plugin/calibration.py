"""Calibration data for a run: a file, a registered source, a list of strings or the shipped default ->
int64 token windows ``[nsamples, seqlen]`` (the sources and the windowing protocol:
:mod:`gptq_plugin.calibration_data`)."""

from __future__ import annotations

from pathlib import Path

import torch

from .calibration_data import FileSource, default_calibration_file, file_source, tokenize_text, windows
from .errors import CalibrationError
from .plugins import calibration_sources


def load_calibration(dataset: str | Path | list[str] | None, tokenizer, nsamples: int = 128, seqlen: int = 512
                     ) -> torch.Tensor:
    """Calibration token windows, int64 ``[<= nsamples, seqlen]``.

    Args:
        dataset: a path to a text file (tokenized whole, cut into consecutive windows; ``.gz`` is decompressed);
            a path to a ``.jsonl`` file of ``{"text": ...}`` or ``{"messages": [...]}`` records (one sample per
            record, see :class:`gptq_plugin.calibration_data.JsonlSource`); a registered source name
            (``"wikitext2"``, ``"c4"`` or one from a plugin); a list of strings (joined with blank lines); or None
            for the WikiText-2 validation text shipped with the package
            (``$GPTQ_PLUGIN_DATA/wikitext-2/valid.tokens.txt`` when that is set).
        tokenizer: a Hugging Face tokenizer of the model.

    Raises:
        CalibrationError: no such file or source, a folder, a bad ``.jsonl`` record, or fewer tokens than one
            window.
    """
    if nsamples < 1 or seqlen < 1:
        raise CalibrationError(f"nsamples={nsamples}, seqlen={seqlen}: both must be >= 1")
    if isinstance(dataset, (list, tuple)):
        if not dataset or not all(isinstance(t, str) for t in dataset):
            raise CalibrationError("a calibration dataset given as a list must be a non-empty list of strings")
        return windows(tokenize_text("\n\n".join(dataset), tokenizer), seqlen, nsamples, "the calibration texts")
    if dataset is None:
        return FileSource(default_calibration_file()).load(tokenizer, nsamples, seqlen)
    sources = calibration_sources()
    if str(dataset) in sources and not Path(dataset).exists():
        return sources[str(dataset)].load(tokenizer, nsamples, seqlen)
    if Path(dataset).exists():
        return file_source(dataset).load(tokenizer, nsamples, seqlen)
    raise CalibrationError(f"--dataset {dataset!r} is neither a file nor a known source "
                           f"({', '.join(sources)}): pass a path to a text file (.txt, .raw) or a .jsonl file")
