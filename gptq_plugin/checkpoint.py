"""Read and write GPTQ checkpoints: sharded safetensors + ``config.json["quantization_config"]`` +
``quantize_config.json`` + tokenizer and generation files.

Per quantized linear ``L`` (the AutoGPTQ/GPTQModel layout read by vLLM, TGI and Transformers):
``L.qweight`` int32 ``[ceil(in*bits/32), out]``, ``L.qzeros`` int32 ``[G, ceil(out*bits/32)]``, ``L.scales``
fp16 ``[G, out]``, ``L.g_idx`` int32 ``[in]``, ``L.bias`` fp16 ``[out]`` if any.

Outputs are written to a temporary sibling folder and renamed into place only when complete; the source
model is never written to.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

from .config import QuantizeConfig
from .errors import CheckpointError, ConfigError, GPTQPluginError
from .linear import QuantLinear
from .packing import pack_qzeros, unpack_qzeros

log = logging.getLogger(__name__)

QUANT_SUFFIXES = ("qweight", "qzeros", "scales", "g_idx")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "chat_template.jinja", "added_tokens.json", "generation_config.json")
MAX_SHARD_BYTES = 2 * 1024**3


# --- checkpoint formats (zero-point conventions) ------------------------------------------------------------
class GPTQv1Format:
    """AutoGPTQ's "gptq" format: qzeros store ``zero - 1`` (our in-memory convention)."""

    name = "gptq"

    def to_internal(self, qzeros: torch.Tensor, bits: int, out_features: int) -> torch.Tensor:
        return qzeros

    def from_internal(self, qzeros: torch.Tensor, bits: int, out_features: int) -> torch.Tensor:
        return qzeros


class GPTQv2Format:
    """GPTQModel's "gptq_v2" format: qzeros store ``zero``."""

    name = "gptq_v2"

    def to_internal(self, qzeros: torch.Tensor, bits: int, out_features: int) -> torch.Tensor:
        return pack_qzeros(unpack_qzeros(qzeros, bits, out_features, "gptq_v2"), bits, "gptq")

    def from_internal(self, qzeros: torch.Tensor, bits: int, out_features: int) -> torch.Tensor:
        return pack_qzeros(unpack_qzeros(qzeros, bits, out_features, "gptq"), bits, "gptq_v2")


def builtin_formats() -> list:
    return [GPTQv1Format(), GPTQv2Format()]


def _format(name: str):
    from .plugins import checkpoint_formats

    formats = checkpoint_formats()
    if name not in formats:
        raise CheckpointError(f"checkpoint_format={name!r} is not supported: known formats {', '.join(formats)}")
    return formats[name]


# --- atomic output -----------------------------------------------------------------------------------------
def check_output_dir(out_dir: str | Path, overwrite: bool, source: str | Path | None = None) -> Path:
    """Validate an output folder before any work starts.

    Raises:
        GPTQPluginError: the output is the source or inside it, or exists and ``overwrite`` is False.
    """
    out = Path(out_dir).resolve()
    if source is not None:
        src = Path(source).resolve()
        if out == src or src in out.parents:
            raise GPTQPluginError(f"output {out} is inside the source model folder {src}: choose a folder outside it "
                                  "(the source model is never modified)")
    if out.exists() and not overwrite:
        raise GPTQPluginError(f"output {out} already exists: pass --overwrite to replace it, or choose another folder")
    if out.exists() and not out.is_dir():
        raise GPTQPluginError(f"output {out} exists and is not a folder: remove it or choose another path")
    return out


@contextlib.contextmanager
def atomic_output_dir(out_dir: str | Path, overwrite: bool = False, source: str | Path | None = None) -> Iterator[Path]:
    """Yield a temporary folder next to ``out_dir``; on success rename it to ``out_dir`` (replacing an
    existing one only when ``overwrite``); on any error remove it, leaving no partial output."""
    out = check_output_dir(out_dir, overwrite, source)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; the output is a normal folder
    try:
        yield tmp
        for f in tmp.iterdir():
            if f.is_file():
                os.chmod(f, 0o666 & ~umask)
        if out.exists():
            old = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.old-"))
            os.replace(out, old / "x")
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# --- writing ---------------------------------------------------------------------------------------------
def _shard(state: dict[str, torch.Tensor], max_bytes: int) -> list[dict[str, torch.Tensor]]:
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for k in sorted(state):
        n = state[k].numel() * state[k].element_size()
        if shards[-1] and size + n > max_bytes:
            shards.append({})
            size = 0
        shards[-1][k] = state[k]
        size += n
    return shards


def quantized_state_dict(model: nn.Module, cfg: QuantizeConfig, dtype: torch.dtype = torch.float16
                         ) -> dict[str, torch.Tensor]:
    """The checkpoint tensors of a model whose quantized layers are :class:`QuantLinear`: their GPTQ tensors
    (``qzeros`` in ``cfg.checkpoint_format``), every other floating tensor cast to ``dtype``; tied
    ``lm_head.weight`` dropped when the config ties it."""
    fmt = _format(cfg.checkpoint_format)
    qnames = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    state = {}
    for k, v in model.state_dict().items():
        prefix, _, leaf = k.rpartition(".")
        if prefix in qnames:
            m = qnames[prefix]
            if leaf == "qzeros":
                v = fmt.from_internal(v, m.bits, m.out_features)
            elif leaf in ("scales", "bias"):
                v = v.to(torch.float16)
        elif v.is_floating_point():
            v = v.to(dtype)
        state[k] = v.detach().contiguous().cpu()
    if getattr(model.config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)
    return state


def save_quantized(model: nn.Module, cfg: QuantizeConfig, out_dir: str | Path, tokenizer=None,
                   source_dir: str | Path | None = None, overwrite: bool = False,
                   max_shard_bytes: int = MAX_SHARD_BYTES, extra_meta: dict | None = None) -> Path:
    """Write ``model`` (quantized layers as :class:`QuantLinear`) as a standard GPTQ checkpoint, atomically.

    Args:
        model: a Hugging Face causal LM after :func:`gptq_plugin.pipeline.quantize_model`.
        cfg: its quantization config (written to config.json and quantize_config.json).
        out_dir: the checkpoint folder to create.
        tokenizer: saved into the checkpoint when given; else tokenizer/generation files are copied from
            ``source_dir``.
        overwrite: replace an existing ``out_dir``.

    Returns:
        ``out_dir`` as a resolved path.

    Raises:
        GPTQPluginError: ``out_dir`` exists (without ``overwrite``) or lies inside ``source_dir``.
    """
    from safetensors.torch import save_file

    state = quantized_state_dict(model, cfg)
    qcfg = cfg.to_dict()
    if extra_meta:
        qcfg["meta"].update(extra_meta)
    with atomic_output_dir(out_dir, overwrite, source_dir) as tmp:
        shards = _shard(state, max_shard_bytes)
        if len(shards) == 1:
            save_file(shards[0], str(tmp / "model.safetensors"), metadata={"format": "pt"})
        else:
            weight_map = {}
            total = 0
            for i, shard in enumerate(shards, 1):
                fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
                save_file(shard, str(tmp / fname), metadata={"format": "pt"})
                for k, v in shard.items():
                    weight_map[k] = fname
                    total += v.numel() * v.element_size()
            (tmp / "model.safetensors.index.json").write_text(json.dumps(
                {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2, sort_keys=True))
        config = model.config.to_dict()
        config["quantization_config"] = qcfg
        config["torch_dtype"] = "float16"
        config["dtype"] = "float16"
        config.pop("_name_or_path", None)
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        (tmp / "quantize_config.json").write_text(json.dumps(qcfg, indent=2, sort_keys=True) + "\n")
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if source_dir is not None:
            for name in TOKENIZER_FILES:
                src = Path(source_dir) / name
                if src.is_file() and not (tmp / name).exists():
                    shutil.copyfile(src, tmp / name)
    return Path(out_dir).resolve()


# --- reading ---------------------------------------------------------------------------------------------
def checkpoint_files(path: str | Path, allow_pickle: bool = False) -> list[Path]:
    """The weight files of a checkpoint folder, checked to lie inside it.

    Raises:
        CheckpointError: no weights; an index naming a file outside the folder or a missing file; only
            pickle files (``.bin``/``.pt``) and ``allow_pickle`` is False.
    """
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such checkpoint folder")
    root = path.resolve()
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index}: not a valid safetensors index ({e}); re-create the checkpoint") from None
        files = []
        for fname in sorted(set(weight_map.values())):
            f = (path / fname).resolve()
            if root not in f.parents:
                raise CheckpointError(f"{index} names {fname!r}, which lies outside the checkpoint folder: refusing "
                                      "to read it (a hostile or broken index)")
            if not f.is_file():
                raise CheckpointError(f"{index} names {fname!r}, which is missing: re-download the checkpoint")
            files.append(f)
        return files
    single = path / "model.safetensors"
    if single.is_file():
        return [single]
    st = sorted(path.glob("*.safetensors"))
    if st:
        return st
    pickles = sorted(list(path.glob("*.bin")) + list(path.glob("*.pt")))
    if pickles:
        if not allow_pickle:
            raise CheckpointError(f"{path} holds only pickle weights ({pickles[0].name}), which can run arbitrary code "
                                  "when loaded: convert them to safetensors, or pass allow_pickle=True / "
                                  "--allow-pickle if you trust the source")
        return pickles
    raise CheckpointError(f"{path}: no *.safetensors weights found")


def read_tensors(files: list[Path]) -> dict[str, torch.Tensor]:
    """Every tensor of the given files. Raises :class:`CheckpointError` naming a corrupt file."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    state: dict[str, torch.Tensor] = {}
    for f in files:
        if f.suffix in (".bin", ".pt"):
            try:
                part = torch.load(f, map_location="cpu", weights_only=True)
            except Exception as e:
                raise CheckpointError(f"{f}: cannot be read as a weights-only torch file ({type(e).__name__}: {e})") from None
        else:
            try:
                part = load_file(str(f))
            except (SafetensorError, OSError, ValueError, RuntimeError) as e:
                raise CheckpointError(f"{f}: corrupt or truncated safetensors file ({e}); re-download or re-create "
                                      "the checkpoint") from None
        state.update(part)
    return state


def quantized_prefixes(state: dict[str, torch.Tensor]) -> list[str]:
    return sorted(k[: -len(".qweight")] for k in state if k.endswith(".qweight"))


def replace_with_quant_linear(model: nn.Module, names: list[str], cfg: QuantizeConfig,
                              dtype: torch.dtype = torch.float16) -> None:
    """Replace the ``nn.Linear`` modules at ``names`` by empty :class:`QuantLinear` shells of the same shape.

    Raises:
        CheckpointError: a name is not an ``nn.Linear`` of the model.
    """
    for name in names:
        try:
            mod = model.get_submodule(name)
        except AttributeError:
            raise CheckpointError(f"checkpoint tensor {name}.qweight names no module of "
                                  f"{type(model).__name__}: the checkpoint does not match its config.json") from None
        if isinstance(mod, QuantLinear):
            continue
        if not isinstance(mod, nn.Linear):
            raise CheckpointError(f"{name} is a {type(mod).__name__}, not a linear layer: cannot hold GPTQ tensors")
        q = QuantLinear(mod.in_features, mod.out_features, cfg.bits, cfg.group_size, mod.bias is not None, cfg.sym,
                        dtype=dtype)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, q)


def load_quantized(path: str | Path, dtype: torch.dtype = torch.float32, device: str = "cpu",
                   allow_pickle: bool = False, trust_remote_code: bool = False) -> nn.Module:
    """Load a GPTQ checkpoint into a Transformers causal LM whose quantized layers are :class:`QuantLinear`.

    Reads formats "gptq" (v1) and "gptq_v2" (converted to v1 zeros in memory).

    Args:
        path: the checkpoint folder.
        dtype: dtype of the unquantized weights and of the computation (scales stay fp16).
        allow_pickle: accept ``.bin``/``.pt`` weight files.

    Raises:
        CheckpointError: missing/corrupt files, tensors whose shapes or dtypes do not match the config,
            ``g_idx`` out of range, missing or unexpected tensors.
        ConfigError: an invalid ``quantization_config``.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(path)
    cfg = QuantizeConfig.from_pretrained(path)
    fmt = _format(cfg.checkpoint_format)
    files = checkpoint_files(path, allow_pickle)
    try:
        hf_config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except Exception as e:
        raise CheckpointError(f"{path}/config.json cannot be read by Transformers ({type(e).__name__}: {e})") from None
    if hasattr(hf_config, "quantization_config"):
        delattr(hf_config, "quantization_config")
    state = read_tensors(files)
    prefixes = quantized_prefixes(state)
    if not prefixes:
        raise CheckpointError(f"{path}: no *.qweight tensors: not a GPTQ checkpoint (quantize it first)")
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(hf_config, dtype=dtype, trust_remote_code=trust_remote_code)
    replace_with_quant_linear(model, prefixes, cfg)
    for p in prefixes:
        m = model.get_submodule(p)
        for leaf in QUANT_SUFFIXES:
            if f"{p}.{leaf}" not in state:
                raise CheckpointError(f"{path}: tensor {p}.{leaf} is missing: the checkpoint is incomplete")
        state[f"{p}.qzeros"] = _to_internal_zeros(fmt, state[f"{p}.qzeros"], m, p)
    expected = set(model.state_dict().keys())
    tied = getattr(hf_config, "tie_word_embeddings", False)
    missing = sorted(k for k in expected - set(state) if not (tied and k == "lm_head.weight"))
    unexpected = sorted(set(state) - expected)
    if missing:
        raise CheckpointError(f"{path}: tensor {missing[0]} is missing ({len(missing)} missing in all): "
                              "the checkpoint is incomplete or for another architecture")
    if unexpected:
        raise CheckpointError(f"{path}: unexpected tensor {unexpected[0]} ({len(unexpected)} in all): the checkpoint "
                              "does not match its config.json")
    for k, v in list(state.items()):
        prefix, _, leaf = k.rpartition(".")
        if prefix not in prefixes and v.is_floating_point():
            state[k] = v.to(dtype)
    model_sd = model.state_dict()
    for k, v in state.items():
        ref = model_sd[k]
        if tuple(v.shape) != tuple(ref.shape):
            raise CheckpointError(f"{path}: tensor {k} has shape {tuple(v.shape)}, expected {tuple(ref.shape)} for "
                                  f"bits={cfg.bits}, group_size={cfg.group_size}: the checkpoint does not match its config")
    model.load_state_dict(state, strict=False, assign=True)
    if tied:
        model.tie_weights()
    for p in prefixes:
        model.get_submodule(p).validate(p)
    leftover = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if leftover:
        raise CheckpointError(f"{path}: no value for {leftover[0]}: the checkpoint is incomplete")
    model.eval()
    return model.to(device)


def _to_internal_zeros(fmt, qzeros: torch.Tensor, m: QuantLinear, name: str) -> torch.Tensor:
    try:
        return fmt.to_internal(qzeros, m.bits, m.out_features)
    except (ValueError, RuntimeError) as e:
        raise CheckpointError(f"tensor {name}.qzeros has shape {tuple(qzeros.shape)}, which does not fit "
                              f"bits={m.bits}, out_features={m.out_features} ({e})") from None


def inspect_checkpoint(path: str | Path) -> dict:
    """Summary of a checkpoint: config, format, quantized layers, size on disk, compression ratio vs fp16."""
    path = Path(path)
    cfg = QuantizeConfig.from_pretrained(path)
    files = checkpoint_files(path)
    from safetensors import safe_open

    layers = []
    fp16_equiv = 0
    disk = sum(f.stat().st_size for f in files)
    quant_bytes = 0
    for f in files:
        try:
            with safe_open(str(f), "pt") as h:
                keys = list(h.keys())
                shapes = {k: (h.get_slice(k).get_shape(), h.get_slice(k).get_dtype()) for k in keys}
        except Exception as e:
            raise CheckpointError(f"{f}: corrupt or truncated safetensors file ({e})") from None
        for k, (shape, dt) in shapes.items():
            n = 1
            for s in shape:
                n *= s
            if k.endswith(".qweight"):
                in_f = shape[0] * 32 // cfg.bits
                layers.append({"name": k[:-8], "in_features_packed": in_f, "out_features": shape[1]})
                fp16_equiv += in_f * shape[1] * 2
            elif not any(k.endswith("." + s) for s in QUANT_SUFFIXES) and dt in ("F16", "BF16"):
                fp16_equiv += n * 2
            elif not any(k.endswith("." + s) for s in QUANT_SUFFIXES) and dt == "F32":
                fp16_equiv += n * 2
    return {
        "path": str(path),
        "format": cfg.checkpoint_format,
        "bits": cfg.bits,
        "group_size": cfg.group_size,
        "desc_act": cfg.desc_act,
        "sym": cfg.sym,
        "static_groups": cfg.static_groups,
        "method": cfg.method,
        "quantizer": cfg.meta.get("source_quantizer"),
        "n_quantized_layers": len(layers),
        "size_on_disk_bytes": disk,
        "fp16_equivalent_bytes": fp16_equiv,
        "compression_ratio": (fp16_equiv / disk) if disk else None,
        "layers": layers,
    }
