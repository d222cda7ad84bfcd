"""The model-level driver: GPTQ a Hugging Face decoder-only model block by block.

1. Capture the inputs (and keyword arguments: masks, rotary embeddings) of the first decoder block on the
   calibration batches.
2. For each block: discover which linear layers share an input and in which order the forward pass reaches
   them (q/k/v, then o, then gate/up, then down for Llama). Then one forward of all calibration batches
   through the block quantizes the groups on the way (``true_sequential``): the batches pause at each group's
   first layer until all have added their input to the group's Hessian (computed once per group), the group
   is quantized and its quantized weights put in place, and the batches go on, so later groups see quantized
   inputs and the block's outputs, the next block's inputs, come out of the same pass.
3. Replace the block's ``nn.Linear`` modules by :class:`~gptq_plugin.linear.QuantLinear`.

Only the calibration activations of one block boundary are kept; embeddings, norms and ``lm_head`` stay
unquantized.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import nn
from tqdm.auto import tqdm

from .config import QuantizeConfig
from .errors import ConfigError, NumericalError
from .layouts import find_layout
from .linear import QuantLinear
from .packing import unpack_qweight, unpack_qzeros
from .solver import HessianAccumulator, QuantResult, gptq_quantize, rtn_quantize

if TYPE_CHECKING:
    from .resume import ResumeState

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
    note: str | None = None


@dataclass
class QuantizeReport:
    layers: list[LayerReport] = field(default_factory=list)
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return {"seconds": self.seconds, "layers": [vars(l) for l in self.layers]}

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
        return meta


def _linear_modules(block: nn.Module) -> dict[str, nn.Linear]:
    return {n: m for n, m in block.named_modules() if isinstance(m, nn.Linear)}


def _call_block(block: nn.Module, x: torch.Tensor, kwargs: dict, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``block(x, **kwargs)``'s hidden states; with ``dtype`` (e.g. bf16) under autocast: matmuls in ``dtype``,
    weights and norms kept as they are (autocast state is per thread, so each caller's thread enters it)."""
    if dtype is None or dtype == x.dtype:
        out = block(x, **kwargs)
    else:
        with torch.autocast(device_type=x.device.type, dtype=dtype):
            out = block(x, **kwargs)
    return out[0] if isinstance(out, (tuple, list)) else out


def capture_block_inputs(model: nn.Module, blocks: nn.ModuleList, calib: torch.Tensor, batch_size: int,
                         progress: bool = True, store=None) -> tuple[list[torch.Tensor], list[dict]]:
    """Run the model on the calibration batches up to the first block; return its inputs and kwargs.

    Args:
        calib: int64 ``[n, seqlen]`` token ids.
        store: when given, called with each batch's input tensor instead of keeping it (the returned input list
            is then empty), e.g. to write it to a disk-backed buffer.

    Returns:
        ``(inputs, kwargs)``: one ``[b, seqlen, hidden]`` tensor and one kwargs dict per batch.
    """
    inputs: list[torch.Tensor] = []
    kwargs_list: list[dict] = []
    first = blocks[0]

    def hook(module, args, kwargs):
        x = args[0] if args else kwargs.pop("hidden_states")
        (store or inputs.append)(x.detach())
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
    order: list[tuple[str, torch.Tensor]] = []  # keep the input tensors alive: ids of freed tensors are reused
    handles = []
    for name, mod in linears.items():
        def hook(module, args, name=name):
            order.append((name, args[0]))
        handles.append(mod.register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            _call_block(block, x[:1], kwargs_for_batch(kwargs, 1))
    finally:
        for h in handles:
            h.remove()
    groups: list[list[str]] = []
    seen: set[str] = set()
    last = None
    for name, inp in order:
        if name in seen:
            continue  # a layer called twice is quantized with its first input's group
        seen.add(name)
        if groups and inp is last:
            groups[-1].append(name)
        else:
            groups.append([name])
        last = inp
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


def _accumulate(block: nn.Module, accs: dict[str, HessianAccumulator], inputs, kwargs_list,
                dtype: torch.dtype | None = None) -> None:
    """Run the calibration batches through ``block``, adding the input of each layer named in ``accs`` to its
    Hessian accumulator."""
    linears = _linear_modules(block)
    handles = []
    for name, acc in accs.items():
        def hook(module, args, name=name, acc=acc):
            acc.add_batch(args[0])  # NaN/Inf here makes the Hessian non-finite: the solver names the layer
        handles.append(linears[name].register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            for x, kw in zip(inputs, kwargs_list):
                _call_block(block, x, kw, dtype)
    finally:
        for h in handles:
            h.remove()


class _Aborted(Exception):
    """Ends a batch's forward after another batch failed."""


def _sequential_pass(block: nn.Module, groups: list[list[str]], inputs: list[torch.Tensor], kwargs_list: list[dict],
                     quantize_group, dtype: torch.dtype | None = None) -> list[torch.Tensor]:
    """One forward of every calibration batch through ``block`` that quantizes the block's layer groups on the
    way (true-sequential GPTQ in a single pass).

    Each batch runs in its own thread, and the threads take strict turns (batch 0, 1, ..., n-1), so exactly one
    computes at a time and the Hessian sums are deterministic. When a batch reaches the first layer of a group it
    adds its input to the group's Hessian and hands the turn on; the last batch to arrive calls
    ``quantize_group(group, H)``, which puts the quantized weights in place, and every batch then continues its
    forward with them. The block's outputs are therefore already the quantized block's outputs, and each group
    saw inputs produced by the quantized groups before it, without re-running the block once per group.
    Memory: every batch's activations at the current group are alive at once (about one full-batch forward).

    An exception in the calling thread while it waits (``KeyboardInterrupt`` from Ctrl-C, or what a SIGTERM
    handler raises) stops the batches at their next layer group and waits for every batch thread to end before it
    propagates, so no thread outlives the pass (a thread still inside torch when the interpreter exits aborts the
    process: "terminate called without an active exception"). A group being quantized finishes first.

    Returns:
        The block's output for each batch. Groups that no batch reached are passed to ``quantize_group`` with
        ``H=None`` after the pass.
    """
    n = len(inputs)
    linears = _linear_modules(block)
    accs = {g[0]: HessianAccumulator(linears[g[0]].in_features) for g in groups}
    by_head = {g[0]: g for g in groups}
    done: set[str] = set()
    cond = threading.Condition()
    state: dict = {"turn": 0, "error": None}
    local = threading.local()
    outputs: list[torch.Tensor | None] = [None] * n

    def wait_turn(b: int) -> None:
        with cond:
            while state["turn"] != b and state["error"] is None:
                cond.wait()
            if state["error"] is not None:
                raise _Aborted

    def pass_turn(to: int) -> None:
        with cond:
            state["turn"] = to
            cond.notify_all()

    def hook(module, args, head):
        b = local.batch
        if state["error"] is not None:
            raise _Aborted  # another batch failed, or the caller was interrupted: stop here
        if (head, b) in local.seen:
            return  # a layer called twice: only its first call feeds the Hessian
        local.seen.add((head, b))
        accs[head].add_batch(args[0])
        if b == n - 1:  # every batch has contributed: quantize the group, then start the next round
            quantize_group(by_head[head], accs[head].finalize())
            done.add(head)
            pass_turn(0)
        else:
            pass_turn(b + 1)
        wait_turn(b)

    def run(b: int) -> None:
        local.batch, local.seen = b, set()
        try:
            wait_turn(b)
            with torch.no_grad():
                outputs[b] = _call_block(block, inputs[b], kwargs_list[b], dtype)
            pass_turn(b + 1)
        except _Aborted:
            pass
        except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread
            with cond:
                if state["error"] is None:
                    state["error"] = e
                cond.notify_all()

    handles = [linears[h].register_forward_pre_hook(lambda m, a, h=h: hook(m, a, h)) for h in by_head]
    threads: list[threading.Thread] = []
    try:
        try:
            for b in range(n):
                threads.append(threading.Thread(target=run, args=(b,), name=f"gptq-batch-{b}"))
                threads[-1].start()
            for t in threads:
                t.join()
        except BaseException as e:  # e.g. KeyboardInterrupt in this thread: stop the batches, then re-raise
            with cond:
                if state["error"] is None:
                    state["error"] = e
                cond.notify_all()
            _join_all(threads)
            raise
    finally:
        for h in handles:
            h.remove()
    if state["error"] is not None:
        raise state["error"]
    for g in groups:
        if g[0] not in done:
            quantize_group(g, None)
    return outputs


def _join_all(threads: list[threading.Thread]) -> None:
    """Join ``threads``, carrying on through further interrupts (a second Ctrl-C must not leave them running)."""
    for t in threads:
        while t.is_alive():
            try:
                t.join()
            except BaseException:  # noqa: BLE001 - the first interrupt is already being handled
                pass


def _groupwise_pass(block: nn.Module, groups: list[list[str]], inputs: list[torch.Tensor], kwargs_list: list[dict],
                    quantize_group, dtype: torch.dtype | None = None, sink=None) -> list[torch.Tensor]:
    """The low-memory form of :func:`_sequential_pass`, with the same result: for each layer group in forward
    order, run every calibration batch, one at a time, through ``block`` only as far as the group's first layer
    (a forward pre-hook adds the input to the group's Hessian and stops the forward there), quantize the group,
    then go on to the next group; a last full forward gives the block's outputs. Only one batch's activations
    are alive at a time, at the cost of re-running the start of the block once per group (about 2x the
    forward compute of the one-pass driver for a Llama block). With ``sink``, each batch's output is passed to
    ``sink(i, y)`` as soon as it is computed (and an empty list returned), so outputs need not all be held."""
    linears = _linear_modules(block)
    for g in groups:
        head = g[0]
        acc = HessianAccumulator(linears[head].in_features)

        def hook(module, args, acc=acc):
            acc.add_batch(args[0])
            raise _StopForward

        handle = linears[head].register_forward_pre_hook(hook)
        try:
            with torch.no_grad():
                for x, kw in zip(inputs, kwargs_list):
                    try:
                        _call_block(block, x, kw, dtype)
                    except _StopForward:
                        pass
        finally:
            handle.remove()
        quantize_group(g, acc.finalize() if acc.n else None)
    outputs = []
    with torch.no_grad():
        for i, (x, kw) in enumerate(zip(inputs, kwargs_list)):
            y = _call_block(block, x, kw, dtype)
            if sink is None:
                outputs.append(y)
            else:
                sink(i, y)
    return outputs


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


def release_free_memory() -> None:
    """Give the heap's free pages back to the OS (glibc ``malloc_trim(0)``; a no-op elsewhere). Called after each
    block, and after each layer in the low-memory passes: glibc serves the MB-sized temporaries of the solver and
    the forwards from its heap once its mmap threshold has risen, the heap fragments, and its free pages are not
    returned. Measured on a 12-block synthetic model (hidden 1024, streaming GPTQ): peak RSS grew ~80 MB per
    block (0.92 -> 1.78 GB) without it and stayed at ~0.9 GB with it; a fixed 1 MB ``M_MMAP_THRESHOLD`` gave
    0.82 GB but ran 25% slower."""
    import ctypes
    import ctypes.util

    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _one_pass_fits(block: nn.Module, inputs: list[torch.Tensor]) -> bool:
    """Whether the one-pass driver's paused activations (every batch's forward state at a layer group, measured
    on Llama blocks at about ``4 B x tokens x max(6 x hidden, 3 x widest linear input)``) take under half of the
    memory available now (:func:`available_memory`; True where that cannot be read)."""
    avail = available_memory()
    if avail is None:
        return True
    tokens = sum(x.shape[0] * x.shape[1] for x in inputs)
    hidden = inputs[0].shape[-1]
    widest = max(m.in_features for m in _linear_modules(block).values())
    return 4 * tokens * max(6 * hidden, 3 * widest) < avail / 2


def _rel_errs(W: torch.Tensor, H: torch.Tensor, res: QuantResult, cfg: QuantizeConfig,
              grid: tuple[torch.Tensor, torch.Tensor] | None, chunk_bytes: int = 1 << 25) -> tuple[float, float]:
    """``tr(ΔW H ΔWᵀ) / tr(W H Wᵀ)`` with ``ΔW = W - Q`` for GPTQ's ``res`` and for RTN of ``W`` (on ``grid`` when
    given), summed over blocks of ~``chunk_bytes`` of output rows (RTN's grid is per row, so RTN of a block of rows
    is those rows of RTN): a few block-sized temporaries instead of several weight-sized ones."""
    step = max(1, chunk_bytes // (4 * max(W.shape[1], 1)))
    den = num = rtn_num = 0.0
    for r0 in range(0, W.shape[0], step):
        rows = slice(r0, r0 + step)
        Wr = W[rows].float()
        den += float(torch.sum((Wr @ H).mul_(Wr)))
        D = Wr - res.dequantize(rows)
        num += float(torch.sum((D @ H).mul_(D)))
        rtn = rtn_quantize(Wr, cfg, None if grid is None else (grid[0][:, rows], grid[1][:, rows]))
        D = Wr - rtn.dequantize()
        rtn_num += float(torch.sum((D @ H).mul_(D)))
    return (num / den, rtn_num / den) if den > 0 else (0.0, 0.0)


def _quantize_layer(name: str, mod: nn.Linear, H: torch.Tensor | None, cfg: QuantizeConfig, block_name: str,
                    report: QuantizeReport, keep_weight: bool = True, offload_dir=None) -> QuantResult:
    """Quantize one layer with GPTQ (RTN when no calibration token reached it). With ``keep_weight``, put the
    dequantized weight in place so later layers see quantized outputs; otherwise the caller replaces the
    layer (see :class:`_DequantizedLinear`). ``offload_dir``: see :func:`gptq_plugin.solver.gptq_quantize`."""
    t = time.time()
    full = f"{block_name}.{name}"
    W = mod.weight.data
    if H is None:
        log.warning("%s received no calibration tokens: quantized with RTN", full)
        res = rtn_quantize(W, cfg)
        res.fallback = "no calibration tokens reached this layer: RTN"
        report.layers.append(LayerReport(full, None, None, 0.0, res.fallback, time.time() - t))
    else:
        res = gptq_quantize(W, H, cfg, name=full, offload_dir=offload_dir)
        # static groups are RTN's grid already: reuse them rather than search the clipping (mse) again
        grid = (res.scales, res.zeros) if cfg.static_groups and res.fallback is None else None
        report.layers.append(LayerReport(full, *_rel_errs(W, H, res, cfg, grid), res.damp_percent, res.fallback,
                                         time.time() - t))
    _check_scales(full, W, res, report.layers[-1])
    if keep_weight:
        mod.weight.data = res.dequantize().to(mod.weight.dtype)
    return res


class _DequantizedLinear(nn.Module):
    """Stands in for a just-quantized ``nn.Linear`` during the calibration forwards: ``y = x @ weightᵀ + bias`` with
    ``weight`` dequantized from the packed layer on every access, bit for bit as :meth:`QuantResult.dequantize`
    gives it (same values and memory layout, in the original weight's dtype), and the original bias. The fp32
    weight is dropped, so a block being quantized holds its not-yet-quantized layers in full and the rest packed
    (``bits / 32`` of the size); each access builds one weight (the unpacking goes 32 input channels x ~1 MB at a
    time). ``weight``, ``bias``, ``in_features`` and ``out_features`` read as on ``nn.Linear`` (some blocks read
    ``layer.weight.dtype`` in their forward)."""

    def __init__(self, packed: QuantLinear, bias: torch.Tensor | None, dtype: torch.dtype):
        super().__init__()
        self.packed, self.bias, self.dtype = packed, bias, dtype
        self.in_features, self.out_features = packed.in_features, packed.out_features
        self.scales = packed.scales.float()  # [G, out]
        self.zeros = unpack_qzeros(packed.qzeros, packed.bits, packed.out_features).float()

    @property
    def weight(self) -> torch.Tensor:
        """``[out, in]`` (a transposed view of an ``[in, out]`` tensor), ``scales[g] * (codes - zeros[g])``."""
        q = self.packed
        K, N = q.in_features, q.out_features
        W = torch.empty(K, N)
        g = q.g_idx.long()
        step = max(32, (1 << 18) // max(N, 1) // 32 * 32)  # input channels per chunk, a multiple of 32 codes
        for k0 in range(0, K, step):
            k1 = min(k0 + step, K)
            codes = unpack_qweight(q.qweight[k0 * q.bits // 32:(k1 * q.bits + 31) // 32], q.bits, k1 - k0)
            gk = g[k0:k1]
            torch.mul(self.scales[gk], codes.float() - self.zeros[gk], out=W[k0:k1])
        return W.t().to(self.dtype)

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
                   forward_dtype: torch.dtype | None = None, offload_dir=None) -> dict[str, QuantResult]:
    """Quantize the linear layers of one decoder block in place (``nn.Linear`` -> :class:`QuantLinear`) and
    replace each calibration input by the quantized block's output (the next block's input).

    Args:
        block: the decoder block (float weights, on CPU).
        block_name: its state-dict prefix, e.g. ``"model.layers.3"`` (names layers in reports and errors).
        inputs: the block's inputs, one ``[b, seqlen, hidden]`` tensor per batch: a list or any sequence that
            supports ``len``, iteration, indexing and item assignment (e.g.
            :class:`gptq_plugin.streaming.ActivationBuffer`, which keeps them on disk). Unused for RTN.
        kwargs_list: the block's keyword arguments per batch (masks, rotary embeddings). Unused for RTN.
        low_memory, forward_dtype: as in :func:`quantize_model`.
        offload_dir: a folder where the solver parks large Hessians while it runs (see
            :func:`gptq_plugin.solver.gptq_quantize`); None keeps them in memory.

    Returns:
        The new layers (layer name inside the block -> :class:`QuantLinear`), already in place; rows are added to
        ``report``.

    Raises:
        NumericalError: the block's quantized output contains NaN or Inf (names the block).
    """
    linears = _linear_modules(block)
    aliases: dict[int, list[str]] = {}  # a module registered under several names is replaced under each
    for n, m in block.named_modules(remove_duplicate=False):
        aliases.setdefault(id(m), []).append(n)
    packed: dict[str, QuantLinear] = {}

    def keep(name: str, res: QuantResult, stand_in: bool = False) -> None:
        # packed at once: the int32 codes are as large as the fp32 weight, so a block's worth would double its memory
        mod = linears[name]
        bias = mod.bias.data if mod.bias is not None else None
        packed[name] = QuantLinear.from_result(res, cfg.group_size, bias, cfg.sym)
        if stand_in:  # the fp32 weight goes; later forwards dequantize the packed layer
            stand = _DequantizedLinear(packed[name], mod.bias, mod.weight.dtype)
            for alias in aliases[id(mod)]:
                _replace(block, alias, stand)
            mod.weight = None

    def emit(i: int, y: torch.Tensor) -> None:  # the next block sees this block's quantized outputs
        if not torch.isfinite(y).all():
            raise NumericalError(f"{block_name}: output contains NaN or Inf after quantization")
        inputs[i] = y

    if cfg.method == "rtn":
        for name, mod in linears.items():
            t = time.time()
            res = rtn_quantize(mod.weight.data, cfg)
            report.layers.append(LayerReport(f"{block_name}.{name}", None, None, 0.0, None, time.time() - t))
            _check_scales(f"{block_name}.{name}", mod.weight.data, res, report.layers[-1])
            keep(name, res)
            del res
    else:
        x0 = inputs[0]
        groups = _discover_groups(block, x0, kwargs_list[0])  # each group shares one input
        if cfg.true_sequential and low_memory is None:
            low_memory = not _one_pass_fits(block, inputs)
            log.info("true-sequential driver: %s", "low memory (group by group)" if low_memory
                     else "one pass per block")
        # the one-pass driver's paused batches resume inside the nn.Linear just quantized: it keeps its weight
        stand_in = bool(low_memory) or not cfg.true_sequential

        def quantize_group(group: list[str], H: torch.Tensor | None) -> None:
            # called from a forward hook, possibly under the forward's autocast: the solver computes in fp32
            with torch.autocast(device_type=x0.device.type, enabled=False):
                for name in group:  # one Hessian, computed once, for the layers sharing an input
                    res = _quantize_layer(name, linears[name], H, cfg, block_name, report, not stand_in, offload_dir)
                    keep(name, res, stand_in)
                    del res
                    if stand_in:  # the low-memory passes
                        release_free_memory()

        outputs: list[torch.Tensor] = []
        if cfg.true_sequential:
            if low_memory:
                _groupwise_pass(block, groups, inputs, kwargs_list, quantize_group, forward_dtype, sink=emit)
            else:
                outputs = _sequential_pass(block, groups, inputs, kwargs_list, quantize_group, forward_dtype)
        else:  # every Hessian from the unquantized block, then one forward to propagate
            accs = {g[0]: HessianAccumulator(linears[g[0]].in_features) for g in groups}
            _accumulate(block, accs, inputs, kwargs_list, forward_dtype)
            for g in groups:
                quantize_group(g, accs[g[0]].finalize() if accs[g[0]].n else None)
            with torch.no_grad():
                for i, (x, kw) in enumerate(zip(inputs, kwargs_list)):
                    emit(i, _call_block(block, x, kw, forward_dtype))
        for i, y in enumerate(outputs):
            emit(i, y)
    for name, q in packed.items():
        for alias in aliases[id(linears[name])]:
            _replace(block, alias, q)
    return packed


def _replace(block: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(block.get_submodule(parent_name) if parent_name else block, child, new)


def quantize_model(model: nn.Module, calib: torch.Tensor | None, cfg: QuantizeConfig, batch_size: int = 8,
                   progress: bool = True, max_blocks: int | None = None, low_memory: bool | None = None,
                   resume: ResumeState | None = None, forward_dtype: torch.dtype | None = None) -> QuantizeReport:
    """GPTQ- (or RTN-) quantize every linear layer inside the decoder blocks of ``model``, in place.

    Args:
        model: a Hugging Face causal LM on CPU (float32 recommended; weights are read in fp32).
        calib: int64 ``[n, seqlen]`` calibration token ids (ignored, may be None, for ``cfg.method == "rtn"``).
        cfg: the quantization config.
        batch_size: calibration sequences per forward.
        max_blocks: quantize only the first ``max_blocks`` decoder blocks (quick experiments and tests); the
            other blocks keep their ``nn.Linear`` layers.
        low_memory: how ``true_sequential`` runs the calibration batches through a block. False: one forward in
            which every batch pauses at each layer group (fastest; holds every batch's activations at once,
            e.g. ~1.5 GB for 128x512 tokens of a 576-wide model). True: the block is re-run up to each group, one
            batch at a time (about 1.5x slower on the demo model; one batch's activations). None (default): one pass when
            its estimated activations take under half the available memory, else low memory. The checkpoints
            are identical either way.
        forward_dtype: run the calibration forwards of the decoder blocks under autocast to this dtype (e.g.
            ``torch.bfloat16``: ~2x faster on CPUs with AMX/AVX512-BF16, as GPTQModel does); None computes in the
            model's dtype. Hessians always accumulate in fp32 and the weights GPTQ reads stay the model's.
        resume: a :class:`~gptq_plugin.resume.ResumeState`: blocks it records as finished are restored instead of
            quantized again (starting from the recorded activations), and every block finished now is recorded.

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
    first = 0
    if resume is not None and resume.done:
        first = min(resume.done, n_blocks)
        for bi in range(first):
            resume.restore_block(bi, blocks[bi], cfg)
            report.layers.extend(LayerReport(**r) for r in resume.reports[bi])
        if inputs is not None and first < n_blocks:
            inputs = resume.load_inputs()
    for bi in tqdm(range(first, n_blocks), desc=f"{cfg.method} {cfg.bits}-bit", disable=not progress,
                   initial=first, total=n_blocks):
        block = blocks[bi]
        n_reported = len(report.layers)
        quantize_block(block, f"{prefix}.{bi}", inputs, kwargs_list, cfg, report, low_memory, forward_dtype)
        release_free_memory()
        if resume is not None:
            resume.save_block(bi, block, inputs, [vars(l) for l in report.layers[n_reported:]])

    if use_cache is not None:
        model.config.use_cache = use_cache
    model.train(was_training)
    report.seconds = time.time() - t0
    return report
