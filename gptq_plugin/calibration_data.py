"""Calibration (and evaluation) text sources -> int64 token windows ``[nsamples, seqlen]``.

Protocol (``gptq_plugin/data/wikitext-2/README.md``): read the text in Python text mode (CRLF becomes LF),
tokenize it once with the model's tokenizer (no special tokens), and take consecutive non-overlapping windows of
``seqlen`` tokens from the start. A ``.jsonl`` file of records is the exception: one sample per record (see
:class:`JsonlSource`).

The default texts (WikiText-2, Merity et al. 2016) ship with the package in ``gptq_plugin/data/wikitext-2/``
(gzip, CC BY-SA 3.0 / GFDL); ``$GPTQ_PLUGIN_DATA`` points at another folder holding ``wikitext-2/``. The named
sources (``wikitext2``, ``c4``: :class:`HFDatasetSource`) are listed in :mod:`gptq_plugin._builtin`; choosing one is
:func:`gptq_plugin.calibration.load_calibration`.
"""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

import torch

from .errors import CalibrationError

ENV_DATA = "GPTQ_PLUGIN_DATA"
SHIPPED_DATA = Path(__file__).resolve().parent / "data"
CALIBRATION_NAME = "valid.tokens.txt"
EVAL_NAME = "wiki.test.raw"


def data_dir() -> Path:
    """The folder whose ``wikitext-2/`` holds the default texts: ``$GPTQ_PLUGIN_DATA`` when set, else the copy
    shipped with the package (``gptq_plugin/data``, gzip-compressed, the same text)."""
    env = os.environ.get(ENV_DATA)
    return Path(env) if env else SHIPPED_DATA


def _data_file(name: str) -> Path:
    """``data_dir()/wikitext-2/name``, or ``name.gz`` beside it.

    Raises:
        CalibrationError: ``$GPTQ_PLUGIN_DATA`` is set but holds neither.
    """
    d = data_dir() / "wikitext-2"
    for p in (d / name, d / f"{name}.gz"):
        if p.is_file():
            return p
    raise CalibrationError(f"${ENV_DATA}={os.environ.get(ENV_DATA, '')!r} has no wikitext-2/{name} (or {name}.gz): "
                           f"point it at a folder holding wikitext-2/{name}, or unset it to use the copy shipped "
                           "with gptq-plugin")


def default_calibration_file() -> Path:
    """WikiText-2 ``valid`` split, tokenized form: the default calibration text."""
    return _data_file(CALIBRATION_NAME)


def default_eval_file() -> Path:
    """WikiText-2 raw ``test`` split: the default perplexity text."""
    return _data_file(EVAL_NAME)


def check_file(path: str | Path, what: str) -> Path:
    """``path`` as a Path if it is a file.

    Raises:
        CalibrationError: ``path`` is a folder or does not exist.
    """
    path = Path(path)
    kinds = "a text file (.txt, .raw)" + (" or a .jsonl file of records" if what.startswith("calibration") else "")
    if path.is_dir():
        raise CalibrationError(f"{what} {path} is a folder: --dataset expects {kinds}")
    if not path.is_file():
        raise CalibrationError(f"{what} {path} does not exist: pass --dataset PATH to {kinds}")
    return path


def read_text(path: str | Path, what: str = "text file") -> str:
    """The UTF-8 text of ``path`` read in Python text mode (universal newlines: CRLF and CR become LF); a ``.gz``
    file is decompressed first, giving the same text as its uncompressed original.

    Raises:
        CalibrationError: a folder, a missing file, not UTF-8, or a corrupt ``.gz``.
    """
    path = check_file(path, what)
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rt", encoding="utf-8") as f:
                return f.read()
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise CalibrationError(f"{what} {path} is not UTF-8 text ({e})") from None
    except (OSError, EOFError) as e:  # gzip.BadGzipFile is an OSError
        raise CalibrationError(f"{what} {path} cannot be read ({type(e).__name__}: {e})") from None


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
    """A local UTF-8 text file (``.gz`` is decompressed): tokenized whole, cut into consecutive windows."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.name = str(self.path)

    def load(self, tokenizer, nsamples: int, seqlen: int) -> torch.Tensor:
        text = read_text(self.path, "calibration file")
        return windows(tokenize_text(text, tokenizer), seqlen, nsamples, f"calibration file {self.path}")


class JsonlSource:
    """A ``.jsonl`` file of records, the user's own workload: one calibration sample per record.

    Each non-blank line is one JSON object, either ``{"text": str}`` or a chat
    ``{"messages": [{"role": str, "content": str}, ...]}``; other keys are ignored. Chat records are rendered with
    the tokenizer's chat template (``apply_chat_template(messages, tokenize=False)``, as llm-compressor's examples
    do); every record is then tokenized without adding special tokens (the template writes its own).

    Windows are ``seqlen`` tokens (the pipeline takes one ``[n, seqlen]`` batch without attention masks), built in
    file order: a record of ``seqlen`` tokens or more is one window, truncated to its first ``seqlen`` tokens (as
    llm-compressor truncates to ``max_seq_length``); shorter records are packed, each followed by the tokenizer's
    EOS token, into a stream cut into consecutive windows (as GPTQModel's ``calibration_dataset_concat_size``
    does), so a record may continue into the next window and the stream's last partial window is dropped. 128-256
    records is the recommended size (``--nsamples`` windows are taken; reading stops once they are full).

    Raises (from :meth:`load`):
        CalibrationError: a line that is not a JSON object, a record without a non-empty string ``text`` or a
            ``messages`` list of ``{"role": str, "content": str}``, an empty file (naming the file and line);
            chat records with a tokenizer that has no chat template; fewer tokens than one window.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.name = str(self.path)

    def records(self) -> list[tuple[int, dict]]:
        """``(line number, record)`` of every non-blank line, all validated (1-based line numbers)."""
        text = read_text(self.path, "calibration file")
        out = []
        for n, line in enumerate(text.split("\n"), 1):
            if line.strip():
                out.append((n, self._check(n, line)))
        if not out:
            raise CalibrationError(f"calibration file {self.path} has no records: write one JSON object per line, "
                                   '{"text": "..."} or {"messages": [{"role": "user", "content": "..."}, ...]}')
        return out

    def _check(self, n: int, line: str) -> dict:
        where = f"calibration file {self.path} line {n}"
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise CalibrationError(f"{where} is not JSON ({e.msg} at column {e.colno}): write one JSON object per "
                                   "line") from None
        if not isinstance(rec, dict):
            raise CalibrationError(f"{where} is a JSON {type(rec).__name__}, not an object: write "
                                   '{"text": "..."} or {"messages": [...]}')
        if ("text" in rec) == ("messages" in rec):
            both = 'both "text" and' if "text" in rec else 'neither "text" nor'
            raise CalibrationError(f'{where} has {both} "messages": give exactly one of them, {{"text": "..."}} or '
                                   '{"messages": [{"role": "user", "content": "..."}, ...]}')
        if "text" in rec:
            if not isinstance(rec["text"], str) or not rec["text"]:
                raise CalibrationError(f"{where}: \"text\" is {_describe(rec['text'])}: use a non-empty string")
            return rec
        msgs = rec["messages"]
        if not isinstance(msgs, list) or not msgs:
            raise CalibrationError(f"{where}: \"messages\" is {_describe(msgs)}: use a non-empty list of "
                                   '{"role": ..., "content": ...} objects')
        for i, m in enumerate(msgs):
            if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
                raise CalibrationError(f"{where}: messages[{i}] is {_describe(m)}: each message must be "
                                       '{"role": "<string>", "content": "<string>"}')
        return rec

    def _render(self, tokenizer, n: int, rec: dict) -> str:
        if "text" in rec:
            return rec["text"]
        if not getattr(tokenizer, "chat_template", None):
            raise CalibrationError(f"calibration file {self.path} line {n} is a chat record, but the model's "
                                   "tokenizer has no chat template: use {\"text\": ...} records, or a tokenizer "
                                   "with a chat_template")
        try:
            return tokenizer.apply_chat_template(rec["messages"], tokenize=False)
        except Exception as e:  # a template may reject a conversation (roles out of order, ...)
            raise CalibrationError(f"calibration file {self.path} line {n}: the chat template rejected the "
                                   f"messages ({type(e).__name__}: {e})") from None

    def load(self, tokenizer, nsamples: int, seqlen: int) -> torch.Tensor:
        """Up to ``nsamples`` windows, int64 ``[n, seqlen]`` (see the class docstring for the packing rule)."""
        records = self.records()
        eos = [tokenizer.eos_token_id] if getattr(tokenizer, "eos_token_id", None) is not None else []
        out: list[list[int]] = []
        stream: list[int] = []
        for start in range(0, len(records), 64):  # tokenize in chunks; stop once nsamples windows are full
            chunk = records[start:start + 64]
            texts = [self._render(tokenizer, n, rec) for n, rec in chunk]
            for ids in tokenizer(texts, add_special_tokens=False, return_attention_mask=False)["input_ids"]:
                if len(ids) >= seqlen:
                    out.append(list(ids[:seqlen]))
                else:
                    stream += list(ids) + eos
                    while len(stream) >= seqlen:
                        out.append(stream[:seqlen])
                        stream = stream[seqlen:]
            if len(out) >= nsamples:
                break
        if not out:
            n_tok = len(stream)
            raise CalibrationError(f"calibration file {self.path}: its {len(records)} records hold {n_tok} tokens, "
                                   f"fewer than one window of seqlen={seqlen}: add records or use a smaller --seqlen")
        return torch.tensor(out[:nsamples], dtype=torch.long)


def _describe(v) -> str:
    """``v`` for an error message: its JSON type and a short repr."""
    r = repr(v)
    return f"{type(v).__name__} {r if len(r) <= 40 else r[:37] + '...'}"


def file_source(path: str | Path):
    """The source for a local file: :class:`JsonlSource` for ``.jsonl`` (also ``.jsonl.gz``), else
    :class:`FileSource` (plain text)."""
    name = Path(path).name.lower()
    if name.endswith(".jsonl") or name.endswith(".jsonl.gz"):
        return JsonlSource(path)
    return FileSource(path)


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
