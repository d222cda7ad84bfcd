"""Read and write GPTQ checkpoints: sharded safetensors + ``config.json["quantization_config"]`` +
``quantize_config.json`` + tokenizer and generation files.

Per quantized linear ``L`` (the AutoGPTQ/GPTQModel layout read by vLLM, TGI and Transformers):
``L.qweight`` int32 ``[ceil(in*bits/32), out]``, ``L.qzeros`` int32 ``[G, ceil(out*bits/32)]``, ``L.scales``
fp16 ``[G, out]``, ``L.g_idx`` int32 ``[in]``, ``L.bias`` fp16 ``[out]`` if any.

Outputs are written to a temporary sibling folder and renamed into place only when complete; the source
model is never written to (:mod:`gptq_plugin.safetensors_io`). Reading a folder as stored is
:mod:`gptq_plugin.reader`; checking it, :mod:`gptq_plugin.validate`.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path

import torch
from torch import nn

from .config import QuantizeConfig
from .errors import CheckpointError, ConfigError, GPTQPluginError
from .linear import QuantLinear
from .memory import memory_split
from .moe import checkpoint_names
from .plugins import detect_format, get_format
from .reader import open_checkpoint, read_quantization_config
from .safetensors_io import (MAX_SHARD_BYTES, LazyFolder, TensorMeta, atomic_output_dir, check_output_dir,
                             checkpoint_files, write_shards)
from .validate import validate_checkpoint, validate_layer

log = logging.getLogger(__name__)

QUANT_SUFFIXES = ("qweight", "qzeros", "scales", "g_idx")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "chat_template.jinja", "added_tokens.json", "generation_config.json")


# --- writing ---------------------------------------------------------------------------------------------
def checkpoint_dtype(source_dir: str | Path | None = None, config=None) -> torch.dtype:
    """The dtype of a checkpoint's unquantized tensors (embeddings, norms, ``lm_head``, biases of unquantized
    layers) and of its config.json ``dtype``: ``torch.bfloat16`` when the source model is bf16, else
    ``torch.float16``. GPTQ ``scales`` (and the biases of quantized layers) are fp16 whatever this says, as the
    GPTQ format defines them.

    The source's dtype is its config.json ``dtype`` (or the older ``torch_dtype``): read from ``source_dir`` when
    given, else from ``config`` (a ``PretrainedConfig`` or its dict). Decision: bf16 is kept, as GPTQModel and
    llm-compressor keep the source's dtype, because a bf16 model run in fp16 risks overflow (Gemma) and vLLM warns
    for every weight whose dtype differs from the config's; an fp32 (or fp16, or unknown) source is written as
    fp16, this project's checkpoint convention (half the size of fp32; GPTQ kernels compute in fp16 or bf16).
    """
    name = None
    if source_dir is not None:
        try:
            d = json.loads((Path(source_dir) / "config.json").read_text())
            name = d.get("dtype") or d.get("torch_dtype")
        except (OSError, ValueError, AttributeError):
            name = None
    if name is None and config is not None:
        get = config.get if isinstance(config, dict) else lambda k: getattr(config, k, None)
        name = get("dtype") or get("torch_dtype")
    return torch.bfloat16 if str(name).removeprefix("torch.") == "bfloat16" else torch.float16


def quantized_state_dict(model: nn.Module, cfg: QuantizeConfig, dtype: torch.dtype | None = None
                         ) -> dict[str, torch.Tensor]:
    """The checkpoint tensors of a model whose quantized layers are :class:`QuantLinear`: their GPTQ tensors
    (``qzeros`` in ``cfg.checkpoint_format``; ``scales`` and their biases fp16), every other floating tensor
    cast to ``dtype`` (None: :func:`checkpoint_dtype` of ``model.config``, bf16 for a bf16 model, else fp16);
    tied ``lm_head.weight`` dropped when the config ties it."""
    if dtype is None:
        dtype = checkpoint_dtype(config=getattr(model, "config", None))
    fmt = get_format(cfg.checkpoint_format)
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

    The unquantized tensors and config.json's ``dtype`` are bf16 when the source (``source_dir``'s config.json,
    else ``model.config``) is bf16, else fp16 (:func:`checkpoint_dtype`); GPTQ scales are fp16.

    Returns:
        ``out_dir`` as a resolved path.

    Raises:
        OutputError: ``out_dir`` exists (without ``overwrite``), equals, lies inside or contains ``source_dir``;
            or it cannot be written (no space left, read-only, no permission): nothing partial is left.
    """
    check_output_dir(out_dir, overwrite, source_dir)
    dtype = checkpoint_dtype(source_dir, model.config)
    state = quantized_state_dict(model, cfg, dtype)
    names = checkpoint_names(model, state)  # e.g. Mixtral's experts under block_sparse_moe, as its checkpoints
    state = {names[k]: v for k, v in state.items()}
    qcfg = cfg.to_dict()
    if extra_meta:
        qcfg["meta"].update(checkpoint_meta_names(model, extra_meta))
    with atomic_output_dir(out_dir, overwrite, source_dir) as tmp:
        write_shards(state, tmp, max_shard_bytes)
        write_model_files(tmp, model.config.to_dict(), qcfg, tokenizer, source_dir, dtype)
    return Path(out_dir).resolve()


def checkpoint_meta_names(model: nn.Module, meta: dict) -> dict:
    """``meta`` (a run's :meth:`~gptq_plugin.blockquant.QuantizeReport.checkpoint_meta`) with the module names in its
    ``fallbacks``, ``notes``, ``experts`` and ``unquantized`` entries as the checkpoint stores them
    (:func:`gptq_plugin.moe.checkpoint_names`)."""
    keyed = ("fallbacks", "notes", "experts")
    names = [n for k in keyed for n in meta.get(k) or {}] + list(meta.get("unquantized") or [])
    if not names:
        return meta
    ren = {k[:-len(".x")]: v[:-len(".x")] for k, v in checkpoint_names(model, [n + ".x" for n in names]).items()}
    out = dict(meta)
    for k in keyed:
        if meta.get(k):
            out[k] = {ren.get(n, n): v for n, v in meta[k].items()}
    if meta.get("unquantized"):
        out["unquantized"] = [ren.get(n, n) for n in meta["unquantized"]]
    return out


def write_model_files(folder: Path, config: dict, qcfg: dict, tokenizer=None, source_dir: str | Path | None = None,
                      dtype: torch.dtype | None = None) -> None:
    """Write everything of a checkpoint but its weights into ``folder``: ``config.json`` (the model's ``config``
    dict with ``quantization_config`` = ``qcfg`` and ``dtype``, None: :func:`checkpoint_dtype` of ``source_dir``
    and ``config``), ``quantize_config.json``, and the tokenizer (saved from ``tokenizer``, else its files and
    ``generation_config.json`` copied from ``source_dir``)."""
    if dtype is None:
        dtype = checkpoint_dtype(source_dir, config)
    name = str(dtype).removeprefix("torch.")
    config = dict(config, quantization_config=qcfg, torch_dtype=name, dtype=name)
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
    (:func:`gptq_plugin.reader.open_checkpoint`). GPTQ checkpoints whose zero points contradict their declared
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
    model_names = _model_names(model)  # checkpoint key -> the model's (per-expert layers of fused MoE experts)
    state = {model_names.get(k, k): v for k, v in ck.state.items()}
    layer_of = {p: model_names.get(p + ".weight", p + ".weight")[:-len(".weight")] for p in prefixes}
    replace_with_quant_linear(model, list(layer_of.values()), cfg)
    for p in prefixes:
        for k in ck.format.layer_keys(p, ck.state):
            state.pop(model_names.get(k, k), None)
        module = model.get_submodule(layer_of[p])
        try:  # the one validator: leaves, shapes and dtypes against the config and the model, g_idx, scales
            tensors = validate_layer(ck.format, cfg, p, ck.layer_tensors(p), module.in_features, module.out_features)
        except CheckpointError as e:
            raise CheckpointError(f"{path}: {e}") from None
        state.update({f"{layer_of[p]}.{leaf}": v for leaf, v in tensors.items()})
    prefixes = list(layer_of.values())
    expected = set(model.state_dict().keys())
    tied = getattr(hf_config, "tie_word_embeddings", False)
    missing = sorted(k for k in expected - set(state) if not (tied and k == "lm_head.weight"))
    unexpected = sorted(set(state) - expected)
    stored_as = {m: d for d, m in model_names.items()}  # the names the file uses, in the errors
    if missing:
        name = stored_as.get(missing[0], missing[0])
        base = name[:-len(".weight")] if name.endswith(".weight") else None
        if base and any(f"{base}.{leaf}" in ck.state for leaf in ("scales", "qzeros", "g_idx")):
            name = f"{base}.qweight"  # the layer's other GPTQ tensors are there: its codes are what is missing
        raise CheckpointError(f"{path}: tensor {name} is missing ({len(missing)} missing in all): "
                              "the checkpoint is incomplete or for another architecture")
    if unexpected:
        raise CheckpointError(f"{path}: unexpected tensor {stored_as.get(unexpected[0], unexpected[0])} "
                              f"({len(unexpected)} in all): the checkpoint does not match its config.json")
    for k, v in list(state.items()):
        prefix, _, leaf = k.rpartition(".")
        if prefix not in prefixes and v.is_floating_point():
            state[k] = v.to(dtype)
    model_sd = model.state_dict()
    for k, v in state.items():
        ref = model_sd[k]
        if tuple(v.shape) != tuple(ref.shape):
            raise CheckpointError(f"{path}: tensor {stored_as.get(k, k)} has shape {tuple(v.shape)}, expected {tuple(ref.shape)} for "
                                  f"bits={cfg.bits}, group_size={cfg.group_size}: the checkpoint does not match its config")
        if ref.is_floating_point() != v.is_floating_point():
            raise CheckpointError(f"{path}: tensor {stored_as.get(k, k)} has dtype {v.dtype}, expected a "
                                  f"{'floating-point' if ref.is_floating_point() else 'integer'} tensor: corrupt checkpoint")
    ck.check_zero_points()
    model.load_state_dict(state, strict=False, assign=True)
    if tied:
        model.tie_weights()
    leftover = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if leftover:
        raise CheckpointError(f"{path}: no value for {leftover[0]}: the checkpoint is incomplete")
    model.eval()
    return model.to(device)


def structure_problems(path: Path, shapes: dict[str, tuple[list[int], str]], prefixes: list[str],
                       cfg: QuantizeConfig, features: dict[str, tuple[int, int]] | None = None,
                       limit: int = 5) -> list[str]:
    """What :func:`load_quantized` would refuse about a checkpoint whose quantized layers are valid, from the tensor
    headers alone (``shapes``: name -> (shape, dtype)): the model of its config.json (built on ``meta``) needs a
    tensor the checkpoint lacks (e.g. a whole expert, a router), a quantized layer names no linear layer, an
    unquantized tensor has another shape, a quantized layer's ``features`` (prefix -> (in, out), as stored) differ
    from the model's, or a tensor is unexpected. At most ``limit`` messages, by the checkpoint's names."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        hf_config = AutoConfig.from_pretrained(path)
        if hasattr(hf_config, "quantization_config"):
            delattr(hf_config, "quantization_config")
        with init_empty_weights(include_buffers=False):
            model = AutoModelForCausalLM.from_config(hf_config)
    except Exception as e:  # noqa: BLE001 - Transformers raises many types for a bad config
        return [f"config.json cannot be read by Transformers ({type(e).__name__}: {e})"]
    model_names = _model_names(model)
    stored_as = {m: d for d, m in model_names.items()}
    layer_of = {p: model_names.get(p + ".weight", p + ".weight")[:-len(".weight")] for p in prefixes}
    try:
        replace_with_quant_linear(model, list(layer_of.values()), cfg)
    except CheckpointError as e:
        return [str(e)]
    quantized = set(layer_of.values())
    expected = {k: list(v.shape) for k, v in model.state_dict().items() if k.rpartition(".")[0] not in quantized}
    owned = {f"{p}." for p in prefixes}
    have = {model_names.get(k, k): k for k in shapes if not any(k.startswith(o) for o in owned)}
    tied = bool(getattr(hf_config, "tie_word_embeddings", False))
    problems = []
    for p, (in_f, out_f) in (features or {}).items():
        mod = model.get_submodule(layer_of[p])
        if (in_f, out_f) != (mod.in_features, mod.out_features):
            problems.append(f"{p} stores {in_f} -> {out_f} features, its config.json gives {mod.in_features} -> "
                            f"{mod.out_features}: the checkpoint does not match its config.json")
    for k, shape in expected.items():
        if k not in have:
            if not (tied and k == "lm_head.weight"):
                name = stored_as.get(k, k)
                base = name[:-len(".weight")] if name.endswith(".weight") else None
                if base and any(f"{base}.{leaf}" in shapes for leaf in ("scales", "qzeros", "g_idx")):
                    name = f"{base}.qweight"  # the layer's other GPTQ tensors are there
                problems.append(f"tensor {name} is missing: the checkpoint is incomplete or for another "
                                "architecture (load_quantized refuses it)")
        elif list(shapes[have[k]][0]) != shape:
            problems.append(f"tensor {have[k]} has shape {list(shapes[have[k]][0])}, its config.json gives {shape}")
    problems += [f"unexpected tensor {have[k]}: the checkpoint does not match its config.json" for k in sorted(have)
                 if k not in expected]
    return problems[:limit]


def _model_names(model: nn.Module) -> dict[str, str]:
    """Split ``model``'s fused MoE experts into per-expert linear layers (its layout's ``split_experts``)
    and map its checkpoint keys to its state-dict keys (the inverse of :func:`gptq_plugin.moe.checkpoint_names`)."""
    from .plugins import find_layout, split_experts

    try:
        blocks, _ = find_layout(model).blocks(model)
    except GPTQPluginError:
        return {}
    if not split_experts(model, blocks):
        return {}
    return {disk: k for k, disk in checkpoint_names(model, model.state_dict()).items()}


def inspect_checkpoint(path: str | Path, check: bool = True) -> dict:
    """Summary of a checkpoint: detected format, config, quantized layers, size on disk, compression ratio vs fp16,
    ``memory``: the checkpoint's tensor bytes against the 16-bit original's, split into quantized linears and what
    stays 16-bit (:func:`gptq_plugin.memory.memory_split`), and (``check``) the verdict of :func:`gptq_plugin.validate.validate_checkpoint`: ``format_check`` is one line,
    ``"ok: ..."``, ``"MISLABELLED? ..."`` (a statistical v1/v2 doubt) or ``"FAILED: <first problem>"``, and
    ``problems`` lists every failing layer's message (empty when the checkpoint is valid).

    Raises:
        CheckpointError: no such folder, not a checkpoint of a known format, or a corrupt file.
    """
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such checkpoint folder" + (" (it is a file)" if path.exists() else ""))
    qcfg, source = read_quantization_config(path)
    fmt = detect_format(qcfg, str(source))
    cfg = fmt.parse_config(qcfg)
    files = checkpoint_files(path)
    disk = sum(f.stat().st_size for f in files)
    reader = LazyFolder(files)  # safetensors only: checkpoint_files refuses pickle-only folders here
    shapes: dict[str, tuple[list[int], str]] = {k: (m.shape, m.dtype) for k, m in reader.headers.items()}
    tensor = reader.tensor

    prefixes = fmt.layer_prefixes(shapes)
    owned = {k for p in prefixes for k in fmt.layer_keys(p, shapes)}
    layers = []
    fp16_equiv = 0
    for p in prefixes:
        meta = {k.rpartition(".")[2]: TensorMeta(shapes[k][0], shapes[k][1]) for k in fmt.layer_keys(p, shapes)}
        if "weight_shape" in meta and meta["weight_shape"].shape == [2]:  # compressed-tensors: [out, in]
            meta["weight_shape"].value = tensor(f"{p}.weight_shape").tolist()
        try:
            in_f, out_f = fmt.layer_features(cfg, p, meta)
        except (GPTQPluginError, NotImplementedError):  # the validator's verdict below says what is wrong
            in_f = out_f = 0
        layers.append({"name": p, "in_features": in_f, "out_features": out_f})
        fp16_equiv += in_f * out_f * 2
        if f"{p}.bias" in shapes and len(shapes[f"{p}.bias"][0]) == 1:
            fp16_equiv += shapes[f"{p}.bias"][0][0] * 2
    for k, (shape, dt) in shapes.items():
        if k not in owned and dt in ("F16", "BF16", "F32"):
            n = 1
            for s in shape:
                n *= s
            fp16_equiv += n * 2
    try:
        tied = bool(json.loads((path / "config.json").read_text()).get("tie_word_embeddings", False))
    except (OSError, ValueError, AttributeError):
        tied = False
    owned_by = {k: p for p in prefixes for k in fmt.layer_keys(p, shapes)}
    memory = memory_split(shapes, layers, owned_by, tied and "lm_head.weight" not in shapes)
    kinds = layer_kinds([l["name"] for l in layers],
                        [k for k, (shape, dt) in shapes.items() if k not in owned and len(shape) >= 2
                         and dt in ("F16", "BF16", "F32") and _IN_BLOCK.search(k)])
    check_result, problems = None, []
    if check:  # the validator's verdict: every layer's leaves, shapes, dtypes, g_idx, scales, and v1/v2 zero points
        verdict = validate_checkpoint(path, reader=reader)
        check_result, problems = verdict.summary(), list(verdict.problems)
        if not problems:  # the layers are valid: does the checkpoint hold every tensor its model needs?
            problems = structure_problems(path, shapes, prefixes, cfg,
                                          {l["name"]: (l["in_features"], l["out_features"]) for l in layers})
            if problems:
                check_result = f"FAILED: {problems[0]}"
    return {
        "path": str(path),
        "format": fmt.name,
        "format_check": check_result,
        "problems": problems,
        "bits": cfg.bits,
        "group_size": cfg.group_size,
        "desc_act": cfg.desc_act,
        "sym": cfg.sym,
        "static_groups": cfg.static_groups,
        "method": cfg.method,
        "recipe": recipe_of(cfg.meta),
        "quantizer": cfg.meta.get("source_quantizer"),
        "n_quantized_layers": len(layers),
        "size_on_disk_bytes": disk,
        "fp16_equivalent_bytes": fp16_equiv,
        "compression_ratio": (fp16_equiv / disk) if disk else None,
        "memory": memory,
        "layer_kinds": kinds,
        "layers": layers,
    }


def recipe_of(meta: dict) -> str:
    """The solver's options a checkpoint's ``quantization_config.meta`` records, in words (docs/quality.md): group-aware
    order (``act_group_aware``), MSE clipping (``mse``, the error norm), refit scales (``refit_scales``), GPTAQ
    (``gptaq.alpha``, as GPTQModel records it) and per-layer damping (``damp_auto``); ``"plain"`` when the meta
    records these options and all are off, ``"not recorded"`` when it records none of them (another quantizer's)."""
    keys = ("act_group_aware", "mse", "refit_scales", "gptaq", "damp_auto")
    if not isinstance(meta, dict) or not any(k in meta for k in keys):
        return "not recorded"
    parts = ["group-aware order"] if meta.get("act_group_aware") else []
    if meta.get("mse"):
        parts.append(f"MSE clipping {meta['mse']:g}")
    if meta.get("refit_scales"):
        parts.append("refit scales")
    gptaq = meta.get("gptaq")
    if isinstance(gptaq, dict) and gptaq.get("alpha"):
        parts.append(f"GPTAQ alpha {gptaq['alpha']:g}")
    if meta.get("damp_auto"):
        parts.append("damping per layer")
    return ", ".join(parts) or "plain"


_IN_BLOCK = re.compile(r"(^|\.)(layers|h|blocks)\.\d+\.")


def layer_kinds(quantized: list[str], kept: list[str]) -> dict:
    """Counts of a checkpoint's quantized layers by kind, from their names: ``attention`` (``attn``/``attention``),
    ``experts`` (``.experts.{e}.``; ``n_experts``: the distinct experts), ``dense_mlp`` (other ``mlp``/``ffn``/
    ``feed_forward`` layers, shared experts included), ``other``; and ``excluded``: the weight matrices inside the
    decoder blocks left in float (``kept``, e.g. MoE routers), with their names in ``excluded_names``."""
    counts = {"attention": 0, "dense_mlp": 0, "experts": 0, "other": 0}
    experts = set()
    for n in quantized:
        m = re.search(r"^(.*\.experts\.\d+)\.", n)
        if m:
            counts["experts"] += 1
            experts.add(m.group(1))
        elif re.search(r"attn|attention", n):
            counts["attention"] += 1
        elif re.search(r"mlp|ffn|feed_forward|shared_expert", n):
            counts["dense_mlp"] += 1
        else:
            counts["other"] += 1
    return dict(counts, n_experts=len(experts), excluded=len(kept), excluded_names=sorted(kept))
