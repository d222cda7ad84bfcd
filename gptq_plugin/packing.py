"""Exact, vectorised packing of GPTQ integer codes into int32 words.

Layout (AutoGPTQ / GPTQModel "gptq" format, read by vLLM, TGI, Transformers):

* ``qweight`` int32 ``[ceil(in * bits / 32), out]``: codes packed along the *input* dimension.
* ``qzeros`` int32 ``[n_groups, ceil(out * bits / 32)]``: zero points packed along the *output* dimension.

Both treat a column (resp. row) of codes as one little-endian bit stream: code ``i`` occupies stream bits
``[i * bits, (i + 1) * bits)``, low bits first. For 2/4/8 bits that is ``32 // bits`` codes per word; for
3 bits, 32 codes fill 3 words and codes 10 and 21 straddle a word boundary (AutoGPTQ's 3-bit layout).

Zero points: format v1 ("gptq") stores ``zero - 1`` (so a symmetric 4-bit zero of 8 is stored as 7);
v2 ("gptq_v2") stores ``zero``. Stored values are taken modulo ``2**bits``, so a v1 asymmetric zero of 0
is stored as ``2**bits - 1`` and read back exactly by :func:`unpack_qzeros`.
"""

from __future__ import annotations

import torch

from .errors import ConfigError

_SUPPORTED = (2, 3, 4, 8)


def _check_bits(bits: int) -> None:
    if bits not in _SUPPORTED:
        raise ConfigError(f"bits={bits!r} cannot be packed: use one of 2, 3, 4, 8")


def packed_rows(n: int, bits: int) -> int:
    """Number of int32 words that hold ``n`` codes of ``bits`` bits: ``ceil(n * bits / 32)``."""
    return (n * bits + 31) // 32


def pack_dim0(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer codes along dim 0.

    Args:
        codes: ``[n, m]`` integer tensor with values in ``[0, 2**bits)``.
        bits: 2, 3, 4 or 8.

    Returns:
        int32 ``[ceil(n * bits / 32), m]``.

    Raises:
        ConfigError: unsupported ``bits``.
        ValueError: a code outside ``[0, 2**bits)``.
    """
    _check_bits(bits)
    if codes.dim() != 2:
        raise ValueError(f"pack_dim0 expects a 2-D tensor of codes, got shape {tuple(codes.shape)}")
    n, m = codes.shape
    c = codes.to(torch.int32)
    if c.numel():
        lo, hi = torch.aminmax(c)
        if int(lo) < 0 or int(hi) >= 2**bits:
            raise ValueError(f"codes must lie in [0, {2**bits}) for {bits}-bit packing, got [{int(lo)}, {int(hi)}]")
    n_pad = (n + 31) // 32 * 32
    if n_pad != n:
        c = torch.cat([c, c.new_zeros(n_pad - n, m)])
    c = c.view(n_pad // 32, 32, m)
    words = c.new_zeros(n_pad // 32, bits, m)  # 32 codes -> `bits` words; int32 shifts wrap bit-exactly
    for p in range(32):
        w, s = divmod(p * bits, 32)
        words[:, w] |= c[:, p] << s
        if s + bits > 32:  # straddles into the next word (3-bit only)
            words[:, w + 1] |= c[:, p] >> (32 - s)
    return words.view(n_pad // 32 * bits, m)[: packed_rows(n, bits)].contiguous()


def unpack_dim0(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of :func:`pack_dim0`: int32 ``[ceil(n * bits / 32), m]`` -> int32 codes ``[n, m]``.

    Raises:
        ValueError: when ``packed`` has the wrong number of rows for ``n`` codes.
    """
    _check_bits(bits)
    rows = packed_rows(n, bits)
    if packed.dim() != 2 or packed.shape[0] != rows:
        raise ValueError(f"expected {rows} packed rows for {n} {bits}-bit codes, got shape {tuple(packed.shape)}")
    m = packed.shape[1]
    n_pad = (n + 31) // 32 * 32
    w = packed.to(torch.int32)
    total = n_pad // 32 * bits
    if total != rows:
        w = torch.cat([w, w.new_zeros(total - rows, m)])
    w = w.view(n_pad // 32, bits, m)
    mask = (1 << bits) - 1
    out = w.new_empty(n_pad // 32, 32, m)
    for p in range(32):
        q, s = divmod(p * bits, 32)
        if s + bits > 32:  # low (32 - s) bits from word q, the rest from word q + 1
            v = ((w[:, q] >> s) & ((1 << (32 - s)) - 1)) | ((w[:, q + 1] << (32 - s)) & mask)
        else:
            v = (w[:, q] >> s) & mask  # arithmetic shift: the mask drops the sign bits
        out[:, p] = v
    return out.view(n_pad, m)[:n].contiguous()


def pack_qweight(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Codes ``[out, in]`` (row-major weight order) -> ``qweight`` int32 ``[ceil(in * bits / 32), out]``."""
    return pack_dim0(codes.t(), bits)


def unpack_qweight(qweight: torch.Tensor, bits: int, in_features: int) -> torch.Tensor:
    """``qweight`` int32 ``[ceil(in * bits / 32), out]`` -> codes int32 ``[in, out]``."""
    return unpack_dim0(qweight, bits, in_features)


def pack_qzeros(zeros: torch.Tensor, bits: int, checkpoint_format: str = "gptq") -> torch.Tensor:
    """Zero points ``[n_groups, out]`` (true zeros, integers in ``[0, 2**bits)``) -> ``qzeros`` int32
    ``[n_groups, ceil(out * bits / 32)]``. Format "gptq" (v1) stores ``zero - 1`` modulo ``2**bits``."""
    z = zeros.to(torch.int64)
    if checkpoint_format == "gptq":
        z = (z - 1) % (2**bits)
    elif checkpoint_format != "gptq_v2":
        raise ConfigError(f"checkpoint_format={checkpoint_format!r}: use 'gptq' or 'gptq_v2'")
    return pack_dim0(z.t(), bits).t().contiguous()


def unpack_qzeros(qzeros: torch.Tensor, bits: int, out_features: int, checkpoint_format: str = "gptq") -> torch.Tensor:
    """``qzeros`` int32 ``[n_groups, ceil(out * bits / 32)]`` -> true zero points int32 ``[n_groups, out]``.

    Format "gptq" (v1) adds 1 back, modulo ``2**bits`` (so the v1 encoding of zero 0 reads back as 0)."""
    z = unpack_dim0(qzeros.t().contiguous(), bits, out_features).t()
    if checkpoint_format == "gptq":
        z = (z + 1) % (2**bits)
    elif checkpoint_format != "gptq_v2":
        raise ConfigError(f"checkpoint_format={checkpoint_format!r}: use 'gptq' or 'gptq_v2'")
    return z.to(torch.int32).contiguous()


def default_g_idx(in_features: int, group_size: int) -> torch.Tensor:
    """``g_idx`` int32 ``[in]`` for groups in input order: ``i // group_size`` (all zeros for -1)."""
    if group_size == -1:
        return torch.zeros(in_features, dtype=torch.int32)
    return (torch.arange(in_features) // group_size).to(torch.int32)


def num_groups(in_features: int, group_size: int) -> int:
    """``ceil(in / group_size)``, or 1 for ``group_size == -1``."""
    return 1 if group_size == -1 else (in_features + group_size - 1) // group_size
