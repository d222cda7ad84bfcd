"""Read checkpoint folders: the ``quantization_config`` object, the format handler it names and the raw tensors
(:class:`RawCheckpoint`), or everything converted to the in-memory GPTQ v1 layout (:func:`read_checkpoint`).

GPTQ reads also check the zero points (:func:`gptq_plugin.format_gptq.check_zero_points`): a v2 checkpoint
labelled v1, or the reverse, is reported instead of being read as garbage. Validating every layer without
holding the folder in memory is :func:`gptq_plugin.validate.validate_checkpoint`.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from .config import QuantizeConfig
from .errors import CheckpointError, ConfigError
from .format_gptq import check_zero_points
from .formats import CheckpointFormat
from .plugins import detect_format, get_format
from .safetensors_io import checkpoint_files, read_tensors

log = logging.getLogger(__name__)


def read_quantization_config(path: str | Path) -> tuple[dict, Path]:
    """The ``quantization_config`` object of a checkpoint folder and the file it came from:
    ``config.json["quantization_config"]`` (what vLLM and Transformers read), else ``quantize_config.json``.
    Warns when both exist and disagree on the zero-point convention.

    Raises:
        CheckpointError: neither file holds one, or a file is not valid JSON.
    """
    path = Path(path)
    found: list[tuple[dict, Path]] = []
    for fname in ("config.json", "quantize_config.json"):
        f = path / fname
        if not f.is_file():
            continue
        try:
            d = json.loads(f.read_text())
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{f}: not valid JSON ({e}); re-download or re-create the checkpoint") from None
        if fname == "config.json":
            d = d.get("quantization_config") if isinstance(d, dict) else None
        if isinstance(d, dict):
            found.append((d, f))
    if not found:
        raise CheckpointError(f"{path}: no quantization_config in config.json and no quantize_config.json: not a GPTQ "
                              "checkpoint (nor a compressed-tensors one)")
    if len(found) == 2:
        conv = [str(d.get("checkpoint_format") or d.get("format") or "gptq") for d, _ in found]
        if conv[0] != conv[1] and found[0][0].get("quant_method", "gptq") == "gptq":
            log.warning("%s says checkpoint_format %r but %s says %r: using config.json (what vLLM and Transformers "
                        "read); fix the other file", found[0][1], conv[0], found[1][1], conv[1])
    return found[0]


# --- whole checkpoints ------------------------------------------------------------------------------
@dataclass
class RawCheckpoint:
    """A checkpoint folder as stored: its format handler, in-memory config and raw tensors.

    Attributes:
        path: the folder. format: the handler of its on-disk format. config: the in-memory view
            (``checkpoint_format="gptq"``). source_config: the ``quantization_config`` object as found.
        state: every tensor as stored. layers: the quantized layers' prefixes.
    """

    path: Path
    format: CheckpointFormat
    config: QuantizeConfig
    source_config: dict
    state: dict[str, torch.Tensor]
    layers: list[str]

    def layer_tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        """The stored tensors of one quantized layer, by leaf name."""
        return {k.rpartition(".")[2]: self.state[k] for k in self.format.layer_keys(prefix, self.state)}

    def layer(self, prefix: str) -> dict[str, torch.Tensor]:
        """One quantized layer in the in-memory v1 layout (see :meth:`CheckpointFormat.to_internal`)."""
        return self.format.to_internal(self.layer_tensors(prefix), self.config, prefix)

    def check_zero_points(self):
        """Run :func:`gptq_plugin.format_gptq.check_zero_points` for GPTQ formats; None for the others (no v1/v2
        ambiguity)."""
        if self.format.name not in ("gptq", "gptq_v2"):
            return None
        return check_zero_points(((p, self.layer_tensors(p)) for p in self.layers), self.config, self.format.name,
                                 f"{self.path}/config.json")

    def internal_state(self) -> dict[str, torch.Tensor]:
        """Every tensor, quantized layers converted to the in-memory v1 layout (``L.qweight``, ``L.qzeros``, ...)."""
        owned = set()
        out: dict[str, torch.Tensor] = {}
        for p in self.layers:
            owned.update(self.format.layer_keys(p, self.state))
            out.update({f"{p}.{leaf}": v for leaf, v in self.layer(p).items()})
        out.update({k: v for k, v in self.state.items() if k not in owned})
        return out


def open_checkpoint(path: str | Path, allow_pickle: bool = False, source_format: str | None = None) -> RawCheckpoint:
    """Detect the format of a checkpoint folder, parse its config and read its tensors (not converted).

    Args:
        path: the checkpoint folder.
        allow_pickle: accept ``.bin``/``.pt`` weight files.
        source_format: read as this format instead of the one the config declares (for mislabelled checkpoints).

    Raises:
        CheckpointError: unknown format, missing/corrupt files, no quantized layers.
        ConfigError: an invalid quantization config.
    """
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such checkpoint folder")
    qcfg, source = read_quantization_config(path)
    handler = get_format(source_format) if source_format else detect_format(qcfg, str(source))
    if source_format and handler.name in ("gptq", "gptq_v2"):
        qcfg = dict(qcfg, checkpoint_format=handler.name)
        qcfg.pop("format", None)
    try:
        cfg = handler.parse_config(qcfg)
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None
    state = read_tensors(checkpoint_files(path, allow_pickle))
    layers = handler.layer_prefixes(state)
    if not layers:
        status = qcfg.get("quantization_status")
        hint = f" (quantization_status={status!r}: the weights are not packed)" if status not in (None, "compressed") else ""
        raise CheckpointError(f"{path}: no *.{handler.marker} tensors{hint}: not a {handler.name} checkpoint")
    ck = RawCheckpoint(path, handler, cfg, dict(qcfg), state, layers)
    ck.config = handler.observe(cfg, ck.layer_tensors(layers[0]))
    return ck


def read_checkpoint(path: str | Path, allow_pickle: bool = False,
                    source_format: str | None = None) -> tuple[QuantizeConfig, dict[str, torch.Tensor]]:
    """Read a GPTQ v1, GPTQ v2 or compressed-tensors checkpoint into the in-memory v1 layout.

    The format is detected from the config (or forced with ``source_format``); GPTQ checkpoints get the
    zero-point check of :func:`gptq_plugin.format_gptq.check_zero_points` first.

    Returns:
        ``(config, state)``: the in-memory :class:`QuantizeConfig` (``checkpoint_format="gptq"``; ``meta`` keeps
        ``source_format``) and every tensor, quantized layers as ``L.qweight``/``L.qzeros`` (v1)/``L.scales``
        (fp16)/``L.g_idx``[/``L.bias``].

    Raises:
        CheckpointError: see :func:`open_checkpoint`, :meth:`CheckpointFormat.to_internal` and
            :func:`gptq_plugin.format_gptq.check_zero_points`.
    """
    ck = open_checkpoint(path, allow_pickle, source_format)
    ck.check_zero_points()
    return ck.config, ck.internal_state()
