"""Convert a quantized checkpoint between formats: GPTQ v1 (``gptq``), GPTQ v2 (``gptq_v2``) and
compressed-tensors ``pack-quantized`` (``compressed-tensors``), exactly.

The source is read through its format handler into the in-memory v1 layout (:mod:`gptq_plugin.reader`) and
written through the target's handler; the integer codes, zero points, scales and ``g_idx`` are carried bit for
bit, every other tensor is copied unchanged, and converting back gives identical tensors. The output folder is
written atomically (:func:`gptq_plugin.safetensors_io.atomic_output_dir`).
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .errors import CheckpointError
from .plugins import get_format
from .reader import open_checkpoint
from .safetensors_io import MAX_SHARD_BYTES, atomic_output_dir, check_output_dir, write_shards
from .validate import validate_layer

log = logging.getLogger(__name__)

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt")
SKIPPED_FILES = ("config.json", "quantize_config.json", "model.safetensors.index.json", "pytorch_model.bin.index.json")


@dataclass
class ConvertReport:
    """What :func:`convert_checkpoint` did: ``source_format`` -> ``target_format`` for ``n_layers`` layers."""

    src: str
    dst: str
    source_format: str
    target_format: str
    n_layers: int
    files: list[str] = field(default_factory=list)


def convert_checkpoint(src: str | Path, dst: str | Path, to: str, source_format: str | None = None,
                       overwrite: bool = False, allow_pickle: bool = False,
                       max_shard_bytes: int = MAX_SHARD_BYTES) -> ConvertReport:
    """Write the checkpoint ``src`` in format ``to`` at ``dst``.

    Args:
        src: a quantized checkpoint folder (GPTQ v1/v2 or compressed-tensors ``pack-quantized``).
        dst: the folder to create (atomically; never inside ``src``).
        to: "gptq", "gptq_v2" or "compressed-tensors" (or any registered format that can write).
        source_format: read ``src`` as this format instead of the one its config declares (relabelling a
            mislabelled v1/v2 checkpoint).
        overwrite: replace an existing ``dst``.
        allow_pickle: accept ``.bin``/``.pt`` weights in ``src`` (the output is always safetensors).

    Returns:
        a :class:`ConvertReport`.

    Raises:
        GPTQPluginError: ``dst`` exists (without ``overwrite``) or lies inside ``src``.
        CheckpointError: ``src`` is unreadable, of an unknown format, or mislabelled (see
            :func:`gptq_plugin.format_gptq.check_zero_points`); a layer fails :func:`gptq_plugin.validate.validate_layer`
            (missing leaves, shapes or dtypes that contradict the config, ``g_idx`` out of range, NaN/Inf scales);
            ``to`` is unknown; a layer cannot be stored in ``to``. Nothing is written then.

    An ``int64`` ``g_idx`` whose values fit is cast to int32 (logged): convert is the documented repair for it.
    """

    src, dst = Path(src), Path(dst)
    target = get_format(to)
    check_output_dir(dst, overwrite, src)
    config_path = src / "config.json"
    if not config_path.is_file():
        raise CheckpointError(f"{src} has no config.json: not a Hugging Face model folder")
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{config_path}: not valid JSON ({e}); re-download or re-create the checkpoint") from None

    ck = open_checkpoint(src, allow_pickle, source_format)
    _cast_int64_g_idx(ck)
    # the one validator, on every layer before anything is written: a damaged source is refused, never copied
    layers = {p: validate_layer(ck.format, ck.config, p, ck.layer_tensors(p)) for p in ck.layers}
    ck.check_zero_points()
    cfg = target.prepare(ck.config, layers)
    owned = {k for p in ck.layers for k in ck.format.layer_keys(p, ck.state)}
    state = {k: v.contiguous() for k, v in ck.state.items() if k not in owned}
    for p, tensors in layers.items():
        for leaf, v in target.from_internal(tensors, cfg, p).items():
            state[f"{p}.{leaf}"] = v.contiguous()
    qcfg = target.config_dict(cfg, layers, list(state))
    config["quantization_config"] = qcfg

    with atomic_output_dir(dst, overwrite, src) as tmp:
        names = write_shards(state, tmp, max_shard_bytes)
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        if target.writes_quantize_config:
            (tmp / "quantize_config.json").write_text(json.dumps(qcfg, indent=2, sort_keys=True) + "\n")
        for f in sorted(src.iterdir()):  # tokenizer, generation config, chat template, recipes, ...
            if f.is_file() and f.name not in SKIPPED_FILES and not f.name.endswith(WEIGHT_SUFFIXES):
                shutil.copyfile(f, tmp / f.name)
    log.info("converted %s (%s) -> %s (%s), %d layers", src, ck.format.name, dst, target.name, len(layers))
    return ConvertReport(str(src), str(dst.resolve()), ck.format.name, target.name, len(layers), names)


def _cast_int64_g_idx(ck) -> None:
    """Cast the int64 ``g_idx`` tensors of ``ck`` (:class:`gptq_plugin.reader.RawCheckpoint`) to int32 when every
    value is in ``[0, 2**31)`` (others are left for the validator to refuse, naming the tensor)."""
    leaf = ck.format.g_idx_leaf
    if not leaf:
        return
    for p in ck.layers:
        key = f"{p}.{leaf}"
        t = ck.state.get(key)
        if t is not None and t.dtype == torch.int64 and (not t.numel() or (int(t.min()) >= 0 and int(t.max()) < 2**31)):
            log.warning("%s is int64: cast to int32 (the format's dtype)", key)
            ck.state[key] = t.to(torch.int32)
