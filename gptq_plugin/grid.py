"""Quantization grids: one scale and zero point per (group, output channel).

The grid is the one of the reference GPTQ code (IST-DASLab/gptq, ``quant.py``, per-channel ``Quantizer``),
with the scale rounded to fp16 *before* it is used, so the codes the solver chooses are exact for the fp16
scales a GPTQ checkpoint stores::

    q = clamp(round(w / scale) + zero, 0, 2**bits - 1)        dequant(q) = scale * (q - zero)

Symmetric grids fix ``zero = 2**(bits - 1)``; asymmetric grids take ``zero = round(-min / scale)``.
"""

from __future__ import annotations

import torch

_FP16_MAX = torch.finfo(torch.float16).max
_FP16_TINY = torch.finfo(torch.float16).tiny  # smallest normal fp16: a scale below it loses precision
_SEARCH_CHUNK = 1 << 18  # elements per row chunk of the clipping search


def find_params(w: torch.Tensor, bits: int, sym: bool, mse: float = 0.0, grid: int = 100, maxshrink: float = 0.8,
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point of each row of ``w``.

    Args:
        w: fp32 ``[rows, cols]``; each row is one output channel's slice of a group.
        bits: code width.
        sym: symmetric grid.
        mse: 0 for the min-max range; otherwise the norm ``p`` of the clipping search that shrinks the
            range by up to ``maxshrink`` in ``grid`` steps and keeps the shrink minimising ``sum |err|**p``
            (the reference code uses p = 2.4).

    Returns:
        ``(scale, zero)``: fp32 ``[rows]`` each; ``scale`` holds fp16-representable values (clamped into
        fp16's normal range), ``zero`` holds integers in ``[0, 2**bits)``.
    """
    maxq = 2**bits - 1
    w = w.float()
    xmin = torch.clamp(w.min(dim=1).values, max=0)
    xmax = torch.clamp(w.max(dim=1).values, min=0)
    if sym:
        xmax = torch.maximum(xmin.abs(), xmax)
        xmin = torch.where(xmin < 0, -xmax, xmin)
    both0 = (xmin == 0) & (xmax == 0)
    xmin = torch.where(both0, torch.full_like(xmin, -1.0), xmin)
    xmax = torch.where(both0, torch.full_like(xmax, 1.0), xmax)

    def params(lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scale = ((hi - lo) / maxq).clamp(_FP16_TINY, _FP16_MAX).half().float()
        if sym:
            zero = torch.full_like(scale, (maxq + 1) / 2)
        else:
            zero = torch.round(-lo / scale).clamp(0, maxq)
        return scale, zero

    scale, zero = params(xmin, xmax)
    if mse > 0:  # row chunks of ~1 MB, searched in place: the 80 passes run in cache (same numbers as unchunked)
        rows = max(1, _SEARCH_CHUNK // max(1, w.shape[1]))
        for r in range(0, w.shape[0], rows):
            sl = slice(r, r + rows)
            _clip_search(w[sl], xmin[sl], xmax[sl], scale[sl], zero[sl], params, maxq, mse, grid, maxshrink)
    return scale, zero


def _clip_search(w, xmin, xmax, scale, zero, params, maxq: int, mse: float, grid: int, maxshrink: float) -> None:
    """The clipping search of :func:`find_params` on a chunk of rows; updates ``scale`` and ``zero`` in place."""
    best = torch.full_like(xmin, float("inf"))
    e = torch.empty_like(w)
    for i in range(int(maxshrink * grid)):
        p = 1 - i / grid
        s1, z1 = params(p * xmin, p * xmax)
        s, z = s1[:, None], z1[:, None]
        # |dequantize(quantize(w)) - w| ** mse, computed in one buffer
        torch.div(w, s, out=e).round_().add_(z).clamp_(0, maxq).sub_(z).mul_(s).sub_(w).abs_().pow_(mse)
        err = e.sum(dim=1)
        better = err < best
        best = torch.where(better, err, best)
        scale.copy_(torch.where(better, s1, scale))
        zero.copy_(torch.where(better, z1, zero))


def quantize(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int) -> torch.Tensor:
    """Integer codes (as fp32) of ``w`` on the grid; broadcasting shapes."""
    return torch.clamp(torch.round(w / scale) + zero, 0, maxq)


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """``scale * (q - zero)``; broadcasting shapes."""
    return scale * (q - zero)
