"""Calibration forwards through one decoder block: capture the first block's inputs, find the layer groups that
share an input, and run the batches through a block while its groups are quantized (true-sequential GPTQ in one
pass of turn-taking threads, or group by group with one batch's activations at a time).

The quantization itself is a callback, ``quantize_group(group, H, routed, halves=...)``
(:func:`gptq_plugin.blockquant.quantize_block` gives it; ``halves``: the accumulator's held-out Hessians, or None);
these functions only order the forwards and accumulate each group's Hessian
(:class:`~gptq_plugin.solver.HessianAccumulator`).
"""

from __future__ import annotations

import contextlib
import signal
import threading
from typing import Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from .moe import is_router, routed_tokens
from .solver import HessianAccumulator
from .solver_memory import offloaded, release_free_memory

#: paused activations at least this large (bytes, one batch's input to a layer group) are parked on disk by
#: :func:`sequential_pass` when it is given ``park_dir``
PARK_MIN_BYTES = 1 << 20
#: with ``park_dir``, :func:`sequential_pass` gives the heap's free pages back (``malloc_trim``) after every this many
#: batches reach a group: on the demo model, every 4th batch held the same peak as every batch (1.39 GB over two
#: blocks; every 16th: 1.47 GB) at a third of the cost (0.26 s against 0.76 s)
TRIM_EVERY = 4


class _StopForward(Exception):
    """Raised inside a forward hook to end a block's forward once the needed input was seen."""


def linear_modules(block: nn.Module) -> dict[str, nn.Linear]:
    """The ``nn.Linear`` modules inside ``block`` that are quantized, by name relative to it (each module once):
    all but MoE routers (:func:`gptq_plugin.moe.is_router`)."""
    return {n: m for n, m in block.named_modules() if isinstance(m, nn.Linear) and not is_router(m)}


_routed = routed_tokens  # the routed token counts per expert of this thread's batch, for an expert's layer


def call_block(block: nn.Module, x: torch.Tensor, kwargs: dict, dtype: torch.dtype | None = None) -> torch.Tensor:
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


def discover_groups(block: nn.Module, x: torch.Tensor, kwargs: dict) -> list[list[str]]:
    """Linear layers of ``block`` in forward order, grouped by shared input tensor (q/k/v; gate/up; the gate/up
    layers of every expert when all experts see every token): a group is placed where its first layer runs."""
    linears = linear_modules(block)
    order: list[tuple[str, torch.Tensor]] = []  # keep the input tensors alive: ids of freed tensors are reused
    handles = []
    for name, mod in linears.items():
        def hook(module, args, name=name):
            order.append((name, args[0]))
        handles.append(mod.register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            call_block(block, x[:1], kwargs_for_batch(kwargs, 1))
    finally:
        for h in handles:
            h.remove()
    groups: list[list[str]] = []
    seen: set[str] = set()
    group_of: dict[int, int] = {}  # id of an input tensor (kept alive in ``order``) -> its group
    for name, inp in order:
        if name in seen:
            continue  # a layer called twice is quantized with its first input's group
        seen.add(name)
        if id(inp) in group_of:
            groups[group_of[id(inp)]].append(name)
        else:
            group_of[id(inp)] = len(groups)
            groups.append([name])
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


def accumulate(block: nn.Module, accs: dict[str, HessianAccumulator], inputs, kwargs_list,
               dtype: torch.dtype | None = None) -> None:
    """Run the calibration batches through ``block``, adding the input of each layer named in ``accs`` to its
    Hessian accumulator."""
    linears = linear_modules(block)
    handles = []
    for name, acc in accs.items():
        def hook(module, args, name=name, acc=acc):
            acc.add_batch(args[0], _routed(module))  # NaN/Inf makes the Hessian non-finite: the solver names the layer
        handles.append(linears[name].register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            for x, kw in zip(inputs, kwargs_list):
                call_block(block, x, kw, dtype)
    finally:
        for h in handles:
            h.remove()


class _Aborted(Exception):
    """Ends a batch's forward after another batch failed."""


def sequential_pass(block: nn.Module, groups: list[list[str]], inputs: list[torch.Tensor], kwargs_list: list[dict],
                    quantize_group, dtype: torch.dtype | None = None,
                    new_accumulator: Callable[[int], HessianAccumulator] = HessianAccumulator,
                    park_dir=None) -> list[torch.Tensor]:
    """One forward of every calibration batch through ``block`` that quantizes the block's layer groups on the
    way (true-sequential GPTQ in a single pass).

    Each batch runs in its own thread, and the threads take strict turns (batch 0, 1, ..., n-1), so exactly one
    computes at a time and the Hessian sums are deterministic. When a batch reaches the first layer of a group it
    adds its input to the group's Hessian and hands the turn on; the last batch to arrive calls
    ``quantize_group(group, H, routed)`` (``routed``: the routed token counts per expert of the batches summed into
    ``H``, for the layers of an MoE's experts, else None), which puts the quantized weights in place, and every batch then continues its
    forward with them. The block's outputs are therefore already the quantized block's outputs, and each group
    saw inputs produced by the quantized groups before it, without re-running the block once per group.
    Memory: every batch's activations at the current group are alive at once (about one full-batch forward).
    With ``park_dir`` (a folder), the input each waiting batch holds at a one-layer group (o_proj's attention
    output; down_proj's, the widest) waits in a temporary file there instead, its memory freed, and is read back
    bit for bit when the batch resumes (:func:`gptq_plugin.solver_memory.offloaded`; inputs under
    :data:`PARK_MIN_BYTES` and tensors that do not own their storage stay in memory), and every
    :data:`TRIM_EVERY`-th waiting batch gives the heap's free pages back: the same outputs in less memory, at the
    cost of writing and reading those inputs once. An input shared by several layers (q/k/v, gate/up: a norm's
    output, with only the residual beside it in the block's frames) stays in memory: on the demo model, the passes'
    peak with them in memory, at the o_proj pause where the attention's q, k and v are alive, stays under the
    model load's (docs/reliability.md, "The one pass at 1.4 GB").

    An exception in the calling thread while it waits (``KeyboardInterrupt`` from Ctrl-C, or what a SIGTERM
    handler raises) stops the batches at their next layer group and waits for every batch thread to end before it
    propagates, so no thread outlives the pass (a thread still inside torch when the interpreter exits aborts the
    process: "terminate called without an active exception"). A group being quantized finishes first.

    ``new_accumulator(K)`` makes each group's :class:`~gptq_plugin.solver.HessianAccumulator` (with several ranks:
    one that starts at this rank's first batch and completes the sum across ranks in ``finalize``).

    Returns:
        The block's output for each batch. Groups that no batch reached are passed to ``quantize_group`` with
        ``H=None`` after the pass.
    """
    n = len(inputs)
    linears = linear_modules(block)
    accs = {g[0]: new_accumulator(linears[g[0]].in_features) for g in groups}
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
        accs[head].add_batch(args[0], _routed(module))
        with offloaded(args[0], park_dir if len(by_head[head]) == 1 else None, PARK_MIN_BYTES, "paused activation"):
            if park_dir is not None and (b % TRIM_EVERY == TRIM_EVERY - 1 or b == n - 1):
                release_free_memory()  # what the forwards freed so far: the peak is all batches paused
            if b == n - 1:  # every batch has contributed: quantize the group, then start the next round
                H = accs[head].finalize(allow_empty=True)  # None: only empty batches (an expert no token was routed to)
                quantize_group(by_head[head], H, accs[head].routed, halves=accs[head].take_halves())
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
                outputs[b] = call_block(block, inputs[b], kwargs_list[b], dtype)
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
            with _signals_deferred():  # an interrupt inside Thread.start() could leave a thread _join_all never sees
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
        if g[0] not in done:  # no batch of this rank reached it (nor, for a dense block, of any other rank)
            H = accs[g[0]].finalize(allow_empty=True)
            quantize_group(g, H, accs[g[0]].routed, halves=accs[g[0]].take_halves())
    return outputs


@contextlib.contextmanager
def _signals_deferred():
    """Hold SIGINT and SIGTERM back while the block runs (main thread, where the OS supports it); they are delivered,
    and their Python handlers run, as soon as it ends."""
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "pthread_sigmask"):
        yield
        return
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def _join_all(threads: list[threading.Thread]) -> None:
    """Join ``threads``, carrying on through further interrupts (a second Ctrl-C must not leave them running)."""
    for t in threads:
        while t.is_alive():
            try:
                t.join()
            except BaseException:  # noqa: BLE001 - the first interrupt is already being handled
                pass


def groupwise_pass(block: nn.Module, groups: list[list[str]], inputs: list[torch.Tensor], kwargs_list: list[dict],
                   quantize_group, dtype: torch.dtype | None = None, sink=None,
                   new_accumulator: Callable[[int], HessianAccumulator] = HessianAccumulator,
                   reference: tuple[nn.Module, object] | None = None, reference_sink=None) -> list[torch.Tensor]:
    """The low-memory form of :func:`sequential_pass`, with the same result: for each layer group in forward
    order, run every calibration batch, one at a time, through ``block`` only as far as the group's first layer
    (a forward pre-hook adds the input to the group's Hessian and stops the forward there), quantize the group,
    then go on to the next group; a last full forward gives the block's outputs. Only one batch's activations
    are alive at a time, at the cost of re-running the start of the block once per group (about 2x the
    forward compute of the one-pass driver for a Llama block). With ``sink``, each batch's output is passed to
    ``sink(i, y)`` as soon as it is computed (and an empty list returned), so outputs need not all be held.
    ``new_accumulator``: as in :func:`sequential_pass`.

    ``reference``: GPTAQ's second stream (Li et al., ICML 2025, arXiv 2504.02692), ``(original, fp_inputs)``: an
    unquantized copy of ``block`` and its inputs in the unquantized model, one per batch as ``inputs``. Each
    batch then also runs through ``original`` up to the group's first layer, and the group is quantized with
    ``quantize_group(..., dxxt=2/n Σ (x_fp - x)ᵀ x)`` (fp32 ``[K, K]``, scaled as the Hessian: ``x`` the group's
    input in ``block``, ``x_fp`` in ``original``, summed over the same ``n`` tokens in a fixed tree, as the
    Hessian: :meth:`~gptq_plugin.solver.HessianAccumulator.track_dxxt`); the last forward also gives ``original``'s
    outputs, to ``reference_sink(i, y_fp)``.

    Raises:
        ValueError: (with ``reference``) a batch reaches a group's first layer in ``block`` but not in ``original``,
            or its input there has another shape in ``original``."""
    linears = linear_modules(block)
    ref_linears = None if reference is None else linear_modules(reference[0])
    for g in groups:
        head = g[0]
        acc = new_accumulator(linears[head].in_features)
        if reference is not None:
            acc.track_dxxt()
        seen: dict[str, torch.Tensor] = {}  # the current batch's input to the group in the unquantized block

        def hook(module, args, acc=acc):
            x_fp = None
            if reference is not None:
                x_fp = seen.pop("x", None)
                if x_fp is None:
                    raise ValueError(f"{head}: reached in the block being quantized but not in its unquantized copy")
                if x_fp.shape != args[0].shape:
                    raise ValueError(f"{head}: its input has shape {tuple(args[0].shape)} in the block being "
                                     f"quantized and {tuple(x_fp.shape)} in the unquantized one")
            acc.add_batch(args[0], _routed(module), x_fp=x_fp)
            raise _StopForward

        def ref_hook(module, args):
            seen["x"] = args[0].detach()
            raise _StopForward

        handles = [linears[head].register_forward_pre_hook(hook)]
        if reference is not None:
            handles.append(ref_linears[head].register_forward_pre_hook(ref_hook))
        try:
            with torch.no_grad():
                for i, (x, kw) in enumerate(zip(inputs, kwargs_list)):
                    if reference is not None:
                        try:
                            call_block(reference[0], reference[1][i], kw, dtype)
                        except _StopForward:
                            pass
                    try:
                        call_block(block, x, kw, dtype)
                    except _StopForward:
                        pass
                    seen.clear()
        finally:
            for h in handles:
                h.remove()
        H = acc.finalize(allow_empty=True)
        if reference is None:
            quantize_group(g, H, acc.routed, halves=acc.take_halves())
        else:
            quantize_group(g, H, acc.routed, halves=acc.take_halves(), dxxt=acc.take_dxxt())
    outputs = []
    with torch.no_grad():
        for i, (x, kw) in enumerate(zip(inputs, kwargs_list)):
            if reference is not None:
                reference_sink(i, call_block(reference[0], reference[1][i], kw, dtype))
            y = call_block(block, x, kw, dtype)
            if sink is None:
                outputs.append(y)
            else:
                sink(i, y)
    return outputs
