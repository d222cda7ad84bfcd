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
from .format_gptq import GPTQv1Format, GPTQv2Format  # noqa: F401  (re-exported, older import path)
from .formats import builtin_formats  # noqa: F401

log = logging.getLogger(__name__)

QUANT_SUFFIXES = ("qweight", "qzeros", "scales", "g_idx")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "chat_template.jinja", "added_tokens.json", "generation_config.json")
MAX_SHARD_BYTES = 2 * 1024**3


# --- checkpoint formats (zero-point conventions): gptq_plugin.formats, through the hook -----------------------
def _format(name: str):
    from .formats import get_format

    return get_format(name)


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


def write_shards(state: dict[str, torch.Tensor], folder: Path, max_bytes: int = MAX_SHARD_BYTES) -> list[str]:
    """Write ``state`` as ``model.safetensors``, or as numbered shards of at most ``max_bytes`` plus
    ``model.safetensors.index.json``; return the weight file names."""
    from safetensors.torch import save_file

    shards = _shard(state, max_bytes)
    if len(shards) == 1:
        save_file(shards[0], str(folder / "model.safetensors"), metadata={"format": "pt"})
        return ["model.safetensors"]
    names, weight_map, total = [], {}, 0
    for i, shard in enumerate(shards, 1):
        fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        names.append(fname)
        save_file(shard, str(folder / fname), metadata={"format": "pt"})
        for k, v in shard.items():
            weight_map[k] = fname
            total += v.numel() * v.element_size()
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2, sort_keys=True))
    return names


def quantized_state_dict(model: nn.Module, cfg: QuantizeConfig, dtype: torch.dtype = torch.float16
                         ) -> dict[str, torch.Tensor]:
    """The checkpoint tensors of a model whose quantized layers are :class:`QuantLinear`: their GPTQ tensors
    (``qzeros`` in ``cfg.checkpoint_format``), every other floating tensor cast to ``dtype``; tied
    ``lm_head.weight`` dropped when the config ties it."""
    fmt = _format(cfg.checkpoint_format)
    qnames = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    state = {}
    layers: dict[str, dict[str, torch.Tensor]] = {n: {} for n in qnames}
    for k, v in model.state_dict().items():
        prefix, _, leaf = k.rpartition(".")
        if prefix in qnames:
            if qnames[prefix].bits != cfg.bits:
                raise ConfigError(f"layer {prefix} holds {qnames[prefix].bits}-bit codes but the config says "
                                  f"bits={cfg.bits}: save it with the config it was quantized with")
            if leaf in ("scales", "bias"):
                v = v.to(torch.float16)
            layers[prefix][leaf] = v.detach().contiguous().cpu()
            continue
        if v.is_floating_point():
            v = v.to(dtype)
        state[k] = v.detach().contiguous().cpu()
    cfg = fmt.prepare(cfg, layers)
    for prefix, tensors in layers.items():
        for leaf, v in fmt.from_internal(tensors, cfg, prefix).items():
            state[f"{prefix}.{leaf}"] = v.contiguous()
    if getattr(getattr(model, "config", None), "tie_word_embeddings", False):
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
    check_output_dir(out_dir, overwrite, source_dir)
    state = quantized_state_dict(model, cfg)
    qcfg = cfg.to_dict()
    if extra_meta:
        qcfg["meta"].update(extra_meta)
    with atomic_output_dir(out_dir, overwrite, source_dir) as tmp:
        write_shards(state, tmp, max_shard_bytes)
        write_model_files(tmp, model.config.to_dict(), qcfg, tokenizer, source_dir)
    return Path(out_dir).resolve()


def write_model_files(folder: Path, config: dict, qcfg: dict, tokenizer=None, source_dir: str | Path | None = None
                      ) -> None:
    """Write everything of a checkpoint but its weights into ``folder``: ``config.json`` (the model's ``config``
    dict with ``quantization_config`` = ``qcfg`` and dtype float16), ``quantize_config.json``, and the tokenizer
    (saved from ``tokenizer``, else its files and ``generation_config.json`` copied from ``source_dir``)."""
    config = dict(config, quantization_config=qcfg, torch_dtype="float16", dtype="float16")
    config.pop("_name_or_path", None)
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    (folder / "quantize_config.json").write_text(json.dumps(qcfg, indent=2, sort_keys=True) + "\n")
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    if source_dir is not None:
        for name in TOKENIZER_FILES:
            src = Path(source_dir) / name
            if src.is_file() and not (folder / name).exists():
                shutil.copyfile(src, folder / name)


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

    Reads every registered checkpoint format, detected from the config: "gptq" (v1), "gptq_v2" and
    "compressed-tensors" (``pack-quantized``), converted to the v1 layout in memory
    (:func:`gptq_plugin.formats.open_checkpoint`). GPTQ checkpoints whose zero points contradict their declared
    v1/v2 convention are refused (symmetric: conclusive) or reported (asymmetric: statistical), see
    :func:`gptq_plugin.format_gptq.check_zero_points`.

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

    from .formats import open_checkpoint

    path = Path(path)
    ck = open_checkpoint(path, allow_pickle)
    cfg = ck.config
    try:
        hf_config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except Exception as e:
        raise CheckpointError(f"{path}/config.json cannot be read by Transformers ({type(e).__name__}: {e})") from None
    if hasattr(hf_config, "quantization_config"):
        delattr(hf_config, "quantization_config")
    prefixes = ck.layers
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(hf_config, dtype=dtype, trust_remote_code=trust_remote_code)
    replace_with_quant_linear(model, prefixes, cfg)
    state = {k: v for k, v in ck.state.items()}
    for p in prefixes:
        for k in ck.format.layer_keys(p, ck.state):
            del state[k]
        try:
            tensors = ck.layer(p)
        except CheckpointError as e:
            raise CheckpointError(f"{path}: {e}") from None
        state.update({f"{p}.{leaf}": v for leaf, v in tensors.items()})
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
        if ref.is_floating_point() != v.is_floating_point():
            raise CheckpointError(f"{path}: tensor {k} has dtype {v.dtype}, expected a "
                                  f"{'floating-point' if ref.is_floating_point() else 'integer'} tensor: corrupt checkpoint")
    ck.check_zero_points()
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


def inspect_checkpoint(path: str | Path, check: bool = True) -> dict:
    """Summary of a checkpoint: detected format, config, quantized layers, size on disk, compression ratio vs fp16,
    and (``check``) the zero-point check of :func:`gptq_plugin.format_gptq.diagnose_zero_points` for GPTQ formats.

    Raises:
        CheckpointError: not a checkpoint of a known format, or a corrupt file.
    """
    from safetensors import safe_open

    from .format_gptq import diagnose_zero_points
    from .formats import detect_format, read_quantization_config

    path = Path(path)
    qcfg, source = read_quantization_config(path)
    fmt = detect_format(qcfg, str(source))
    cfg = fmt.parse_config(qcfg)
    files = checkpoint_files(path)
    disk = sum(f.stat().st_size for f in files)
    shapes: dict[str, tuple[list[int], str, Path]] = {}
    for f in files:
        try:
            with safe_open(str(f), "pt") as h:
                for k in h.keys():
                    sl = h.get_slice(k)
                    shapes[k] = (list(sl.get_shape()), sl.get_dtype(), f)
        except Exception as e:
            raise CheckpointError(f"{f}: corrupt or truncated safetensors file ({e})") from None

    def tensor(k: str) -> torch.Tensor:
        with safe_open(str(shapes[k][2]), "pt") as h:
            return h.get_tensor(k)

    prefixes = fmt.layer_prefixes(shapes)
    owned = {k for p in prefixes for k in fmt.layer_keys(p, shapes)}
    layers = []
    fp16_equiv = 0
    for p in prefixes:
        if f"{p}.weight_shape" in shapes:  # compressed-tensors
            out_f, in_f = (int(v) for v in tensor(f"{p}.weight_shape").tolist())
        else:
            rows, out_f = shapes[f"{p}.{fmt.marker}"][0]
            g = shapes.get(f"{p}.g_idx")
            in_f = g[0][0] if g else rows * 32 // cfg.bits
        layers.append({"name": p, "in_features": in_f, "out_features": out_f})
        fp16_equiv += in_f * out_f * 2
        if f"{p}.bias" in shapes:
            fp16_equiv += shapes[f"{p}.bias"][0][0] * 2
    for k, (shape, dt, _) in shapes.items():
        if k not in owned and dt in ("F16", "BF16", "F32"):
            n = 1
            for s in shape:
                n *= s
            fp16_equiv += n * 2
    check_result = None
    if check and fmt.name in ("gptq", "gptq_v2"):
        def layer_tensors():
            for p in prefixes:
                yield p, {leaf: tensor(f"{p}.{leaf}") for leaf in QUANT_SUFFIXES if f"{p}.{leaf}" in shapes}

        d = diagnose_zero_points(layer_tensors(), cfg.bits, cfg.sym, fmt.name)
        if d.mislabelled:
            check_result = f"MISLABELLED? looks like {d.likely!r} ({'conclusive' if d.exact else 'statistical'}): {d.evidence}"
        elif d.likely == fmt.name or d.exact:
            check_result = f"ok: zero points fit {fmt.name!r}"
        else:
            check_result = "inconclusive (zero points fit either convention)"
    return {
        "path": str(path),
        "format": fmt.name,
        "format_check": check_result,
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
