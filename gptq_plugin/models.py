"""Model folders as the commands take them: a Hugging Face folder (original model) or a quantized checkpoint.

:func:`check_model_folder` names what is wrong with a folder before any work; :func:`load_model` loads either
kind; :func:`load_tokenizer` its tokenizer; :func:`needs_streaming` says whether an original model is too large
to quantize in memory.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from . import blockquant
from .checkpoint import load_quantized
from .errors import CheckpointError, GPTQPluginError
from .safetensors_io import checkpoint_files, read_headers
from .streaming import SourceWeights

log = logging.getLogger(__name__)


def check_model_folder(path: str | Path) -> dict:
    """The parsed config.json of the model folder ``path``.

    Raises:
        GPTQPluginError: ``path`` does not exist, is a file (e.g. a weights file) rather than a folder, has no
            config.json, or its config.json is not a JSON object (the message names the file and the JSON error).
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise GPTQPluginError(f"{path} is a file, not a model folder: pass the Hugging Face model folder that holds "
                              f"it (e.g. {path.parent}), with config.json and the weights")
    if not path.is_dir():
        raise GPTQPluginError(f"model folder {path} does not exist: pass a Hugging Face model folder "
                              "(`gptq-plugin demo-model DIR` fetches the demo model)")
    cfg = path / "config.json"
    if not cfg.is_file():
        raise GPTQPluginError(f"{path} has no config.json: not a Hugging Face model folder")
    try:
        config = json.loads(cfg.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise GPTQPluginError(f"{cfg} is not valid JSON ({e}): re-download the model or repair its config.json") from None
    if not isinstance(config, dict):
        raise GPTQPluginError(f"{cfg} holds a JSON {type(config).__name__}, not an object: re-download the model "
                              "or repair its config.json")
    return config


def is_quantized(path: str | Path) -> bool:
    """Whether the folder ``path`` holds a quantized checkpoint: a ``quantize_config.json``, or a config.json with a
    ``quantization_config``. False for a missing folder or an unreadable config.json."""
    path = Path(path)
    cfg = path / "config.json"
    if (path / "quantize_config.json").is_file():
        return True
    if cfg.is_file():
        try:
            return "quantization_config" in json.loads(cfg.read_text())
        except json.JSONDecodeError:
            return False
    return False


def load_model(path: str | Path, dtype: str = "float32", allow_pickle: bool = False) -> torch.nn.Module:
    """Load a quantized checkpoint through the plugin or an original model through Transformers.

    Args:
        path: the model folder.
        dtype: torch dtype name of the weights and compute ("float32", "bfloat16", "float16").
        allow_pickle: accept ``.bin``/``.pt`` weights.

    Raises:
        GPTQPluginError: see :func:`check_model_folder`; a checkpoint or model that cannot be loaded.
    """
    from transformers import AutoModelForCausalLM

    path = Path(path)
    check_model_folder(path)
    torch_dtype = getattr(torch, dtype)
    if is_quantized(path):
        return load_quantized(path, dtype=torch_dtype, allow_pickle=allow_pickle)
    checkpoint_files(path, allow_pickle)  # refuses pickle-only folders and hostile indexes
    try:
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype)
    except Exception as e:
        raise GPTQPluginError(f"{path}: Transformers cannot load this model ({type(e).__name__}: {e})") from None


def stored_float_dtype(path: str | Path) -> torch.dtype | None:
    """The one floating dtype every floating tensor of the model folder's safetensors weights is stored in
    (``torch.bfloat16`` for the demo model), or None when they differ, are fp8, or the folder holds no
    safetensors (read from the headers only)."""
    names = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64}
    try:
        files = [f for f in checkpoint_files(Path(path)) if f.suffix == ".safetensors"]
        kinds = {m.dtype for m in read_headers(files).values() if m.dtype.startswith(("BF", "F"))}
    except GPTQPluginError:
        return None
    return names.get(kinds.pop()) if len(kinds) == 1 else None


def load_tokenizer(path: str | Path):
    """The Transformers tokenizer of the model folder ``path``.

    Raises:
        GPTQPluginError: see :func:`check_model_folder`; the folder holds no usable tokenizer.
    """
    from transformers import AutoTokenizer

    check_model_folder(path)  # a missing folder, a file, a config.json that is not JSON: named as such
    try:
        return AutoTokenizer.from_pretrained(path)
    except Exception as e:
        raise GPTQPluginError(f"{path}: no usable tokenizer ({type(e).__name__}: {e}); copy the tokenizer files "
                              "of the model into this folder") from None


def needs_streaming(path: str | Path) -> bool:
    """Whether the weights of the original model ``path`` in fp32 take over half the available memory (then the
    streaming driver quantizes it). False when its weights cannot be sized (pickle weights or an unusual layout:
    the in-memory driver then reports what is wrong)."""
    try:
        need = SourceWeights(path).nbytes(4)
    except CheckpointError:
        return False
    avail = blockquant.available_memory()
    if avail is not None and need > avail // 2:
        log.info("%s takes %.1f GB in fp32, over half the available %.1f GB: quantizing it streaming", path,
                 need / 1e9, avail / 1e9)
        return True
    return False
