"""Mixture-of-experts models: every expert's projections as GPTQ layers of their own.

Transformers 5.x stores the experts of an MoE block fused, as 3-D parameters: ``experts.gate_up_proj`` ``(E, 2I, H)``
(each expert's gate rows, then its up rows) and ``experts.down_proj`` ``(E, H, I)`` (``Qwen3MoeExperts``,
``MixtralExperts`` and 46 more classes of Transformers 5.19 with the same forward). GPTQ quantizes 2-D weights, each
with the Hessian of its own inputs, so :func:`linearize_experts` replaces each such module by an
:class:`ExpertLinears`: per expert ``e`` one :class:`ExpertMLP` of three ``nn.Linear`` (views of the fused
parameters, no copy), named as the architecture's checkpoints name them (``experts.{e}.gate_proj/up_proj/down_proj``
for Qwen-MoE, ``experts.{e}.w1/w3/w2`` for Mixtral: the names Transformers' ``save_pretrained`` writes, which are the
names vLLM's and GPTQModel's MoE loaders read). llm-compressor does the same (``modeling/moe``: per-expert linears).

Calibration (``QuantizeConfig.moe_calibration``):

* ``"all"`` (default, as llm-compressor's ``moe_calibrate_all_experts``): every calibration token goes through every
  expert for the Hessians, while the block's output keeps only the routed tokens (weighted by the router), so the
  next block sees the model's real activations. Every expert gets a full-rank Hessian from the whole calibration set
  whatever the router does (with top-8 of 128 experts an expert sees 1/16 of the tokens on average and some see
  none); the cost is ``E / top_k`` times the expert compute of the calibration forwards. The gate/up layers of all
  experts share one input and so one Hessian (computed once).
* ``"routed"``: each expert's Hessians from the tokens the router sends to it (the expert's own input distribution).
  An expert that saw fewer than ``moe_min_tokens`` routed tokens is quantized with RTN (the named fallback; never a
  crash, never skipped), as GPTQModel falls back for under-activated experts.

The router (``gate``: a ``*TopKRouter`` or an ``nn.Linear`` to ``E`` logits) and a shared expert's 1-output gate
stay unquantized, as vLLM builds them (``ReplicatedLinear(..., quant_config=None)``); :func:`unquantized_weights`
lists them, and every other weight matrix of a block that is not an ``nn.Linear`` (which the driver would leave
unquantized), so the driver can refuse instead of skipping it silently.
"""

from __future__ import annotations

import inspect
import re
import threading
from typing import Iterable

import torch
from torch import nn

from .errors import ConfigError

MOE_CALIBRATION = ("all", "routed")
ROUTER = "router"  # the ``gptq_plugin_role`` of a module the driver keeps in float


def _source(fn) -> str | None:
    try:
        return re.sub(r"\s+", " ", inspect.getsource(fn))
    except (OSError, TypeError):
        return None


def _reference_forward() -> str | None:
    try:
        from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts
    except ImportError:  # pragma: no cover - Transformers < 5
        return None
    return _source(Qwen3MoeExperts.forward)


_REFERENCE: list = []
_BATCH = threading.local()  # the routed token counts of the forward running in this thread (one batch per thread)


def is_fused_experts(module: nn.Module) -> bool:
    """Whether ``module`` is a Transformers 5.x fused-experts module this file can split: 3-D ``gate_up_proj``
    ``(E, 2I, H)`` and ``down_proj`` ``(E, H, I)`` parameters, no biases, and the forward of ``Qwen3MoeExperts``
    (``forward(hidden_states, top_k_index, top_k_weights)``, ``act_fn(gate) * up``), compared by source text."""
    gu, dn = getattr(module, "gate_up_proj", None), getattr(module, "down_proj", None)
    if not (isinstance(gu, nn.Parameter) and isinstance(dn, nn.Parameter) and gu.dim() == 3 and dn.dim() == 3):
        return False
    E, two_i, H = gu.shape
    if tuple(dn.shape) != (E, H, two_i // 2) or two_i % 2 or any("bias" in n for n, _ in module.named_parameters()):
        return False
    if not _REFERENCE:
        _REFERENCE.append(_reference_forward())
    return _REFERENCE[0] is not None and _source(type(module).forward) == _REFERENCE[0]


class ExpertMLP(nn.Module):
    """One expert: ``down(act(gate(x)) * up(x))``. The three layers are registered under the checkpoint's names
    (``names``: gate, up, down, e.g. ``("w1", "w3", "w2")``); :attr:`gate`, :attr:`up` and :attr:`down` read them."""

    def __init__(self, gate: nn.Module, up: nn.Module, down: nn.Module, act_fn, names: tuple[str, str, str]):
        super().__init__()
        self.names, self.act_fn = names, act_fn
        for n, m in zip(names, (gate, up, down)):
            setattr(self, n, m)

    @property
    def gate(self) -> nn.Module:
        return getattr(self, self.names[0])

    @property
    def up(self) -> nn.Module:
        return getattr(self, self.names[1])

    @property
    def down(self) -> nn.Module:
        return getattr(self, self.names[2])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(self.act_fn(self.gate(x)) * self.up(x))


class ExpertLinears(nn.ModuleList):
    """A fused-experts module split into :class:`ExpertMLP` s (``self[e]``), with the fused module's forward
    ``(hidden_states [T, H], top_k_index [T, k] int64, top_k_weights [T, k]) -> [T, H]``.

    Attributes:
        calibration: None (inference: each expert runs on its routed tokens only, experts without tokens are not
            called), ``"all"`` or ``"routed"`` (see the module docstring: every expert is called in every forward,
            in order, so the driver's Hessian passes see the same layers in every batch).
    """

    def __init__(self, experts: list[ExpertMLP], num_experts: int):
        super().__init__(experts)
        self.num_experts = num_experts
        self.calibration: str | None = None

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
                ) -> torch.Tensor:
        out = torch.zeros_like(hidden_states)
        mode = self.calibration
        if mode is not None:  # the routed token counts of this batch, read by the Hessian hooks (routed_tokens)
            _BATCH.counts = torch.bincount(top_k_index.flatten(), minlength=self.num_experts + 1
                                           )[:self.num_experts].tolist()
        try:
            self._run(hidden_states, top_k_index, top_k_weights, out, mode)
        finally:
            _BATCH.counts = None
        return out

    def _run(self, hidden_states, top_k_index, top_k_weights, out, mode) -> None:
        for e, expert in enumerate(self):
            pos, tok = torch.where(top_k_index.t() == e)  # [k, T] order: as the fused forward sums them
            if mode is None and tok.numel() == 0:
                continue
            if mode == "all":  # every token through the expert (one shared input object), routed rows kept
                y = expert(hidden_states)[tok]
            else:
                y = expert(hidden_states[tok])
            out.index_add_(0, tok, (y * top_k_weights[tok, pos, None]).to(out.dtype))


def routed_tokens(module: nn.Module) -> list[int] | None:
    """For a layer of an :class:`ExpertLinears` in calibration mode, called from a hook inside its forward: the routed
    token count per expert of the batch this thread runs; else None."""
    return getattr(_BATCH, "counts", None) if getattr(module, "gptq_plugin_expert", False) else None


def _linear(weight: torch.Tensor) -> nn.Linear:
    lin = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta", dtype=weight.dtype)
    lin.weight = nn.Parameter(weight, requires_grad=False)
    lin.gptq_plugin_expert = True
    return lin


def checkpoint_projection_names(model: nn.Module | None) -> tuple[str, str, str]:
    """The per-expert layer names of ``model``'s checkpoints (gate, up, down): what Transformers' ``save_pretrained``
    writes for its fused experts (its reverse weight conversion, asked on a dummy tensor): ``("w1", "w3", "w2")`` for
    Mixtral, ``("gate_proj", "up_proj", "down_proj")`` for Qwen-MoE and when Transformers cannot say."""
    default = ("gate_proj", "up_proj", "down_proj")
    if model is None:
        return default
    try:
        from transformers.core_model_loading import revert_weight_conversion
    except ImportError:  # pragma: no cover
        return default
    gu = torch.tensor([[[1.0], [2.0]], [[11.0], [12.0]]], device="cpu")  # (E, 2I=2, H=1): gate 1, 11; up 2, 12
    dn = torch.tensor([[[3.0]], [[13.0]]], device="cpu")
    key = "model.layers.0.mlp.experts."
    try:
        out = revert_weight_conversion(model, {key + "gate_up_proj": gu, key + "down_proj": dn})
    except Exception:  # noqa: BLE001 - no mapping for this model, or Transformers changed: the default names
        return default
    names = {}
    for k, v in out.items():
        m = re.search(r"\.experts\.0\.([^.]+)\.weight$", k)
        if m and v.numel() == 1:
            names[float(v.flatten()[0])] = m.group(1)
    if set(names) != {1.0, 2.0, 3.0}:
        return default
    return names[1.0], names[2.0], names[3.0]


def linearize_experts(model: nn.Module, blocks: Iterable[nn.Module]) -> int:
    """Replace every fused-experts module (:func:`is_fused_experts`) inside ``blocks`` by an :class:`ExpertLinears`
    whose ``nn.Linear`` weights are views of the fused parameters (also on ``meta``), and mark the MoE routers
    (``gptq_plugin_role = "router"``: kept in float). Idempotent.

    Returns:
        The number of experts modules replaced.
    """
    names = None
    n = 0
    for block in blocks:
        for path, mod in list(block.named_modules()):
            if isinstance(mod, ExpertLinears):
                _mark_routers(block, path)
                continue
            if not is_fused_experts(mod):
                stacked = [p for p in mod.parameters(recurse=False) if p.dim() == 3]
                if stacked and path:  # experts this version cannot split: refused by the driver, but not their router
                    _mark_routers(block, path, stacked[0].shape[0])
                continue
            names = names or checkpoint_projection_names(model)
            E, two_i, _ = mod.gate_up_proj.shape
            gu, dn = mod.gate_up_proj.data, mod.down_proj.data
            experts = [ExpertMLP(_linear(gu[e, :two_i // 2]), _linear(gu[e, two_i // 2:]), _linear(dn[e]),
                                 mod.act_fn, names) for e in range(E)]
            parent, _, child = path.rpartition(".")
            setattr(block.get_submodule(parent) if parent else block, child, ExpertLinears(experts, E))
            _mark_routers(block, path)
            n += 1
    return n


def _mark_routers(block: nn.Module, experts_path: str, num_experts: int | None = None) -> None:
    """Mark the routers of the MoE module holding ``experts_path``: the modules inside it, outside the experts and
    any shared expert, whose 2-D weight has ``num_experts`` outputs (default the experts module's length; e.g.
    ``gate``, HunYuan's ``gate.wg``, Afmoe's ``router.gate``) or one output (a shared expert's gate)."""
    parent = experts_path.rpartition(".")[0]
    moe = block.get_submodule(parent) if parent else block
    E = num_experts or len(block.get_submodule(experts_path))
    skip = experts_path.rpartition(".")[2]
    for name, child in moe.named_modules():
        parts = name.split(".")
        if not name or parts[0] == skip or any(p.startswith("shared_expert") and p != "shared_expert_gate"
                                               for p in parts):
            continue
        w = getattr(child, "weight", None)
        if isinstance(w, torch.Tensor) and w.dim() == 2 and w.shape[0] in (E, 1) and not isinstance(
                child, (ExpertLinears, ExpertMLP)):
            child.gptq_plugin_role = ROUTER


def is_router(module: nn.Module) -> bool:
    return getattr(module, "gptq_plugin_role", None) == ROUTER


def expert_of(name: str) -> tuple[str, int] | None:
    """``("...mlp.experts", e)`` for a layer name inside an :class:`ExpertLinears` (``...experts.{e}.<proj>``)."""
    m = re.match(r"^(.*\.experts)\.(\d+)\.[^.]+$", name)
    return (m.group(1), int(m.group(2))) if m else None


def unquantized_weights(block: nn.Module) -> tuple[list[str], list[str], list[str]]:
    """``(routers, kept, unhandled)``: the parameters of 2 or more dims of ``block`` the driver does not quantize, by
    name. ``routers``: MoE routers (kept in float on purpose, as vLLM builds them). ``unhandled``: 3-D parameters
    outside convolutions and weights of modules named like experts: stacked expert weights this version cannot
    split, which would silently stay 16-bit (the driver refuses them). ``kept``: the rest (convolution kernels of
    Mamba or linear-attention layers, GPT-2's ``Conv1D``, per-expert statistics such as ``(1, E)`` score biases),
    which GPTQ does not quantize and the serving engines keep in float too (the driver reports them)."""
    owner = {}
    for mname, mod in block.named_modules():
        for pname, _ in mod.named_parameters(recurse=False):
            owner[f"{mname}.{pname}" if mname else pname] = mod
    routers, kept, unhandled = [], [], []
    for pname, p in block.named_parameters():
        if p.dim() < 2:
            continue
        mod = owner.get(pname)
        if is_router(mod):
            routers.append(pname)
        elif isinstance(mod, nn.Linear) and pname.endswith("weight"):
            continue
        elif (p.dim() == 3 and not isinstance(mod, nn.modules.conv._ConvNd)) or "Expert" in type(mod).__name__:
            unhandled.append(pname)
        else:
            kept.append(pname)
    return routers, kept, unhandled


def set_calibration(block: nn.Module, mode: str | None) -> None:
    """Put every :class:`ExpertLinears` of ``block`` in calibration ``mode`` (None: inference)."""
    for m in block.modules():
        if isinstance(m, ExpertLinears):
            m.calibration = mode


def check_moe_config(mode: str, min_tokens) -> None:
    if mode not in MOE_CALIBRATION:
        raise ConfigError(f"moe_calibration={mode!r} is not supported: use 'all' (every token through every expert "
                          "for the Hessians) or 'routed' (each expert's routed tokens)")
    if isinstance(min_tokens, bool) or not isinstance(min_tokens, int) or min_tokens < 0:
        raise ConfigError(f"moe_min_tokens={min_tokens!r} is invalid: use a count of tokens >= 0, e.g. 128")


def checkpoint_names(model: nn.Module, keys: Iterable[str]) -> dict[str, str]:
    """Model state-dict key -> the key ``model``'s checkpoints store it under (Transformers' reverse weight
    conversion, renames only: e.g. Mixtral's ``.mlp.`` -> ``.block_sparse_moe.``); the identity when the model has
    no conversion mapping or Transformers cannot say."""
    keys = list(keys)
    try:
        from transformers.core_model_loading import revert_weight_conversion

        marks = {k: torch.tensor([float(i)], device="cpu") for i, k in enumerate(keys)}
        out = revert_weight_conversion(model, marks)
        found = {int(v.flatten()[0]): k for k, v in out.items() if v.numel() == 1}
    except Exception:  # noqa: BLE001 - no mapping, or a fused tensor that is not a per-key rename
        return {k: k for k in keys}
    if len(found) != len(keys):
        return {k: k for k in keys}
    return {k: found[i] for i, k in enumerate(keys)}
