"""Quantizing with several processes (ranks) on torch.distributed, as ``torchrun`` launches them, with a checkpoint
whose bytes do not depend on the number of ranks.

How the work is shared (the design of llm-compressor's data-parallel GPTQ, with a fixed-order reduction):

* the calibration batches are split into contiguous ranges, one per rank (:meth:`Ranks.batches`); each rank runs
  the embeddings and every decoder block on its own batches only;
* a layer group's Hessian is a sum of per-batch Gram matrices ``xᵀx`` in one fixed binary tree over the global
  batch index (:class:`GramTree`): each rank sums the subtrees inside its range, the ranks exchange those
  partial sums (:meth:`Ranks.all_pieces`) and every rank completes the same tree. Floating-point addition is not
  associative, so this is what makes 1, 2 or 3 ranks (and a run without torch.distributed) give the same bits;
* the layers of a group are solved on their owner ranks (:meth:`Ranks.owners`: the largest first, each to the rank
  with the least work so far) and the results broadcast (:meth:`Ranks.share`), so every rank carries on with the
  same quantized weights;
* rank 0 (:attr:`Ranks.is_writer`) writes the checkpoint and the resume state's manifest; each rank writes the
  activation files of its own batches.

Collectives run with a timeout (``GPTQ_PLUGIN_DIST_TIMEOUT`` seconds, default 1800): a rank that dies or hangs
makes the others fail with one :class:`DistributedError` instead of waiting for ever (under ``torchrun`` the agent
also stops the other ranks when one exits with an error). NCCL on CUDA devices, gloo on CPUs.
"""

from __future__ import annotations

import datetime
import logging
import os
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from .errors import ConfigError, GPTQPluginError

log = logging.getLogger(__name__)

#: seconds a collective may wait for the other ranks before the run fails (``GPTQ_PLUGIN_DIST_TIMEOUT``)
DEFAULT_TIMEOUT_S = 1800


class DistributedError(GPTQPluginError):
    """A collective between the ranks failed: another rank died, was killed, or did not answer within the timeout.
    The message names the step; the progress of finished blocks is kept, so rerunning the command resumes."""


class GramTree:
    """Σ_b P_b over batches ``b`` in ``[0, n)`` in one fixed binary tree, whatever order of ranks computes it.

    Node ``(level, i)`` is the sum of the batches ``[i·2^level, (i+1)·2^level)``: leaves are ``(0, b)``, and node
    ``(l + 1, i)`` is ``node(l, 2i) + node(l, 2i + 1)`` in that order. Pieces are pushed in increasing batch
    order; a piece whose left sibling is on top of the stack is merged into it at once (so at most
    ``log2(n) + 1`` matrices are held). Whatever contiguous ranges of batches are pushed into separate trees, pushing
    their remaining pieces into one tree in order gives the same nodes, bit for bit, as one tree fed every batch;
    :meth:`total` then adds the leftover nodes (``n`` not a power of two) from the left.
    """

    def __init__(self):
        self.stack: list[tuple[int, int, torch.Tensor]] = []

    def push(self, level: int, index: int, t: torch.Tensor) -> None:
        """Add node ``(level, index)`` holding ``t`` (taken over: it may be summed into in place)."""
        while self.stack and index % 2 == 1 and self.stack[-1][:2] == (level, index - 1):
            _, _, left = self.stack.pop()
            t = left.add_(t)  # left + right, in place in the left child's buffer
            level, index = level + 1, index // 2
        self.stack.append((level, index, t))

    def total(self) -> torch.Tensor | None:
        """The sum of every pushed batch (None when nothing was pushed); the tree gives up its buffers."""
        if not self.stack:
            return None
        acc = self.stack[0][2]
        for _, _, t in self.stack[1:]:
            acc.add_(t)
        self.stack = []
        return acc


@dataclass
class Ranks:
    """This process's place among the ranks of one quantization run (one rank, without torch.distributed: the
    default :data:`SINGLE`).

    Attributes:
        rank, world: this rank and the number of ranks.
        device: the device this rank computes on (``cuda:LOCAL_RANK`` for CUDA runs under torchrun).
        timeout_s: seconds a collective waits for the other ranks.
    """

    rank: int = 0
    world: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    timeout_s: float = DEFAULT_TIMEOUT_S

    @property
    def is_writer(self) -> bool:
        """Whether this rank writes the checkpoint, the report and the resume manifest (rank 0)."""
        return self.rank == 0

    @property
    def _comm(self) -> torch.device:
        """Where tensors must be for the collectives: the CUDA device for NCCL, else the CPU (gloo)."""
        return self.device if self.device.type == "cuda" else torch.device("cpu")

    def batches(self, n: int) -> range:
        """This rank's calibration batches out of ``n``: the contiguous range ``[r·n/w, (r+1)·n/w)``.

        Raises:
            ConfigError: fewer batches than ranks (a rank would have nothing to compute).
        """
        if n < self.world:
            raise ConfigError(f"{n} calibration batches for {self.world} ranks: every rank needs at least one batch; "
                              f"use fewer ranks, more calibration samples (--nsamples) or a smaller --batch-size")
        return range(self.rank * n // self.world, (self.rank + 1) * n // self.world)

    def owners(self, costs: Sequence[float]) -> list[int]:
        """The rank that solves each of a group's layers, given their relative costs: largest first, each to the
        rank with the least work so far (ties: the lower rank). The same on every rank."""
        load = [0.0] * self.world
        owner = [0] * len(costs)
        for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
            r = min(range(self.world), key=lambda r: (load[r], r))
            owner[i] = r
            load[r] += costs[i]
        return owner

    def _call(self, what: str, fn: Callable, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except RuntimeError as e:  # torch.distributed's backend errors (a closed connection, a timeout)
            raise DistributedError(
                f"rank {self.rank} of {self.world}: {what} failed: another rank died, was killed or did not answer "
                f"within {self.timeout_s:g} s ({_first_sentence(e)}); the finished blocks are kept: rerun the same "
                "command to resume") from None

    def all_pieces(self, tree: GramTree, tokens, shape: tuple[int, int]) -> tuple[GramTree, object]:
        """Every rank's pieces of one :class:`GramTree`, pushed in rank order into one new tree, and the total of
        ``tokens`` (an int, or a tuple of ints, lists of ints and Nones, summed element by element): the same on every
        rank. ``shape``: the pieces' ``[K, K]``."""
        if self.world == 1:
            return tree, tokens
        import torch.distributed as dist

        merged = GramTree()
        total = None
        for src in range(self.world):
            meta = [[(l, i) for l, i, _ in tree.stack], tokens] if src == self.rank else [None, None]
            self._call("exchanging Hessian pieces", dist.broadcast_object_list, meta, src=src)
            labels, n = meta
            total = n if total is None else _plus(total, n)
            for k, (level, index) in enumerate(labels):
                if src == self.rank:
                    t = tree.stack[k][2].to(self._comm)
                else:
                    t = torch.empty(shape, dtype=torch.float32, device=self._comm)
                self._call("exchanging Hessian pieces", dist.broadcast, t, src=src)
                merged.push(level, index, t.to(self.device))
        tree.stack = []
        return merged, total

    def share(self, tensors: dict[str, torch.Tensor] | None, meta: object, src: int
              ) -> tuple[dict[str, torch.Tensor], object]:
        """Broadcast rank ``src``'s ``tensors`` (CPU tensors, any dtype) and picklable ``meta``; every rank returns
        them (on the CPU)."""
        if self.world == 1:
            return tensors, meta
        import torch.distributed as dist

        head = [None]
        if self.rank == src:
            head = [(meta, {k: (tuple(t.shape), t.dtype) for k, t in tensors.items()})]
        self._call("sharing a quantized layer", dist.broadcast_object_list, head, src=src)
        meta, layout = head[0]
        out = {}
        for k, (shape, dtype) in layout.items():
            t = (tensors[k].contiguous().to(self._comm) if self.rank == src
                 else torch.empty(shape, dtype=dtype, device=self._comm))
            self._call("sharing a quantized layer", dist.broadcast, t, src=src)
            out[k] = t.cpu()
        return out, meta

    def barrier(self, what: str) -> None:
        """Wait until every rank got here (``what``: the step, for the error)."""
        if self.world > 1:
            import torch.distributed as dist

            self._call(what, dist.barrier)

    def on_writer(self, what: str, fn: Callable[[], object]) -> object:
        """Run ``fn`` on rank 0 and give its result (pickled) to every rank; an error it raises is raised on every
        rank (a :class:`~gptq_plugin.errors.GPTQPluginError` with the same message on the others)."""
        if self.world == 1:
            return fn()
        import torch.distributed as dist

        box: list = [None]
        error = None
        if self.is_writer:
            try:
                box = [("ok", fn())]
            except GPTQPluginError as e:
                error, box = e, [("error", (type(e), str(e)))]
            except BaseException as e:
                error, box = e, [("error", (GPTQPluginError, f"rank 0: {what}: {type(e).__name__}: {e}"))]
        self._call(what, dist.broadcast_object_list, box, src=0)
        kind, value = box[0]
        if kind == "error":
            if error is not None:
                raise error
            cls, msg = value
            raise cls(msg)
        return value

    def gather(self, value: object, what: str) -> list:
        """Every rank's ``value`` (picklable), in rank order, on every rank."""
        if self.world == 1:
            return [value]
        import torch.distributed as dist

        values: list = [None] * self.world
        self._call(f"gathering the {what}", dist.all_gather_object, values, value)
        return values

    def agree(self, value: object, what: str) -> None:
        """Check that ``value`` (picklable, comparable) is the same on every rank.

        Raises:
            ConfigError: ranks disagree (names the ranks and the first differing key of a dict).
        """
        if self.world == 1:
            return
        values = self.gather(value, what)
        for r, v in enumerate(values):
            if v != values[0]:
                keys = ""
                if isinstance(v, dict) and isinstance(values[0], dict):
                    diff = sorted(k for k in set(v) | set(values[0]) if v.get(k) != values[0].get(k))
                    keys = f" (differs in: {', '.join(map(str, diff))})"
                raise ConfigError(f"rank {r} was started with another {what} than rank 0{keys}: start every rank with "
                                  "the same command, model, calibration data and library versions")


#: one process, no torch.distributed
SINGLE = Ranks()


def _plus(a, b):
    """``a + b`` for token counts: ints, None (nothing), and tuples/lists of them element by element."""
    if a is None or b is None:
        return b if a is None else a
    if isinstance(a, (tuple, list)):
        return type(a)(_plus(x, y) for x, y in zip(a, b))
    return a + b


def _first_sentence(e: BaseException) -> str:
    """The backend's message without its source location and advice (gloo: ``[.../pair.cc:537] Read error
    [127.0.0.1]:1688: Connection reset by peer. This is typically ...``)."""
    text = (str(e).splitlines() or [""])[0]
    if text.startswith("[") and "] " in text:
        text = text.split("] ", 1)[1]
    return f"{type(e).__name__}: {text.split('. ')[0].rstrip('.')}"


def under_torchrun() -> bool:
    """Whether this process was started by ``torchrun`` (or another launcher setting ``WORLD_SIZE`` and ``RANK``)."""
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``"auto"``/None: ``cuda`` when torch sees a CUDA device, else ``cpu``; otherwise ``device`` itself
    (``cpu``, ``cuda``, ``cuda:N``; under torchrun a plain ``cuda`` becomes ``cuda:LOCAL_RANK``).

    Raises:
        ConfigError: an unknown device string, or a CUDA device that torch does not see.
    """
    if device is None or str(device) == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ConfigError(f"--device {device}: not a device ({e}); use auto, cpu, cuda or cuda:N") from None
    if dev.type not in ("cpu", "cuda"):
        raise ConfigError(f"--device {device}: quantization runs on cpu or cuda; use auto, cpu, cuda or cuda:N")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"--device {device}: torch sees no CUDA device (torch {torch.__version__}); use --device "
                              "cpu, or install a CUDA build of torch")
        if dev.index is None:
            dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)) if under_torchrun() else 0)
        if dev.index >= torch.cuda.device_count():
            raise ConfigError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) are visible")
    return dev


def init_ranks(device: torch.device, timeout_s: float | None = None) -> Ranks:
    """This process's :class:`Ranks`: :data:`SINGLE` (on ``device``) outside torchrun; under torchrun, joins the
    process group (NCCL for CUDA, gloo for CPU; torchrun's rendezvous: ``MASTER_ADDR``/``MASTER_PORT`` or
    ``--rdzv-endpoint``, single host or ``--nnodes``) with a ``timeout_s`` (default ``GPTQ_PLUGIN_DIST_TIMEOUT`` or
    1800 s) on every collective.

    Raises:
        DistributedError: the process group cannot be formed (the message says what torch.distributed reported).
    """
    if timeout_s is None:
        timeout_s = float(os.environ.get("GPTQ_PLUGIN_DIST_TIMEOUT", DEFAULT_TIMEOUT_S))
    if not under_torchrun():
        return Ranks(device=device, timeout_s=timeout_s)
    import torch.distributed as dist

    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        try:
            dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
        except (RuntimeError, ValueError) as e:
            raise DistributedError(f"rank {os.environ.get('RANK')}: cannot join the process group ({backend}): {e}"
                                   ) from None
    ranks = Ranks(dist.get_rank(), dist.get_world_size(), device, timeout_s)
    log.info("rank %d of %d on %s (%s)", ranks.rank, ranks.world, device, backend)
    return ranks


def close_ranks(ranks: Ranks) -> None:
    """Leave the process group (after the run; a no-op for one rank)."""
    if ranks.world > 1 or (torch.distributed.is_available() and torch.distributed.is_initialized()):
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
