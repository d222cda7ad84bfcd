"""GPTQ one decoder block, as both drivers (:mod:`gptq_plugin.driver`) run it on every block, so the in-memory and
the streaming checkpoints hold the same tensors.

:func:`quantize_block` discovers which linear layers share an input and in which order the forward pass reaches
them (q/k/v, then o, then gate/up, then down for Llama). Then one forward of all calibration batches through the
block quantizes the groups on the way (``true_sequential``; :mod:`gptq_plugin.passes` runs the forwards): the
batches pause at each group's first layer until all have added their input to the group's Hessian (computed once
per group), the group is quantized and its quantized weights put in place, and the batches go on, so later groups
see quantized inputs and the block's outputs, the next block's inputs, come out of the same pass. The block's
``nn.Linear`` modules are then replaced by :class:`~gptq_plugin.linear.QuantLinear`, and each layer gets a row in
the :class:`QuantizeReport`. Also here: the memory checks the drivers make (:func:`available_memory`,
:func:`release_free_memory`).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import torch
from torch import nn

from .config import QuantizeConfig
from .distributed import SINGLE, Ranks
from .errors import ConfigError, NumericalError
from .linear import QuantLinear
from .moe import expert_of, set_calibration
from .packing import unpack_qweight, unpack_qzeros
from .passes import accumulate, call_block, discover_groups, groupwise_pass, linear_modules, sequential_pass
from .solver import HessianAccumulator, QuantResult, gptq_quantize, rtn_quantize
from .solver_memory import release_free_memory

log = logging.getLogger(__name__)


@dataclass
class LayerReport:
    """What happened to one linear layer: relative output error on the calibration inputs
    (``tr(ΔW H ΔWᵀ) / tr(W H Wᵀ)``) for GPTQ and for RTN on the same grid (None when the run did not ask for the
    comparison, see :class:`QuantizeReport`), dampening used, fallback, seconds spent, a note (clipped scales), and for
    a layer of an MoE's experts the calibration tokens the router sent to its expert (``tokens``)."""

    name: str
    rel_err: float | None
    rtn_rel_err: float | None
    damp_percent: float
    fallback: str | None
    seconds: float
    note: str | None = None
    tokens: int | None = None


@dataclass
class QuantizeReport:
    """The report of one quantization run: a :class:`LayerReport` per quantized layer, in order, and the run's
    wall time in seconds.

    Attributes:
        compare_rtn: whether each layer's ``rtn_rel_err`` is computed (RTN of the layer on GPTQ's grid, one more
            quantization of every layer: only for a report or plot that shows it); not part of :meth:`to_dict`.
        unquantized: weight tensors of the blocks kept in float on purpose (MoE routers first, then convolution
            kernels and the like), by their names in the checkpoint.
        routers: how many of ``unquantized`` are MoE routers; not part of :meth:`to_dict`.
        moe_calibration: how the experts' Hessians were gathered (``QuantizeConfig.moe_calibration``).
    """

    layers: list[LayerReport] = field(default_factory=list)
    seconds: float = 0.0
    compare_rtn: bool = False
    unquantized: list[str] = field(default_factory=list)
    routers: int = 0
    moe_calibration: str = "all"

    def to_dict(self) -> dict:
        """``{"seconds": ..., "layers": [LayerReport fields, ...], "unquantized": [...], "experts": {...}}`` (the
        ``--report`` JSON; ``experts`` as in :meth:`experts`)."""
        d = {"seconds": self.seconds, "layers": [vars(l) for l in self.layers], "unquantized": self.unquantized}
        if self.experts():
            d["experts"] = self.experts()
        return d

    def experts(self) -> dict[str, dict]:
        """Per expert of an MoE block (``"model.layers.3.mlp.experts.7"``): ``tokens``, the calibration tokens the
        router sent to it (None for RTN runs), and ``path``: ``"gptq (all tokens)"`` (every calibration token's
        Hessian, ``moe_calibration="all"``), ``"gptq (routed tokens)"``, or ``"rtn: <why>"`` (a fallback)."""
        out: dict[str, dict] = {}
        for l in self.layers:
            where = expert_of(l.name)
            if where is None:
                continue
            key = f"{where[0]}.{where[1]}"
            if l.rel_err is None and l.fallback is None:
                path = "rtn"  # --method rtn
            elif l.fallback:
                path = f"rtn: {l.fallback}"
            else:
                path = f"gptq ({self.moe_calibration} tokens)"
            entry = out.setdefault(key, {"tokens": l.tokens, "path": path})
            if path.startswith("rtn:") and not entry["path"].startswith("rtn:"):
                entry["path"] = path
        return out

    def checkpoint_meta(self) -> dict:
        """What the checkpoint's ``quantization_config["meta"]`` records of this run: per-layer ``fallbacks``
        (e.g. RTN where the Hessian stayed singular) and ``notes`` (e.g. clipped fp16 scales), when any."""
        meta = {}
        fallbacks = {l.name: l.fallback for l in self.layers if l.fallback}
        if fallbacks:
            meta["fallbacks"] = fallbacks
        notes = {l.name: l.note for l in self.layers if l.note}
        if notes:
            meta["notes"] = notes
        if self.unquantized:
            meta["unquantized"] = self.unquantized
        if self.experts():
            meta["experts"] = self.experts()
        return meta


def available_memory() -> int | None:
    """Bytes this process can still allocate: ``/proc/meminfo`` MemAvailable, lowered to the memory cgroup's
    limit minus its usage where one is set (cgroup v2 ``memory.max``, v1 ``memory.limit_in_bytes``; the page
    cache counted in the usage is not subtracted, being reclaimable); None where it cannot be read."""
    try:
        with open("/proc/meminfo") as f:
            avail = next(int(l.split()[1]) * 1024 for l in f if l.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        return None
    try:
        with open("/proc/self/cgroup") as f:
            lines = [l.strip().split(":", 2) for l in f]
    except OSError:
        return avail
    for hid, ctrl, path in lines:
        if hid == "0" and ctrl == "":
            files = (f"/sys/fs/cgroup{path}/memory.max", f"/sys/fs/cgroup{path}/memory.current", "file ")
        elif "memory" in ctrl.split(","):
            base = f"/sys/fs/cgroup/memory{path}"
            files = (f"{base}/memory.limit_in_bytes", f"{base}/memory.usage_in_bytes", f"{base}/memory.stat")
        else:
            continue
        try:
            with open(files[0]) as f:
                raw = f.read().strip()
            if raw == "max" or int(raw) >= 1 << 60:
                continue
            with open(files[1]) as f:
                used = int(f.read())
            cache = 0
            if files[2].startswith("/"):
                with open(files[2]) as f:
                    cache = next((int(l.split()[1]) for l in f if l.startswith("total_inactive_file ")), 0)
            avail = min(avail, int(raw) - used + cache)
        except (OSError, ValueError):
            continue
    return max(avail, 0)


def _one_pass_fits(block: nn.Module, inputs: list[torch.Tensor]) -> bool:
    """Whether the one-pass driver's paused activations (every batch's forward state at a layer group, measured
    on Llama blocks at about ``4 B x tokens x max(6 x hidden, 3 x widest linear input)``) take under half of the
    memory available now on the block's device (:func:`available_memory` on the CPU, free CUDA memory on a GPU;
    True where that cannot be read)."""
    dev = next((p.device for p in block.parameters()), torch.device("cpu"))
    avail = torch.cuda.mem_get_info(dev)[0] if dev.type == "cuda" else available_memory()
    if avail is None:
        return True
    x0 = inputs[0]  # batches are equal but for a shorter last one: an upper bound without reading (or moving) them all
    tokens = x0.shape[0] * x0.shape[1] * len(inputs)
    hidden = x0.shape[-1]
    widest = max(m.in_features for m in linear_modules(block).values())
    return 4 * tokens * max(6 * hidden, 3 * widest) < avail / 2


def _rel_errs(W: torch.Tensor, H: torch.Tensor, res: QuantResult, cfg: QuantizeConfig,
              grid: tuple[torch.Tensor, torch.Tensor] | None, chunk_bytes: int = 1 << 25, rtn: bool = True
              ) -> tuple[float, float | None]:
    """``tr(ΔW H ΔWᵀ) / tr(W H Wᵀ)`` with ``ΔW = W - Q`` for GPTQ's ``res`` and, with ``rtn``, for RTN of
    ``W`` (on ``grid`` when given; else None), summed over blocks of ~``chunk_bytes`` of output rows (RTN's grid
    is per row, so RTN of a block of rows is those rows of RTN): a few block-sized temporaries instead of several
    weight-sized ones."""
    step = max(1, chunk_bytes // (4 * max(W.shape[1], 1)))
    den = num = rtn_num = 0.0
    for r0 in range(0, W.shape[0], step):
        rows = slice(r0, r0 + step)
        Wr = W[rows].float()
        den += float(torch.sum((Wr @ H).mul_(Wr)))
        D = Wr - res.dequantize(rows)
        num += float(torch.sum((D @ H).mul_(D)))
        if rtn:
            D = Wr - rtn_quantize(Wr, cfg, None if grid is None else (grid[0][:, rows], grid[1][:, rows])).dequantize()
            rtn_num += float(torch.sum((D @ H).mul_(D)))
    if den <= 0:
        return 0.0, 0.0 if rtn else None
    return num / den, rtn_num / den if rtn else None


def _solve_layer(name: str, mod: nn.Linear, H: torch.Tensor | None, cfg: QuantizeConfig, block_name: str,
                 compare_rtn: bool, offload_dir=None, tokens: int | None = None, names: dict | None = None,
                 halves: tuple[torch.Tensor, torch.Tensor] | None = None, dxxt: torch.Tensor | None = None
                 ) -> tuple[QuantResult, LayerReport]:
    """Quantize one layer with GPTQ (RTN when no calibration token reached it, or when it is an expert's layer
    that saw fewer than ``cfg.moe_min_tokens`` routed tokens with ``moe_calibration="routed"``); returns the result
    (on the CPU) and its report row. ``offload_dir``: see :func:`gptq_plugin.solver.gptq_quantize`. ``tokens``: the
    routed calibration tokens of the layer's expert (None: not an expert's layer). ``names``: full model names ->
    the checkpoint's, where they differ (the report, logs and errors use the checkpoint's). ``halves``: the held-out
    Hessians for ``cfg.damp_auto`` (:func:`gptq_plugin.solver.choose_damp`). ``dxxt``: GPTAQ's asymmetric term for
    ``cfg.gptaq`` (:func:`gptq_plugin.solver.gptq_quantize`); the report's errors stay GPTQ's (``W x``)."""
    t = time.time()
    full = f"{block_name}.{name}"
    full = (names or {}).get(full, full)
    W = mod.weight.data
    few = (tokens is not None and cfg.moe_calibration == "routed" and tokens < cfg.moe_min_tokens)
    if H is None or few:
        why = (f"its expert saw {tokens} routed calibration tokens (< moe_min_tokens={cfg.moe_min_tokens})"
               if few else "no calibration tokens reached this layer")
        log.warning("%s: %s: quantized with RTN", full, why)
        res = rtn_quantize(W, cfg)
        res.fallback = f"{why}: RTN"
        row = LayerReport(full, None, None, 0.0, res.fallback, time.time() - t, tokens=tokens)
    else:
        res = gptq_quantize(W, H, cfg, name=full, offload_dir=offload_dir, halves=halves, dxxt=dxxt,
                            gptaq_alpha=cfg.gptaq or 0.0)
        # static groups are RTN's grid already: reuse them rather than search the clipping (mse) again
        grid = (res.scales, res.zeros) if cfg.static_groups and res.fallback is None else None
        errs = _rel_errs(W, H, res, cfg, grid, rtn=compare_rtn)
        row = LayerReport(full, *errs, res.damp_percent, res.fallback, time.time() - t, tokens=tokens)
    _check_scales(full, W, res, row)
    if cfg.damp_auto and res.fallback is None and halves is None:  # e.g. an expert routed tokens of one half only
        why = (f"damp_auto: its calibration tokens do not cover both halves of the batches, so damp_percent "
               f"{res.damp_percent:g} was used")
        row.note = f"{row.note}; {why}" if row.note else why
    return res.to("cpu"), row


def _share_layer(ranks: Ranks, solved: tuple[QuantResult, LayerReport] | None, owner: int
                 ) -> tuple[QuantResult, LayerReport]:
    """The layer that rank ``owner`` solved, on every rank (codes travel as uint8: they are below 2**8)."""
    if ranks.world == 1:
        return solved
    tensors = meta = None
    if solved is not None:
        res, row = solved
        tensors = {"codes": res.codes.to(torch.uint8), "scales": res.scales, "zeros": res.zeros, "g_idx": res.g_idx}
        meta = (res.bits, res.group_size, res.sym, res.damp_percent, res.fallback, vars(row))
    tensors, meta = ranks.share(tensors, meta, owner)
    bits, group_size, sym, damp, fallback, row = meta
    res = QuantResult(tensors["codes"].to(torch.int32), tensors["scales"], tensors["zeros"], tensors["g_idx"], bits,
                      group_size, sym, damp, fallback)
    return res, LayerReport(**row)


class _DequantizedLinear(nn.Module):
    """Stands in for a just-quantized ``nn.Linear`` during the calibration forwards: ``y = x @ weightᵀ + bias`` with
    ``weight`` dequantized from the packed layer on every access, bit for bit as :meth:`QuantResult.dequantize`
    gives it (same values and memory layout, in the original weight's dtype), and the original bias. The fp32
    weight is dropped, so a block being quantized holds its not-yet-quantized layers in full and the rest packed
    (``bits / 32`` of the size); each access builds one weight (the unpacking goes 32 input channels x ~1 MB at a
    time). ``weight``, ``bias``, ``in_features`` and ``out_features`` read as on ``nn.Linear`` (some blocks read
    ``layer.weight.dtype`` in their forward). With ``keep_weight`` the weight is built once, at its first access,
    and kept (as much memory as the dropped fp32 weight, for GPTAQ's passes, which run every batch twice and hold
    an unquantized copy of the block anyway); the same values."""

    def __init__(self, packed: QuantLinear, bias: torch.Tensor | None, dtype: torch.dtype,
                 device: torch.device | str = "cpu", keep_weight: bool = False):
        super().__init__()
        self.keep_weight, self._kept = keep_weight, None
        self.packed, self.bias, self.dtype = packed, bias, dtype
        self.in_features, self.out_features = packed.in_features, packed.out_features
        self.device = torch.device(device)
        self.scales = packed.scales.float().to(self.device)  # [G, out]
        self.zeros = unpack_qzeros(packed.qzeros, packed.bits, packed.out_features).float().to(self.device)
        self.qweight, self.g_idx = packed.qweight.to(self.device), packed.g_idx.long().to(self.device)

    @property
    def weight(self) -> torch.Tensor:
        """``[out, in]`` (a transposed view of an ``[in, out]`` tensor), ``scales[g] * (codes - zeros[g])``."""
        if self._kept is not None:
            return self._kept
        q = self.packed
        K, N = q.in_features, q.out_features
        W = torch.empty(K, N, device=self.device)
        g = self.g_idx
        step = max(32, (1 << 18) // max(N, 1) // 32 * 32)  # input channels per chunk, a multiple of 32 codes
        for k0 in range(0, K, step):
            k1 = min(k0 + step, K)
            codes = unpack_qweight(self.qweight[k0 * q.bits // 32:(k1 * q.bits + 31) // 32], q.bits, k1 - k0)
            gk = g[k0:k1]
            torch.mul(self.scales[gk], codes.float() - self.zeros[gk], out=W[k0:k1])
        W = W.t().to(self.dtype)
        if self.keep_weight:
            self._kept = W
        return W

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, self.weight, self.bias)


def _check_scales(name: str, W: torch.Tensor, res: QuantResult, row: LayerReport) -> None:
    """Log (and note in the layer's report) scales clamped at fp16's maximum: the layer's largest weights are
    then clipped."""
    top = float(torch.finfo(torch.float16).max)
    n_over = int((res.scales.float() >= top).sum())
    if n_over:
        row.note = (f"{n_over} scales reached fp16's maximum {top:g} (weights up to {float(W.abs().max()):.4g}): the "
                    "largest weights of this layer are clipped; keep it unquantized or rescale the model")
        log.warning("%s: %s", name, row.note)


def quantize_block(block: nn.Module, block_name: str, inputs, kwargs_list: list[dict] | None, cfg: QuantizeConfig,
                   report: QuantizeReport, low_memory: bool | None = None,
                   forward_dtype: torch.dtype | None = None, offload_dir=None, ranks: Ranks | None = None,
                   first_batch: int = 0, names: dict[str, str] | None = None, park_dir=None,
                   reference: tuple[nn.Module, object] | None = None) -> dict[str, QuantLinear]:
    """Quantize the linear layers of one decoder block in place (``nn.Linear`` -> :class:`QuantLinear`) and
    replace each calibration input by the quantized block's output (the next block's input).

    Args:
        block: the decoder block (float weights, on the device it computes on; the packed layers are put on the
            same device).
        block_name: its state-dict prefix, e.g. ``"model.layers.3"`` (names layers in reports and errors).
        inputs: the block's inputs, one ``[b, seqlen, hidden]`` tensor per batch (this rank's batches): a list or
            any sequence that supports ``len``, iteration, indexing and item assignment (e.g.
            :class:`gptq_plugin.resume.ActivationBuffer`, which can keep them on disk); once batch ``i``'s output is
            assigned, its input is not read again. Unused for RTN.
        kwargs_list: the block's keyword arguments per batch (masks, rotary embeddings). Unused for RTN.
        cfg: the quantization config. report: gets one :class:`LayerReport` per layer (``report.compare_rtn``:
            with RTN's error too).
        low_memory, forward_dtype: as in :func:`gptq_plugin.pipeline.quantize_model`.
        offload_dir: a folder where the solver parks large Hessians while it runs (see
            :func:`gptq_plugin.solver.gptq_quantize`); None keeps them in memory.
        ranks: the ranks sharing the work (:mod:`gptq_plugin.distributed`): each adds its batches to the
            Hessians, which are completed across ranks; each layer is solved on one rank and shared. Default: this
            process alone.
        first_batch: the global index of ``inputs[0]`` (this rank's first batch).
        names: full module names -> the checkpoint's, where they differ (e.g. Mixtral's ``mlp`` ->
            ``block_sparse_moe``): the report rows, logs and errors name layers as the checkpoint does.
        park_dir: a folder where the one-pass driver's waiting batches park their inputs to a one-layer group
            (:func:`gptq_plugin.passes.sequential_pass`); None keeps them in memory. The same bytes either way.
        reference: with ``cfg.gptaq``, ``(original, fp_inputs)``: an unquantized copy of ``block`` and its inputs
            in the unquantized model (a sequence like ``inputs``), GPTAQ's second stream
            (:func:`gptq_plugin.passes.groupwise_pass`); the block then runs group by group whatever ``low_memory``
            says, and each ``fp_inputs[i]`` is replaced by ``original``'s output. Ignored without ``cfg.gptaq``.

    Returns:
        The new layers (layer name inside the block -> :class:`QuantLinear`), already in place; rows are added to
        ``report`` (the same rows on every rank).

    Raises:
        NumericalError: the block's quantized output (or, with ``reference``, the unquantized block's output)
            contains NaN or Inf (names the block).
        ConfigError: ``cfg.gptaq`` without ``reference`` (for GPTQ), or with ``low_memory=False``.
        DistributedError: another rank failed meanwhile.
    """
    ranks = ranks or SINGLE
    if cfg.gptaq is not None and cfg.method == "gptq":
        if reference is None:
            raise ConfigError(f"{block_name}: gptaq needs the unquantized block and its inputs in the unquantized "
                              "model (reference=...); gptq_plugin.driver.quantize_blocks passes them")
        if low_memory is False:
            raise ConfigError("gptaq runs the low-memory driver (group by group, with the unquantized block beside "
                              "the quantized one): drop --one-pass (low_memory=False)")
        low_memory = True
    else:
        reference = None
    linears = linear_modules(block)
    aliases: dict[int, list[str]] = {}  # a module registered under several names is replaced under each
    for n, m in block.named_modules(remove_duplicate=False):
        aliases.setdefault(id(m), []).append(n)
    packed: dict[str, QuantLinear] = {}

    def keep(name: str, res: QuantResult, stand_in: bool = False) -> None:
        # packed at once: the int32 codes are as large as the fp32 weight, so a block's worth would double its memory
        mod = linears[name]
        bias = mod.bias.data.cpu() if mod.bias is not None else None
        packed[name] = QuantLinear.from_result(res, cfg.group_size, bias, cfg.sym).to(mod.weight.device)
        if stand_in:  # the fp32 weight goes; later forwards dequantize the packed layer
            stand = _DequantizedLinear(packed[name], mod.bias, mod.weight.dtype, mod.weight.device,
                                       keep_weight=reference is not None)
            for alias in aliases[id(mod)]:
                _replace(block, alias, stand)
            mod.weight = None
        else:  # later layers see this layer's quantized outputs
            mod.weight.data = res.dequantize().to(mod.weight.device, mod.weight.dtype)

    def emit(i: int, y: torch.Tensor) -> None:  # the next block sees this block's quantized outputs
        if not torch.isfinite(y).all():
            raise NumericalError(f"{block_name}: output contains NaN or Inf after quantization")
        inputs[i] = y

    def emit_reference(i: int, y: torch.Tensor) -> None:  # GPTAQ: the next block's inputs in the unquantized model
        if not torch.isfinite(y).all():
            raise NumericalError(f"{block_name}: the unquantized block's output contains NaN or Inf")
        reference[1][i] = y

    if cfg.method == "rtn":
        for name, mod in linears.items():
            t = time.time()
            full = (names or {}).get(f"{block_name}.{name}", f"{block_name}.{name}")
            res = rtn_quantize(mod.weight.data, cfg).to("cpu")
            report.layers.append(LayerReport(full, None, None, 0.0, None, time.time() - t))
            _check_scales(full, mod.weight.data, res, report.layers[-1])
            keep(name, res)
            del res
    else:
        set_calibration(block, cfg.moe_calibration)  # MoE experts: every expert called in every batch
        if reference is not None:  # GPTAQ (moe_calibration "all"): each expert sees every token in both streams
            set_calibration(reference[0], cfg.moe_calibration)
        try:
            x0 = inputs[0]
            groups = discover_groups(block, x0, kwargs_list[0])  # each group shares one input
            if cfg.true_sequential and low_memory is None:
                low_memory = not _one_pass_fits(block, inputs)
                log.info("true-sequential driver: %s", "low memory (group by group)" if low_memory
                         else "one pass per block")
            # the one-pass driver's paused batches resume inside the nn.Linear just quantized: it keeps its weight
            stand_in = bool(low_memory) or not cfg.true_sequential

            def new_accumulator(k: int) -> HessianAccumulator:
                return HessianAccumulator(k, first_batch=first_batch, ranks=ranks, heldout=cfg.damp_auto)

            def quantize_group(group: list[str], H: torch.Tensor | None, routed: list[int] | None = None,
                               halves: tuple[torch.Tensor, torch.Tensor] | None = None,
                               dxxt: torch.Tensor | None = None) -> None:
                # called from a forward hook, possibly under the forward's autocast: the solver computes in fp32.
                # One Hessian, computed once, for the layers sharing an input; each layer solved on its owner rank.
                with torch.autocast(device_type=x0.device.type, enabled=False):
                    owners = ranks.owners([linears[n].out_features * linears[n].in_features ** 2 for n in group])

                    def solve(name: str):
                        where = expert_of(name) if routed is not None else None
                        return _solve_layer(name, linears[name], H, cfg, block_name, report.compare_rtn, offload_dir,
                                            None if where is None else routed[where[1]], names, halves, dxxt)

                    mine = {} if ranks.world == 1 else {n: solve(n) for n, r in zip(group, owners) if r == ranks.rank}
                    for name, owner in zip(group, owners):
                        res, row = solve(name) if ranks.world == 1 else _share_layer(ranks, mine.pop(name, None), owner)
                        report.layers.append(row)
                        keep(name, res, stand_in)
                        del res
                        if stand_in:  # the low-memory passes
                            release_free_memory()

            outputs: list[torch.Tensor] = []
            if cfg.true_sequential:
                if low_memory:
                    groupwise_pass(block, groups, inputs, kwargs_list, quantize_group, forward_dtype, sink=emit,
                                   new_accumulator=new_accumulator, reference=reference,
                                   reference_sink=emit_reference)
                else:
                    outputs = sequential_pass(block, groups, inputs, kwargs_list, quantize_group, forward_dtype,
                                              new_accumulator=new_accumulator, park_dir=park_dir)
            else:  # every Hessian from the unquantized block, then one forward to propagate
                accs = {g[0]: new_accumulator(linears[g[0]].in_features) for g in groups}
                accumulate(block, accs, inputs, kwargs_list, forward_dtype)
                for g in groups:
                    H = accs[g[0]].finalize(allow_empty=True)
                    quantize_group(g, H, accs[g[0]].routed, halves=accs[g[0]].take_halves())
                with torch.no_grad():
                    for i, (x, kw) in enumerate(zip(inputs, kwargs_list)):
                        emit(i, call_block(block, x, kw, forward_dtype))
            for i, y in enumerate(outputs):
                emit(i, y)
        finally:
            set_calibration(block, None)
            if reference is not None:
                set_calibration(reference[0], None)
    for name, q in packed.items():
        for alias in aliases[id(linears[name])]:
            _replace(block, alias, q)
    return packed


def _replace(block: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(block.get_submodule(parent_name) if parent_name else block, child, new)
