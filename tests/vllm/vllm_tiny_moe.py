"""Small mixture-of-experts models with random weights (Qwen3-MoE, Mixtral), round-to-nearest quantized on the GPTQ
grid and written as GPTQ v1 checkpoints in the layout the core writes for MoE models, plus the independent float
reference (Transformers with the dequantized weights).

Checkpoint layout (Transformers' ``save_pretrained`` names, one GPTQ layer per expert projection):
``model.layers.{L}.mlp.experts.{e}.{gate_proj,up_proj,down_proj}.{qweight,qzeros,scales,g_idx}`` (Qwen3-MoE),
``model.layers.{L}.block_sparse_moe.experts.{e}.{w1,w3,w2}.{...}`` (Mixtral); attention q/k/v/o quantized too; the
router (``...mlp.gate.weight`` / ``...block_sparse_moe.gate.weight``), norms, embeddings and ``lm_head`` stay fp16.

Act-order (``desc_act=True``) is made without calibration data: the input channels of a layer are visited in a random
order and consecutive channels of that order form a group, so ``g_idx`` is an arbitrary assignment of channels to
groups, as GPTQ's act-order writes it. Layers that read the same input (q/k/v; an expert's gate/up) share the order,
as GPTQ gives them (vLLM fuses them and requires equal ``g_idx``).

Needs no download. The weights are drawn with a large ``initializer_range`` so that next-token distributions are
peaked and greedy decoding is not decided by rounding noise.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from vllm_tiny import VOCAB, make_tokenizer

ARCHS = ("qwen3_moe", "mixtral")
COMMON = dict(vocab_size=VOCAB, hidden_size=256, num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=4,
              max_position_embeddings=256, rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False,
              initializer_range=0.08, bos_token_id=0, eos_token_id=1)
N_EXPERTS, TOP_K, MOE_INTERMEDIATE = 8, 2, 128

# checkpoint names of an expert's projections: (block, gate, up, down)
_NAMES = {"qwen3_moe": ("mlp", "gate_proj", "up_proj", "down_proj"),
          "mixtral": ("block_sparse_moe", "w1", "w3", "w2")}
_EXPERT = re.compile(r"^model\.layers\.(\d+)\.(mlp|block_sparse_moe)\.experts\.(\d+)\.(\w+)$")


def build_float_model(arch: str = "qwen3_moe", seed: int = 0):
    """The random fp32 Transformers model (``Qwen3MoeForCausalLM``: 8 experts, top-2, renormalisation off, as the
    Hugging Face config's default; ``MixtralForCausalLM``: 8 experts, top-2, always renormalised).

    Raises:
        ValueError: ``arch`` is not one of :data:`ARCHS`.
    """
    from transformers import MixtralConfig, MixtralForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM

    torch.manual_seed(seed)
    if arch == "qwen3_moe":
        cfg = Qwen3MoeConfig(**COMMON, head_dim=32, num_experts=N_EXPERTS, num_experts_per_tok=TOP_K,
                             moe_intermediate_size=MOE_INTERMEDIATE, intermediate_size=4 * MOE_INTERMEDIATE,
                             norm_topk_prob=False, architectures=["Qwen3MoeForCausalLM"])
        return Qwen3MoeForCausalLM(cfg).float().eval()
    if arch == "mixtral":
        cfg = MixtralConfig(**COMMON, num_local_experts=N_EXPERTS, num_experts_per_tok=TOP_K,
                            intermediate_size=MOE_INTERMEDIATE, architectures=["MixtralForCausalLM"])
        return MixtralForCausalLM(cfg).float().eval()
    raise ValueError(f"arch={arch!r}: use one of {ARCHS}")


def quantize_linear(W: torch.Tensor, cfg, order: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """The GPTQ v1 tensors of ``W`` ``[out, in]`` (RTN on the GPTQ grid), the groups formed along ``order`` (a
    permutation of the input channels, act-order) or in input order (None)."""
    from gptq_plugin.linear import QuantLinear
    from gptq_plugin.solver import QuantResult, rtn_quantize

    if order is None:
        res = rtn_quantize(W, cfg)
    else:  # quantize the permuted columns in input order, then put every column back where it came from
        p = rtn_quantize(W[:, order], cfg)
        inv = torch.argsort(order)
        res = QuantResult(p.codes[:, inv].contiguous(), p.scales, p.zeros, p.g_idx[inv].contiguous(), p.bits,
                          p.group_size, p.sym)
    q = QuantLinear.from_result(res, cfg.group_size, None, cfg.sym)
    return {leaf: getattr(q, leaf) for leaf in ("qweight", "qzeros", "scales", "g_idx")}


def _float_linears(model, arch: str) -> list[tuple[str, torch.Tensor, str]]:
    """``(checkpoint name, weight [out, in], input id)`` of every linear the checkpoint quantizes; layers with the same
    input id read the same input (they share the act-order permutation)."""
    block, gate, up, down = _NAMES[arch]
    out = []
    for L, layer in enumerate(model.model.layers):
        attn = layer.self_attn
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            out.append((f"model.layers.{L}.self_attn.{proj}", getattr(attn, proj).weight.detach(),
                        f"{L}.{'o' if proj == 'o_proj' else 'qkv'}"))
        experts = layer.mlp.experts
        inter = experts.down_proj.shape[-1]
        for e in range(experts.gate_up_proj.shape[0]):
            gu = experts.gate_up_proj[e].detach()  # [2I, H]: gate rows, then up rows
            base = f"model.layers.{L}.{block}.experts.{e}"
            out += [(f"{base}.{gate}", gu[:inter], f"{L}.{e}.gate_up"),
                    (f"{base}.{up}", gu[inter:], f"{L}.{e}.gate_up"),
                    (f"{base}.{down}", experts.down_proj[e].detach(), f"{L}.{e}.down")]
    return out


def _unquantized(model, arch: str) -> dict[str, torch.Tensor]:
    """The tensors stored as they are (fp16), under their checkpoint names."""
    block = _NAMES[arch][0]
    state = {}
    for k, v in model.state_dict().items():
        if (".self_attn." in k and k.endswith("_proj.weight")) or ".experts." in k:
            continue
        state[k.replace(".mlp.gate.", f".{block}.gate.")] = v.detach().to(torch.float16).contiguous()
    return state


def build_moe_checkpoint(out: str | Path, arch: str = "qwen3_moe", bits: int = 4, group_size: int = 32,
                         desc_act: bool = False, sym: bool = True, seed: int = 0) -> Path:
    """Write a GPTQ v1 checkpoint of the random MoE model ``arch`` into ``out`` (see the module docstring).

    Args:
        out: the folder to create (must not exist).
        arch: "qwen3_moe" or "mixtral". bits: 2, 3, 4 or 8. group_size: -1 or a positive int.
        desc_act: act-order ``g_idx`` (a random channel order per input, shared by layers reading it).
        sym: symmetric grid. seed: weights and channel orders.

    Returns:
        ``out`` as a resolved path (config.json with ``quantization_config``, quantize_config.json,
        model.safetensors, a word-level tokenizer).
    """
    from gptq_plugin.checkpoint import write_model_files
    from gptq_plugin.config import QuantizeConfig
    from gptq_plugin.plugins import get_format
    from gptq_plugin.safetensors_io import write_shards

    out = Path(out)
    out.mkdir(parents=True)
    model = build_float_model(arch, seed)
    cfg = QuantizeConfig(bits=bits, group_size=group_size, desc_act=desc_act, sym=sym, method="rtn")
    gen = torch.Generator().manual_seed(seed + 1)
    orders: dict[str, torch.Tensor] = {}
    layers = {}
    for name, W, input_id in _float_linears(model, arch):
        order = None
        if desc_act:
            order = orders.setdefault(input_id, torch.randperm(W.shape[1], generator=gen))
        layers[name] = quantize_linear(W, cfg, order)
    fmt = get_format(cfg.checkpoint_format)
    cfg = fmt.prepare(cfg, layers)
    state = _unquantized(model, arch)
    for prefix, tensors in layers.items():
        for leaf, v in fmt.from_internal(tensors, cfg, prefix).items():
            state[f"{prefix}.{leaf}"] = v.contiguous()
    write_shards(state, out)
    write_model_files(out, model.config.to_dict(), cfg.to_dict(), make_tokenizer(), dtype=torch.float16)
    return out.resolve()


def quantize_moe_checkpoint(out: str | Path, arch: str = "qwen3_moe", bits: int = 4, group_size: int = 32,
                            desc_act: bool = False, sym: bool = True, seed: int = 0, **recipe) -> Path:
    """GPTQ-quantize the random MoE model ``arch`` with the core (:func:`gptq_plugin.pipeline.quantize_model`: every
    expert split and calibrated, on 16 random windows of 64 tokens) and save it with
    :func:`gptq_plugin.checkpoint.save_quantized`: the checkpoint a user gets from ``gptq-plugin quantize``.
    ``recipe``: further :class:`~gptq_plugin.QuantizeConfig` fields (e.g. ``static_groups``)."""
    from gptq_plugin.checkpoint import save_quantized
    from gptq_plugin.config import QuantizeConfig
    from gptq_plugin.pipeline import quantize_model

    model = build_float_model(arch, seed)
    cfg = QuantizeConfig(bits=bits, group_size=group_size, desc_act=desc_act, sym=sym, **recipe)
    calib = torch.randint(2, VOCAB, (16, 64), generator=torch.Generator().manual_seed(seed + 1))
    report = quantize_model(model, calib, cfg, batch_size=8, progress=False)
    return save_quantized(model, cfg, out, tokenizer=make_tokenizer(), extra_meta=report.checkpoint_meta())


def dequantized_reference(out: str | Path, dtype: torch.dtype = torch.float32):
    """The float Transformers model of a checkpoint written by :func:`build_moe_checkpoint` (or the core): every
    quantized layer dequantized with the reference formula (:func:`gptq_plugin.kernels.dequantize_weight`), every
    other tensor as stored; independent of vLLM and of the plugin's kernels.

    Args:
        out: the checkpoint folder. dtype: the model's dtype.

    Returns:
        ``Qwen3MoeForCausalLM`` or ``MixtralForCausalLM`` in eval mode, in ``dtype``.

    Raises:
        KeyError: a checkpoint tensor that maps to no parameter of the model.
    """
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    from gptq_plugin.checkpoint import quantized_prefixes
    from gptq_plugin.kernels import dequantize_weight
    from gptq_plugin.plugins import detect_format

    out = Path(out)
    stored = json.loads((out / "config.json").read_text())["quantization_config"]
    fmt = detect_format(stored)
    qcfg = fmt.parse_config(stored)
    config = AutoConfig.from_pretrained(out)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    state = {}
    for f in sorted(out.glob("*.safetensors")):
        state.update(load_file(str(f)))
    params = dict(model.named_parameters())
    with torch.no_grad():
        for prefix in quantized_prefixes(state):
            t = fmt.to_internal({leaf: state.pop(f"{prefix}.{leaf}") for leaf in fmt.leaves}, qcfg, prefix)
            W = dequantize_weight(t["qweight"], t["qzeros"], t["scales"], t["g_idx"], qcfg.bits,
                                  int(t["g_idx"].numel()))  # fp32 [out, in]
            m = _EXPERT.match(prefix)
            if m is None:
                params[f"{prefix}.weight"].copy_(W)
                continue
            L, block, e, proj = int(m[1]), m[2], int(m[3]), m[4]
            experts = model.model.layers[L].mlp.experts
            inter = experts.down_proj.shape[-1]
            _, gate, up, down = _NAMES["mixtral" if block == "block_sparse_moe" else "qwen3_moe"]
            if proj == gate:
                experts.gate_up_proj[e, :inter].copy_(W)
            elif proj == up:
                experts.gate_up_proj[e, inter:].copy_(W)
            elif proj == down:
                experts.down_proj[e].copy_(W)
            else:
                raise KeyError(f"{prefix}: no expert projection {proj!r} in {type(model).__name__}")
        for k, v in state.items():
            params[k.replace(".block_sparse_moe.gate.", ".mlp.gate.")].copy_(v.float())
    return model.to(dtype)
