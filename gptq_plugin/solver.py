"""GPTQ on one weight matrix (Frantar et al., "GPTQ: Accurate Post-Training Quantization for Generative
Pre-trained Transformers", ICLR 2023, Algorithm 1: Cholesky form of the inverse Hessian, lazy batch updates).

Reads top to bottom like the paper and the reference code (IST-DASLab/gptq ``gptq.py``): accumulate
``H = 2 X Xᵀ``, zero dead columns, optional act-order permutation, dampen, take the upper Cholesky factor of
``H⁻¹``, quantize block by block with error feedback, one lazy matmul per block, un-permute. How the Hessian is
borrowed in place, permuted without a copy and parked on disk during the column loop is
:mod:`gptq_plugin.solver_memory`'s business.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass

import torch

from .config import DAMP_CANDIDATES, QuantizeConfig
from .distributed import SINGLE, GramTree, Ranks
from .errors import NumericalError
from .grid import dequantize, find_params, quantize
from .packing import default_g_idx, num_groups
from .solver_memory import all_finite, borrow, offloaded, one_thread, permuted

log = logging.getLogger(__name__)


#: :func:`gram_matrix` splits the ``K`` columns into tiles at least this wide (and at most 16 tiles)
GRAM_TILE = 256


def gram_matrix(x: torch.Tensor) -> torch.Tensor:
    """``xᵀ x`` for ``x`` of shape ``[T, K]`` (``[K, K]``, ``x``'s dtype and device), computing only the tiles on and
    above the diagonal and mirroring the rest (the Gram matrix is symmetric), in GEMM calls on column slices. Each
    entry is the same dot product over the same ``T`` rows; with the CPU wheel's BLAS the result equals
    ``x.t() @ x`` bit for bit, 1.3-1.8x faster at one thread for ``K`` 576-11008 (benchmarks/gram_bench.py).
    Tiles: :data:`GRAM_TILE` columns, or ``K/16`` rounded up to 64 when wider; ``K`` up to one tile: one GEMM."""
    K = x.shape[1]
    width = max(GRAM_TILE, (-(-K // 16) + 63) // 64 * 64)
    if K <= width:
        return x.t() @ x
    g = x.new_empty(K, K)
    edges = list(range(0, K, width)) + [K]
    for i in range(len(edges) - 1):
        rows = slice(edges[i], edges[i + 1])
        a = x[:, rows].t()
        for j in range(i, len(edges) - 1):
            cols = slice(edges[j], edges[j + 1])
            tile = a @ x[:, cols]
            g[rows, cols] = tile
            if j != i:
                g[cols, rows] = tile.t()
    return g


class HessianAccumulator:
    """``H = 2/n Σ_b x_bᵀ x_b`` over the calibration batches ``b`` that reach one linear layer (``n``: their
    tokens). Each batch's Gram matrix ``x_bᵀ x_b`` is one leaf of a fixed binary tree over the global batch index
    (:class:`~gptq_plugin.distributed.GramTree`), so the sum has the same bits whether one process adds every batch
    or several ranks add their own batches and complete the tree in :meth:`finalize`.

    Memory: up to ``log2(batches) + 1`` fp32 ``[K, K]`` matrices while batches are added (5 for 16 batches); with
    ``heldout``, up to ``2 log2(batches/2) + 2`` (8 for 16 batches).

    Args:
        in_features: width ``K`` of the layer input; ``H`` is fp32 ``[K, K]``, on the inputs' device.
        first_batch: the global index of the first batch added here (a rank's first batch,
            :meth:`~gptq_plugin.distributed.Ranks.batches`); later ones follow in order.
        ranks: the ranks that complete the sum in :meth:`finalize` (default: this process alone).
        heldout: also keep the Hessians of the even and of the odd batches apart (:attr:`halves` after
            :meth:`finalize`, for :func:`choose_damp`): two trees over the global batch index ``b // 2`` instead of
            one, so ``H`` is their sum (other last bits than without) and the same on any number of ranks.
            :meth:`finalize` then returns ``H`` and keeps the two halves until :meth:`take_halves`: three ``[K, K]``
            matrices instead of one.
    """

    def __init__(self, in_features: int, first_batch: int = 0, ranks: Ranks | None = None, heldout: bool = False):
        self.in_features, self.ranks = in_features, ranks or SINGLE
        self.tree: GramTree | None = GramTree()  # every batch; with ``heldout``, the even batches
        self.odd: GramTree | None = GramTree() if heldout else None
        self.next_batch = self.first_batch = first_batch
        self.n = 0
        self.n_half = [0, 0]
        self.routed: list[int] | None = None
        self.halves: tuple[torch.Tensor, torch.Tensor] | None = None
        self.asym: GramTree | None = None  # GPTAQ's Σ (x_fp - x)ᵀ x, after track_dxxt()
        self.dxxt: torch.Tensor | None = None

    def track_dxxt(self) -> None:
        """Also sum GPTAQ's asymmetric term ``dXXT = 2/n Σ_b (x_fp,b - x_b)ᵀ x_b`` (Li et al., ICML 2025, arXiv
        2504.02692; fp32 ``[K, K]``, scaled as ``H``): every :meth:`add_batch` must then pass ``x_fp``, the batch's
        input to the layer in the unquantized model. Each batch's product is a leaf of its own
        :class:`~gptq_plugin.distributed.GramTree` over the global batch index (with ``heldout`` too), so the sum has
        the same bits on any number of ranks; :meth:`finalize` completes it (:meth:`take_dxxt`). Call it before the
        first batch, on every rank.

        Raises:
            RuntimeError: a batch was already added.
        """
        if self.n or self.tree is None or self.next_batch != self.first_batch:
            raise RuntimeError("HessianAccumulator.track_dxxt() must be called before the first batch")
        self.asym = GramTree()

    def add_batch(self, x: torch.Tensor, routed: list[int] | None = None, x_fp: torch.Tensor | None = None) -> None:
        """Add one batch of inputs ``x`` of shape ``[..., K]`` (any float dtype; every row is one token) as the next
        leaf. Always fp32, also when called from a forward hook under autocast. ``routed``: for a layer of an MoE's
        experts, the batch's routed token count per expert, summed into :attr:`routed` (all ranks' after
        :meth:`finalize`). ``x_fp``: after :meth:`track_dxxt` (and only then), the same tokens' input in the
        unquantized model, of ``x``'s shape.

        Raises:
            ValueError: ``x_fp`` missing after :meth:`track_dxxt`, given without it, or of another shape than ``x``.
        """
        if self.tree is None:
            raise RuntimeError("HessianAccumulator.finalize() was already called")
        if (x_fp is None) != (self.asym is None):
            raise ValueError("x_fp is needed after track_dxxt(), and only then")
        x = x.reshape(-1, x.shape[-1]).float()
        with torch.autocast(device_type=x.device.type, enabled=False):
            gram = gram_matrix(x)
            if self.asym is not None:
                x_fp = x_fp.reshape(-1, x_fp.shape[-1]).float()
                if x_fp.shape != x.shape:
                    raise ValueError(f"x_fp has shape {tuple(x_fp.shape)}, x {tuple(x.shape)}: they must be the same "
                                     "tokens")
                self.asym.push(0, self.next_batch, (x_fp - x).t() @ x)
        b = self.next_batch
        if self.odd is None:
            self.tree.push(0, b, gram)
        else:
            (self.odd if b % 2 else self.tree).push(0, b // 2, gram)
            self.n_half[b % 2] += x.shape[0]
        self.next_batch += 1
        self.n += x.shape[0]
        if routed is not None:
            self.routed = list(routed) if self.routed is None else [a + b for a, b in zip(self.routed, routed)]

    def finalize(self, allow_empty: bool = False) -> torch.Tensor | None:
        """``H = 2/n Σ x xᵀ`` (fp32 ``[K, K]``, on the inputs' device), every rank's batches included: a collective
        when there are several ranks (every rank calls it, in the same order). The accumulator cannot be used
        afterwards.

        Raises:
            NumericalError: no calibration token reached the layer on any rank (with ``allow_empty``: returns None).
            DistributedError: another rank failed meanwhile.
        """
        if self.tree is None:
            raise RuntimeError("HessianAccumulator.finalize() was already called")
        tree, self.tree = self.tree, None
        shape = (self.in_features, self.in_features)
        if self.asym is not None:  # first, on every rank: the collectives run in the same order everywhere
            asym, self.asym = self.asym, None
            asym, n = self.ranks.all_pieces(asym, self.n, shape)
            D = asym.total()
            self.dxxt = None if D is None or n == 0 else D.mul_(2.0 / n)
        if self.odd is not None:
            return self._finalize_halves(tree, shape, allow_empty)
        tree, (n, self.routed) = self.ranks.all_pieces(tree, (self.n, self.routed), shape)
        H = tree.total()
        if n == 0 or H is None:
            if allow_empty:
                return None
            raise NumericalError("no calibration tokens reached this layer: its Hessian is undefined")
        return H.mul_(2.0 / n)

    def _finalize_halves(self, even: GramTree, shape: tuple[int, int], allow_empty: bool) -> torch.Tensor | None:
        """:meth:`finalize` with ``heldout``: ``H`` is the even batches' sum plus the odd ones', and :attr:`halves`
        each half's own ``2/n_k Σ x xᵀ`` (None when a half saw no token)."""
        odd, self.odd = self.odd, None
        even, (n_even, self.routed) = self.ranks.all_pieces(even, (self.n_half[0], self.routed), shape)
        odd, n_odd = self.ranks.all_pieces(odd, self.n_half[1], shape)
        He, Ho = even.total(), odd.total()
        if n_even + n_odd == 0 or (He is None and Ho is None):
            if allow_empty:
                return None
            raise NumericalError("no calibration tokens reached this layer: its Hessian is undefined")
        if He is None or Ho is None or n_even == 0 or n_odd == 0:
            return (Ho if He is None else He if Ho is None else He + Ho).mul_(2.0 / (n_even + n_odd))
        H = (He + Ho).mul_(2.0 / (n_even + n_odd))
        self.halves = (He.mul_(2.0 / n_even), Ho.mul_(2.0 / n_odd))
        return H

    def take_dxxt(self) -> torch.Tensor | None:
        """GPTAQ's ``dXXT`` from :meth:`finalize` after :meth:`track_dxxt` (fp32 ``[K, K]``; None without, or when no
        token reached the layer), handed over."""
        dxxt, self.dxxt = self.dxxt, None
        return dxxt

    def take_halves(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The even and the odd batches' Hessians from :meth:`finalize` with ``heldout`` (None without, or when a
        half saw no token), handed over: the accumulator no longer holds them."""
        halves, self.halves = self.halves, None
        return halves


@dataclass
class QuantResult:
    """One quantized weight matrix in GPTQ terms.

    Attributes:
        codes: int32 ``[out, in]``, integers in ``[0, 2**bits)``.
        scales: fp16 ``[n_groups, out]``.
        zeros: int32 ``[n_groups, out]``, the true zero points (not v1's ``zero - 1``).
        g_idx: int32 ``[in]``, the group of each input channel.
        bits, group_size, sym: the grid's config (``group_size`` -1: one group per row), as the packed layer and
            the checkpoint record them.
        damp_percent: the dampening actually used (after automatic increases), or 0 for RTN.
        fallback: why GPTQ fell back to RTN for this layer, or None.
    """

    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    g_idx: torch.Tensor
    bits: int
    group_size: int
    sym: bool
    damp_percent: float = 0.0
    fallback: str | None = None

    def to(self, device: torch.device | str) -> "QuantResult":
        """This result with its tensors on ``device`` (itself when they are there already)."""
        if self.codes.device == torch.device(device):
            return self
        return QuantResult(self.codes.to(device), self.scales.to(device), self.zeros.to(device), self.g_idx.to(device),
                           self.bits, self.group_size, self.sym, self.damp_percent, self.fallback)

    def dequantize(self, rows: slice = slice(None)) -> torch.Tensor:
        """fp32 ``[out, in]`` (or the output ``rows``): ``scales[g_idx] * (codes - zeros[g_idx])`` transposed to the
        weight layout."""
        g = self.g_idx.long()
        s = self.scales[:, rows].float()[g].t()  # [out, in]
        z = self.zeros[:, rows].float()[g].t()
        return s * (self.codes[rows].float() - z)


def _group_params(W: torch.Tensor, cfg: QuantizeConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Static grid of every group of ``W`` ``[out, in]`` in input order: ``(scales, zeros)`` fp32 ``[G, out]``.

    The full groups go through :func:`find_params` in one call (its rows are independent: ``[G * out, gs]``), the
    partial last group, if any, in a second."""
    rows, cols = W.shape
    gs = cols if cfg.group_size == -1 else cfg.group_size
    full = cols // gs
    scales, zeros = [], []
    if full:
        blocks = W[:, :full * gs].reshape(rows, full, gs).transpose(0, 1).reshape(full * rows, gs)
        s, z = find_params(blocks, cfg.bits, cfg.sym, cfg.mse)
        scales.append(s.reshape(full, rows))
        zeros.append(z.reshape(full, rows))
    if full * gs < cols:
        s, z = find_params(W[:, full * gs:], cfg.bits, cfg.sym, cfg.mse)
        scales.append(s[None])
        zeros.append(z[None])
    return torch.cat(scales), torch.cat(zeros)


def rtn_quantize(W: torch.Tensor, cfg: QuantizeConfig,
                 grid: tuple[torch.Tensor, torch.Tensor] | None = None) -> QuantResult:
    """Round-to-nearest on the same grid as GPTQ (the baseline; no calibration data).

    Args:
        W: ``[out, in]`` weight, any float dtype.
        grid: ``(scales, zeros)`` ``[G, out]`` in input order to round onto (e.g. GPTQ's static groups, which are
            computed the same way), instead of computing them.
    """
    W = W.float()
    maxq = 2**cfg.bits - 1
    scales, zeros = (grid[0].float(), grid[1].float()) if grid is not None else _group_params(W, cfg)
    g_idx = default_g_idx(W.shape[1], cfg.group_size).to(W.device)
    g = g_idx.long()
    codes = quantize(W, scales[g].t(), zeros[g].t(), maxq)
    return QuantResult(codes.to(torch.int32), scales.half(), zeros.to(torch.int32), g_idx, cfg.bits, cfg.group_size,
                       cfg.sym)


def gptq_quantize(W: torch.Tensor, H: torch.Tensor, cfg: QuantizeConfig, name: str = "layer",
                  offload_dir: str | os.PathLike | None = None,
                  halves: tuple[torch.Tensor, torch.Tensor] | None = None,
                  dxxt: torch.Tensor | None = None, gptaq_alpha: float = 0.25) -> QuantResult:
    """Quantize one weight matrix with GPTQ, in fp32 throughout (also when called under autocast: the driver calls
    it from a forward hook).

    Args:
        W: ``[out, in]`` weight (any float dtype; computed in fp32; not modified).
        H: ``[in, in]`` Hessian ``2/n Σ x xᵀ`` of the layer's calibration inputs. When fp32 and contiguous (as
            :class:`HessianAccumulator` gives it) it is borrowed: the solver permutes and dampens it in place
            (saving a Hessian-sized copy) and restores it, bit for bit, before returning or raising; do not read
            it from another thread meanwhile. Otherwise (or for an inference-mode tensor) the solver works on an
            fp32 copy.
        cfg: bits, group_size, desc_act, act_group_aware, static_groups, sym, damp_percent, mse, block_size.
        name: the layer's name, for log lines.
        offload_dir: a folder where a Hessian of :data:`OFFLOAD_MIN_BYTES` or more is parked during the column
            loop, which needs only its inverse Cholesky factor (the peak is then one Hessian-sized buffer plus
            the weight, not two). None keeps it in memory.
        halves: with ``cfg.damp_auto``, the Hessians of two disjoint halves of the calibration batches
            (:meth:`HessianAccumulator.take_halves`): the dampening is chosen by :func:`choose_damp` before ``H`` is
            solved with it. Without them (or without ``damp_auto``) ``cfg.damp_percent`` is used.
        dxxt: GPTAQ's asymmetric calibration term (Li et al., "GPTAQ: Efficient Finetuning-Free Quantization for
            Asymmetric Calibration", ICML 2025, arXiv 2504.02692; GPTQModel's ``gptaq``): fp32 ``[in, in]``
            ``2/n Σ (x_fp - x) xᵀ``, scaled as ``H``, where ``x`` is a token's input to this layer in the model
            whose earlier layers are already quantized (the inputs ``H`` was summed from) and ``x_fp`` the same
            token's input in the original model. With it the column loop targets the original model's output
            ``W x_fp`` instead of ``W x``: each column's update gains ``w · P[i, i:]`` with ``P = gptaq_alpha ·
            triu(dxxt · Uᵀ, 1) · U`` (``U``: the upper Cholesky factor of the inverse Hessian), as the reference
            code does (GPTQv2, ``gptq.py``; GPTQModel 7.7 ``quantization/gptaq.py``), and ``cfg.refit_scales`` fits
            the same target. Not modified. None: plain GPTQ.
        gptaq_alpha: the weight of ``dxxt``'s term (the reference code's ``alpha``, 0.25 by default).

    Returns:
        :class:`QuantResult`. When ``H`` stays non positive definite for every dampening below 1, the layer
        falls back to RTN and ``fallback`` says so (logged as a warning). ``damp_percent`` is the dampening used.

    Raises:
        NumericalError: ``W`` or ``H`` contains NaN or Inf.
        ValueError: ``H`` (or ``dxxt``) is not ``[in, in]``.
    """
    with torch.autocast(device_type=W.device.type, enabled=False):
        if cfg.damp_auto and halves is not None:
            with offloaded(H, offload_dir, OFFLOAD_MIN_BYTES):  # the full Hessian waits on disk meanwhile
                damp, _ = choose_damp(W, halves[0], halves[1], cfg, name, offload_dir)
            cfg = dataclasses.replace(cfg, damp_percent=damp, damp_auto=False)
        return _gptq_quantize(W, H, cfg, name, offload_dir, dxxt, gptaq_alpha)


def choose_damp(W: torch.Tensor, H_fit: torch.Tensor, H_held: torch.Tensor, cfg: QuantizeConfig,
                name: str = "layer", offload_dir: str | os.PathLike | None = None) -> tuple[float, list[float]]:
    """The dampening of :data:`~gptq_plugin.config.DAMP_CANDIDATES` whose GPTQ result, solved on one half of the
    calibration data, has the lowest output error on the other half: for each candidate ``d``, ``ΔW = W - Ŵ_d``
    with ``Ŵ_d`` quantized by :func:`gptq_quantize` (``cfg``'s recipe, dampening ``d``) from ``H_fit``, scored by
    ``tr(ΔW H_held ΔWᵀ)``. Scored on the data it was solved on, the smallest dampening nearly always wins; on
    held-out data the dampening is chosen as a regulariser's strength is (a validation split, as for ridge
    regression's ``λ``).
    Ties go to the smaller dampening. A candidate whose solve fell back to RTN scores ``inf``; one whose Hessian
    needed more dampening (``damp_auto_increment``) stands for the dampening it used. The candidates' log lines
    name the layer with "(damp_auto candidate d)".

    Cost: one GPTQ solve per candidate on top of the final one.

    Args:
        W: ``[out, in]`` weight (any float dtype; not modified).
        H_fit, H_held: fp32 ``[in, in]`` Hessians of two disjoint halves of the calibration batches (``H_fit`` is
            borrowed as :func:`gptq_quantize` borrows ``H`` and given back bit for bit; ``H_held`` is read).
        offload_dir: as in :func:`gptq_quantize`, for each candidate's solve.

    Returns:
        ``(damp, scores)``: the chosen dampening and each candidate's held-out error (same order as the
        candidates).
    """
    W32 = W.detach().float()
    scores, used = [], []
    for d in DAMP_CANDIDATES:
        res = _gptq_quantize(W, H_fit, dataclasses.replace(cfg, damp_percent=d, damp_auto=False),
                             f"{name} (damp_auto candidate {d:g})", offload_dir)
        used.append(res.damp_percent)
        if res.fallback is not None:
            scores.append(float("inf"))
            continue
        D = W32 - res.dequantize().to(W32.device)
        scores.append(float(torch.sum((D @ H_held) * D)))
        del D, res
    best = min(range(len(scores)), key=lambda i: (scores[i], i))
    log.debug("%s: held-out error by damp_percent %s: %s", name, DAMP_CANDIDATES, scores)
    return used[best], scores


#: Hessians at least this large (bytes) are written to ``offload_dir`` during the column loop (a 7B ``down_proj``'s
#: 11008-wide Hessian is 0.48 GB; a 4096-wide one, 67 MB, stays).
OFFLOAD_MIN_BYTES = 1 << 27


def _gptq_quantize(W: torch.Tensor, H: torch.Tensor, cfg: QuantizeConfig, name: str,
                   offload_dir: str | os.PathLike | None, dxxt: torch.Tensor | None = None,
                   gptaq_alpha: float = 0.25) -> QuantResult:
    """:func:`gptq_quantize` (its arguments, result and errors), the paper's steps in order."""
    W = W.detach()
    columns = W.shape[1]
    if tuple(H.shape) != (columns, columns):
        raise ValueError(f"{name}: the Hessian has shape {tuple(H.shape)}, expected [{columns}, {columns}]")
    H = borrow(H)  # the caller's fp32 [in, in] tensor, changed in place and given back bit for bit
    if not all_finite(W):
        raise NumericalError(f"{name}: the weight contains NaN or Inf; fix the source model")
    if not all_finite(H):
        raise NumericalError(f"{name}: the Hessian contains NaN or Inf (calibration activations overflowed)")
    if dxxt is not None and tuple(dxxt.shape) != (columns, columns):
        raise ValueError(f"{name}: GPTAQ's dxxt has shape {tuple(dxxt.shape)}, expected [{columns}, {columns}]")
    if dxxt is not None and not all_finite(dxxt):
        raise NumericalError(f"{name}: GPTAQ's dxxt contains NaN or Inf (calibration activations overflowed)")

    dead = H.diagonal() == 0  # input channels that never saw a non-zero activation
    perm = invperm = None
    if cfg.desc_act:  # act-order: columns by decreasing Hessian diagonal
        perm = torch.argsort(H.diagonal().masked_fill(dead, 1), descending=True, stable=True)
    elif cfg.act_group_aware:  # whole groups by importance, g_idx stays in input order
        perm = group_aware_order(H.diagonal().masked_fill(dead, 1), cfg.group_size)
    if perm is not None:
        invperm = torch.argsort(perm)

    def zeroed(order: torch.Tensor | None = None) -> torch.Tensor:
        """The solver's own fp32 copy of ``W``, dead columns zeroed, columns in ``order`` (input order if None)."""
        Wz = W.float().clone() if order is None else W.float()[:, order]
        Wz[:, dead if order is None else dead[order]] = 0
        return Wz

    static = _group_params(zeroed(), cfg) if cfg.static_groups else None  # ([G, out], [G, out]), input order
    A = None  # gptaq_alpha · dxxt, dead channels' rows and columns zeroed, input order
    if dxxt is not None:
        A = dxxt.float() * gptaq_alpha
        A[dead, :] = 0
        A[:, dead] = 0
    with permuted(H, perm):  # H[perm][:, perm] in place; its diagonal dampened
        H.diagonal()[dead if perm is None else dead[perm]] = 1
        Hinv, damp = _damped_inverse_cholesky(H, cfg.damp_percent, cfg.damp_auto_increment, name)
        solved = Hinv is not None
        if solved:
            with offloaded(H, offload_dir, OFFLOAD_MIN_BYTES):  # the loop needs only Hinv
                P = None
                if A is not None:  # GPTAQ's P = α · triu(dXXT Uᵀ, 1) U, in the loop's column order
                    Ap = A if perm is None else A[perm][:, perm]
                    P = torch.triu(Ap @ Hinv.t(), diagonal=1) @ Hinv
                    del Ap
                codes, scales, zeros, col_group = _column_loop(zeroed(perm), Hinv, cfg, perm, static, P)
                del Hinv, P  # before H comes back
    if not solved:
        reason = f"Hessian not positive definite for any damp_percent < 1 (last tried {damp:g}): fell back to RTN"
        log.warning("%s: %s", name, reason)
        res = rtn_quantize(zeroed(), cfg)
        res.fallback = reason
        return res
    g_idx = col_group.to(torch.int32)
    if invperm is not None:
        codes = codes[:, invperm]
        g_idx = g_idx[invperm]
    if cfg.refit_scales:
        scales = refit_scales(zeroed(), H, codes, scales, zeros, g_idx, damp, A)
    return QuantResult(codes, scales.half(), zeros.to(torch.int32), g_idx.contiguous(), cfg.bits, cfg.group_size,
                       cfg.sym, damp_percent=damp)


def refit_scales(W: torch.Tensor, H: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                 g_idx: torch.Tensor, damp: float, asym: torch.Tensor | None = None) -> torch.Tensor:
    """Least-squares scales for fixed codes: for every output row ``r``, the group scales ``s_r`` that minimise the
    layer's output error ``(w_r - ŵ_r)ᵀ (H + λI) (w_r - ŵ_r)`` with ``ŵ_r[j] = s_r[g(j)] · (codes[r, j] -
    zeros[g(j), r])`` (``λ``: the dampening GPTQ used, ``damp · mean(diag H)``), i.e. the ``[G, G]`` normal equations
    ``(Cᵀ H C) s = Cᵀ H w`` of each row. It is the full-Hessian form of the importance-weighted scale fit that
    llama.cpp's quantizers run per block with a diagonal weight (``make_qx_quants`` with an imatrix). Zero points and
    codes stay, so the checkpoint format is unchanged. A row keeps its GPTQ scales unless the refit ones (rounded to
    fp16, as stored) are finite, positive and lower its error.

    Args:
        W: fp32 ``[out, in]`` original weight (dead input channels zeroed), input order.
        H: fp32 ``[in, in]`` Hessian in input order, undamped (not modified).
        codes: int ``[out, in]``; scales, zeros: ``[G, out]``; g_idx: ``[in]`` group of each input channel.
        damp: the ``damp_percent`` GPTQ used.
        asym: GPTAQ's ``gptaq_alpha · dxxt`` (:func:`gptq_quantize`), input order, or None. With it the fit
            targets the original model's output: the error is ``Σ ‖ŵ_r x - w_r x_fp‖²`` and the right-hand side
            ``Cᵀ (H + asym)ᵀ w`` (``Σ x x_fpᵀ = H + dxxtᵀ``).

    Returns:
        fp32 ``[G, out]`` scales.
    """
    G, rows = scales.shape
    g = g_idx.long()
    C = codes.float() - zeros.float()[g].t()  # [out, in]: ŵ = C · s[g]
    lam = damp * torch.mean(H.diagonal())
    M = torch.empty(rows, G, G, device=W.device)
    for h in range(G):
        cols = (g == h).nonzero().squeeze(1)
        Th = C[:, cols] @ H[cols, :]  # [out, in]: row r's Σ_{k in h} C[r, k] H[k, :]
        Th[:, cols] += lam * C[:, cols]
        M[:, :, h] = torch.zeros(rows, G, device=W.device).index_add_(1, g, C * Th)
    target = W @ H + lam * W if asym is None else W @ (H + asym) + lam * W
    b = torch.zeros(rows, G, device=W.device).index_add_(1, g, C * target)
    M = 0.5 * (M + M.transpose(1, 2))
    eye = torch.eye(G, device=W.device) * (1e-6 * M.diagonal(dim1=1, dim2=2).mean(dim=1).clamp_min(1e-30))[:, None, None]
    new, info = torch.linalg.solve_ex(M + eye, b)
    new = new.half().float()
    old = scales.t().float()

    def err(s):  # the error up to the row's constant wᵀ(H + λI)w
        return (s[:, None, :] @ M @ s[:, :, None]).squeeze() - 2 * (b * s).sum(1)

    ok = (info == 0) & torch.isfinite(new).all(1) & (new > 0).all(1) & (err(new) < err(old))
    return torch.where(ok[:, None], new, old).t().contiguous()


def group_aware_order(diag: torch.Tensor, group_size: int) -> torch.Tensor:
    """Group-aware reordering (GAR: Gafni, Karnieli, Hanani, "Dual Precision Quantization for Efficient and
    Accurate Deep Neural Networks Inference", CVPRW 2025; GPTQModel's ``act_group_aware``): the column order in
    which GPTQ quantizes a layer so that important channels go first while every group keeps its input channels.

    The full groups (``group_size`` consecutive input channels) are taken by decreasing largest Hessian diagonal,
    the columns inside each group by decreasing diagonal; a partial last group comes last, its columns ordered the
    same way. Ties keep input order. The groups stay contiguous in this order, so a checkpoint's ``g_idx`` is the
    plain ``i // group_size`` (``desc_act`` false: every kernel and framework reads it) while the error feedback
    still favours the channels with the largest activations, as act-order does.

    Args:
        diag: fp32 ``[in]`` Hessian diagonal (dead channels already set to a positive value).
        group_size: a positive group size.

    Returns:
        int64 ``[in]`` permutation: position ``p`` holds the input channel quantized ``p``-th.
    """
    k = diag.numel()
    full = k // group_size
    d = diag[:full * group_size].reshape(full, group_size)
    within = torch.argsort(d, dim=1, descending=True, stable=True)  # [full, gs] channel offsets in each group
    groups = torch.argsort(d.amax(dim=1), descending=True, stable=True)
    order = (within[groups] + (groups * group_size)[:, None]).reshape(-1)
    tail = torch.argsort(diag[full * group_size:], descending=True, stable=True) + full * group_size
    return torch.cat([order, tail])


def _damped_inverse_cholesky(H: torch.Tensor, damp_percent: float, increment: float, name: str
                             ) -> tuple[torch.Tensor | None, float]:
    """Upper Cholesky factor of ``(H + λI)⁻¹`` with ``λ = damp · mean(diag H)``, raising ``damp`` by
    ``increment`` while ``H + λI`` is not positive definite. Returns ``(None, damp)`` when even
    ``damp`` near 1 fails. ``H``'s diagonal is overwritten (with the dampened one), the rest is not; the
    factorisations run in place in one more ``H``-sized buffer (for a 14336-wide layer each is 0.8 GB)."""
    diag = H.diagonal()
    d0 = diag.clone()
    mean_diag = torch.mean(d0)
    damp = damp_percent
    while True:
        diag.copy_(d0 + damp * mean_diag)
        U, info = torch.linalg.cholesky_ex(H)
        if int(info) == 0:
            torch.cholesky_inverse(U, out=U)
            torch.linalg.cholesky_ex(U, upper=True, out=(U, info))
            if int(info) == 0 and all_finite(U):
                if damp != damp_percent:
                    log.warning("%s: Hessian not positive definite at damp_percent=%g; used %g",
                                name, damp_percent, damp)
                return U, damp
        del U
        if increment <= 0 or damp + increment >= 1:
            return None, damp
        damp = round(damp + increment, 10)


def _column_loop(W: torch.Tensor, Hinv: torch.Tensor, cfg: QuantizeConfig, perm: torch.Tensor | None,
                 static: tuple[torch.Tensor, torch.Tensor] | None, P: torch.Tensor | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """GPTQ's column loop (Algorithm 1) on ``W`` ``[out, in]`` (columns in ``perm`` order, updated in place) with the
    upper Cholesky factor ``Hinv`` of the inverse Hessian in the same order. Returns ``(codes int32 [out, in]
    permuted order, scales [G, out], zeros [G, out], group of each permuted column)``; ``static`` grids, when
    given, are used for every group (input order). ``P`` (same order): GPTAQ's term, added to every column's update
    as the reference code does (the column's weight before rounding inside a block, the rounded block in the lazy
    update)."""
    rows, columns = W.shape
    maxq = 2**cfg.bits - 1
    gs = columns if cfg.group_size == -1 else cfg.group_size
    if static is not None:
        static_scales, static_zeros = static

    dev = W.device
    Q = torch.zeros(W.shape, dtype=torch.int32, device=dev)  # codes, permuted column order
    G = num_groups(columns, cfg.group_size)
    scales = torch.zeros(G, rows, device=dev)
    zeros = torch.zeros(G, rows, device=dev)
    col_group = torch.zeros(columns, dtype=torch.long, device=dev)  # group of each (permuted) column
    # the group of each column in the loop's order: its input channel's group (static grids, group-aware order,
    # input order), or act-order's groups of consecutive permuted columns
    in_groups = perm is not None and (static is not None or cfg.act_group_aware)
    group_of = ((perm if in_groups else torch.arange(columns, device=dev)) // gs).tolist()
    scale = zero = None

    # the column loop is thousands of tiny ops: one thread avoids fork/join overhead dominating
    with one_thread():
        for i1 in range(0, columns, cfg.block_size):
            i2 = min(i1 + cfg.block_size, columns)
            count = i2 - i1
            W1 = W[:, i1:i2].clone()
            Q1 = torch.zeros_like(W1)
            Err1 = torch.zeros_like(W1)
            Hinv1 = Hinv[i1:i2, i1:i2]

            for i in range(count):
                col = i1 + i
                w = W1[:, i]
                d = Hinv1[i, i]
                g = group_of[col]
                if static is not None:
                    scale, zero = static_scales[g], static_zeros[g]
                elif col % gs == 0:  # a group's first column (group-aware order keeps groups contiguous)
                    # the group's columns with every update so far: in-block ones from W1; later ones from W plus
                    # the not yet applied (lazy) updates of this block's columns before `col`
                    group_w = W1[:, i:i + gs]
                    if col + gs > i2:
                        rest = W[:, i2:col + gs] - Err1[:, :i] @ Hinv[i1:col, i2:col + gs]
                        if P is not None:
                            rest += W1[:, :i] @ P[i1:col, i2:col + gs]
                        group_w = torch.cat([group_w, rest], dim=1)
                    scale, zero = find_params(group_w, cfg.bits, cfg.sym, cfg.mse)
                    scales[g], zeros[g] = scale, zero
                col_group[col] = g
                q = quantize(w, scale, zero, maxq)
                Q1[:, i] = q
                err = (w - dequantize(q, scale, zero)) / d
                if P is None:
                    W1[:, i:] -= err.unsqueeze(1) @ Hinv1[i, i:].unsqueeze(0)
                else:
                    W1[:, i:] -= err.unsqueeze(1) @ Hinv1[i, i:].unsqueeze(0) - w.unsqueeze(1) @ P[col, i1 + i:i2][None]
                Err1[:, i] = err

            Q[:, i1:i2] = Q1
            W[:, i2:].addmm_(Err1, Hinv[i1:i2, i2:], alpha=-1)  # lazy batch update of the remaining columns
            if P is not None:
                W[:, i2:].addmm_(W1, P[i1:i2, i2:])
    if static is not None:
        scales, zeros = static
    return Q, scales, zeros, col_group
