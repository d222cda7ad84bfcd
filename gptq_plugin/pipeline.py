"""The model-level driver: GPTQ a Hugging Face decoder-only model block by block.

1. Capture the inputs (and keyword arguments: masks, rotary embeddings) of the first decoder block on the
   calibration batches.
2. For each block: discover which linear layers share an input and in which order the forward pass reaches
   them (q/k/v, then o, then gate/up, then down for Llama); for each such group in order, accumulate the
   group's Hessian once (the block's forward stops early, right after the group's input is seen), quantize
   the group's layers, and put their quantized weights in place so later groups see quantized inputs
   (``true_sequential``). Then re-run the block to produce the next block's inputs.
3. Replace the block's ``nn.Linear`` modules by :class:`~gptq_plugin.linear.QuantLinear`.

Only the calibration activations of one block boundary are kept; embeddings, norms and ``lm_head`` stay
unquantized.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from .config import QuantizeConfig
from .errors import ConfigError, NumericalError
from .layouts import find_layout
from .linear import QuantLinear
from .solver import HessianAccumulator, QuantResult, gptq_quantize, rtn_quantize

log = logging.getLogger(__name__)


class _StopForward(Exception):
    """Raised inside a forward hook to end a block's forward once the needed input was seen."""


@dataclass
class LayerReport:
    """What happened to one linear layer: relative output error on the calibration inputs
    (``tr(ΔW H ΔWᵀ) / tr(W H Wᵀ)``) for GPTQ and for RTN on the same grid, dampening used, fallback."""

    name: str
    rel_err: float | None
    rtn_rel_err: float | None
    damp_percent: float
    fallback: str | None
    seconds: float


@dataclass
class QuantizeReport:
    layers: list[LayerReport] = field(default_factory=list)
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return {"seconds": self.seconds, "layers": [vars(l) for l in self.layers]}


def _linear_modules(block: nn.Module) -> dict[str, nn.Linear]:
    return {n: m for n, m in block.named_modules() if isinstance(m, nn.Linear)}


def _call_block(block: nn.Module, x: torch.Tensor, kwargs: dict) -> torch.Tensor:
    out = block(x, **kwargs)
    return out[0] if isinstance(out, (tuple, list)) else out


def capture_block_inputs(model: nn.Module, blocks: nn.ModuleList, calib: torch.Tensor, batch_size: int,
                         progress: bool = True) -> tuple[list[torch.Tensor], list[dict]]:
    """Run the model on the calibration batches up to the first block; return its inputs and kwargs.

    Args:
        calib: int64 ``[n, seqlen]`` token ids.

    Returns:
        ``(inputs, kwargs)``: one ``[b, seqlen, hidden]`` tensor and one kwargs dict per batch.
    """
    inputs: list[torch.Tensor] = []
    kwargs_list: list[dict] = []
    first = blocks[0]

    def hook(module, args, kwargs):
        x = args[0] if args else kwargs.pop("hidden_states")
        inputs.append(x.detach())
        kwargs_list.append({k: v for k, v in kwargs.items() if k not in ("past_key_value", "past_key_values")})
        raise _StopForward

    handle = first.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for i in tqdm(range(0, calib.shape[0], batch_size), desc="calibration", disable=not progress, leave=False):
            try:
                model(input_ids=calib[i:i + batch_size], use_cache=False)
            except _StopForward:
                pass
    finally:
        handle.remove()
    return inputs, kwargs_list


def _discover_groups(block: nn.Module, x: torch.Tensor, kwargs: dict) -> list[list[str]]:
    """Linear layers of ``block`` in forward order, grouped by shared input tensor (q/k/v; gate/up)."""
    linears = _linear_modules(block)
    order: list[tuple[str, int]] = []
    handles = []
    for name, mod in linears.items():
        def hook(module, args, name=name):
            order.append((name, id(args[0])))
        handles.append(mod.register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            _call_block(block, x[:1], kwargs_for_batch(kwargs, 1))
    finally:
        for h in handles:
            h.remove()
    groups: list[list[str]] = []
    seen: set[str] = set()
    last_id = None
    for name, ident in order:
        if name in seen:
            continue  # a layer called twice is quantized with its first input's group
        seen.add(name)
        if groups and ident == last_id:
            groups[-1].append(name)
        else:
            groups.append([name])
        last_id = ident
    unused = [n for n in linears if n not in seen]
    if unused:
        groups.append(unused)  # never reached by the forward pass: no calibration tokens
    return groups


def kwargs_for_batch(kwargs: dict, b: int) -> dict:
    """Slice batch-shaped kwargs (masks, rotary embeddings) of a captured batch to its first ``b`` rows."""
    def cut(v):
        if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] > b:
            return v[:b]
        if isinstance(v, tuple):
            return tuple(cut(t) for t in v)
        return v
    return {k: cut(v) for k, v in kwargs.items()}


def _accumulate(block: nn.Module, accs: dict[str, HessianAccumulator], inputs, kwargs_list, stop_after: str | None,
                block_name: str) -> None:
    """Run the calibration batches through ``block``, adding the input of each layer named in ``accs`` to its
    Hessian accumulator; when ``stop_after`` is set, end each forward right after that layer's input."""
    linears = _linear_modules(block)
    handles = []
    for name, acc in accs.items():
        def hook(module, args, name=name, acc=acc):
            acc.add_batch(args[0])  # NaN/Inf here makes the Hessian non-finite: the solver names the layer
            if name == stop_after:
                raise _StopForward
        handles.append(linears[name].register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            for x, kw in zip(inputs, kwargs_list):
                try:
                    _call_block(block, x, kw)
                except _StopForward:
                    pass
    finally:
        for h in handles:
            h.remove()


def _rel_err(W: torch.Tensor, Q: torch.Tensor, H: torch.Tensor) -> float:
    D = W - Q
    num = torch.einsum("ij,jk,ik->", D, H, D)
    den = torch.einsum("ij,jk,ik->", W, H, W)
    return float(num / den) if float(den) > 0 else 0.0


def _quantize_layer(name: str, mod: nn.Linear, H: torch.Tensor | None, cfg: QuantizeConfig, block_name: str,
                  report: QuantizeReport) -> QuantResult:
    """Quantize one layer with GPTQ (RTN when no calibration token reached it) and put the dequantized weight
    in place so later layers see quantized outputs."""
    t = time.time()
    full = f"{block_name}.{name}"
    W = mod.weight.data.float()
    if H is None:
        log.warning("%s received no calibration tokens: quantized with RTN", full)
        res = rtn_quantize(W, cfg)
        res.fallback = "no calibration tokens reached this layer: RTN"
        report.layers.append(LayerReport(full, None, None, 0.0, res.fallback, time.time() - t))
    else:
        res = gptq_quantize(W, H, cfg, name=full)
        rtn_Q = rtn_quantize(W, cfg).dequantize()
        report.layers.append(LayerReport(full, _rel_err(W, res.dequantize(), H), _rel_err(W, rtn_Q, H),
                                         res.damp_percent, res.fallback, time.time() - t))
    mod.weight.data = res.dequantize().to(mod.weight.dtype)
    return res


def quantize_model(model: nn.Module, calib: torch.Tensor | None, cfg: QuantizeConfig, batch_size: int = 8,
                   progress: bool = True, max_blocks: int | None = None) -> QuantizeReport:
    """GPTQ- (or RTN-) quantize every linear layer inside the decoder blocks of ``model``, in place.

    Args:
        model: a Hugging Face causal LM on CPU (float32 recommended; weights are read in fp32).
        calib: int64 ``[n, seqlen]`` calibration token ids (ignored, may be None, for ``cfg.method == "rtn"``).
        cfg: the quantization config.
        batch_size: calibration sequences per forward.
        max_blocks: quantize only the first ``max_blocks`` decoder blocks (quick experiments and tests); the
            other blocks keep their ``nn.Linear`` layers.

    Returns:
        A :class:`QuantizeReport` (per-layer relative output error of GPTQ vs RTN, dampening, fallbacks).
        The model's block linears are replaced by :class:`QuantLinear` (fp16 scales).

    Raises:
        ConfigError: ``lm_head=True`` (not supported yet); NumericalError: NaN/Inf activations.
    """
    if cfg.lm_head:
        raise ConfigError("lm_head=True is not supported yet: keep lm_head unquantized (the default)")
    t0 = time.time()
    report = QuantizeReport()
    layout = find_layout(model)
    blocks, prefix = layout.blocks(model)
    was_training = model.training
    model.eval()
    use_cache = getattr(model.config, "use_cache", None)
    if use_cache is not None:
        model.config.use_cache = False

    inputs = kwargs_list = None
    if cfg.method == "gptq":
        if calib is None or calib.numel() == 0:
            raise ConfigError("GPTQ needs calibration data: pass calibration token windows (or use method='rtn')")
        with torch.no_grad():
            inputs, kwargs_list = capture_block_inputs(model, blocks, calib, batch_size, progress)
        if not all(torch.isfinite(x).all() for x in inputs):
            raise NumericalError(f"{prefix}.0: its calibration inputs contain NaN or Inf; check the source model")

    n_blocks = len(blocks) if max_blocks is None else min(max_blocks, len(blocks))
    for bi in tqdm(range(n_blocks), desc=f"{cfg.method} {cfg.bits}-bit", disable=not progress):
        block = blocks[bi]
        block_name = f"{prefix}.{bi}"
        linears = _linear_modules(block)
        results: dict[str, QuantResult] = {}
        if cfg.method == "rtn":
            for name, mod in linears.items():
                t = time.time()
                results[name] = rtn_quantize(mod.weight.data, cfg)
                report.layers.append(LayerReport(f"{block_name}.{name}", None, None, 0.0, None, time.time() - t))
        else:
            groups = _discover_groups(block, inputs[0], kwargs_list[0])  # each group shares one input
            # true-sequential: one pass per group, after the groups before it are quantized; else one pass
            passes = [[g] for g in groups] if cfg.true_sequential else [groups]
            for pass_groups in passes:
                accs = {g[0]: HessianAccumulator(linears[g[0]].in_features) for g in pass_groups}
                stop = pass_groups[0][0] if len(pass_groups) == 1 else None
                _accumulate(block, accs, inputs, kwargs_list, stop, block_name)
                for group in pass_groups:
                    acc = accs[group[0]]
                    H = acc.finalize() if acc.n else None  # computed once, shared by the group
                    for name in group:
                        results[name] = _quantize_layer(name, linears[name], H, cfg, block_name, report)
            # propagate: the next block sees this block's quantized outputs
            with torch.no_grad():
                for i, (x, kw) in enumerate(zip(inputs, kwargs_list)):
                    y = _call_block(block, x, kw)
                    if not torch.isfinite(y).all():
                        raise NumericalError(f"{block_name}: output contains NaN or Inf after quantization")
                    inputs[i] = y
        for name, res in results.items():
            mod = linears[name]
            bias = mod.bias.data if mod.bias is not None else None
            q = QuantLinear.from_result(res, cfg.group_size, bias, cfg.sym)
            parent_name, _, child = name.rpartition(".")
            parent = block.get_submodule(parent_name) if parent_name else block
            setattr(parent, child, q)

    if use_cache is not None:
        model.config.use_cache = use_cache
    model.train(was_training)
    report.seconds = time.time() - t0
    return report
