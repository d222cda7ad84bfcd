"""Exact pack/unpack round trips of the GPTQ layout, and the layout itself against a bit-by-bit packer."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gptq_plugin.errors import ConfigError
from gptq_plugin.packing import (
    pack_dim0, pack_qweight, pack_qzeros, packed_rows, unpack_dim0, unpack_qweight, unpack_qzeros,
)


def naive_pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Bit-by-bit little-endian bit stream along dim 0 (independent of the vectorised packer)."""
    n, m = codes.shape
    rows = (n * bits + 31) // 32
    out = [[0] * m for _ in range(rows)]
    for i in range(n):
        for j in range(m):
            v = int(codes[i, j])
            for b in range(bits):
                if v >> b & 1:
                    pos = i * bits + b
                    out[pos // 32][j] |= 1 << (pos % 32)
    t = torch.tensor([[x - (1 << 32) if x >= 1 << 31 else x for x in row] for row in out], dtype=torch.int64)
    return t.to(torch.int32)


@settings(max_examples=60, deadline=None)
@given(bits=st.sampled_from([2, 3, 4, 8]), n=st.integers(1, 300), m=st.integers(1, 9), seed=st.integers(0, 2**31))
def test_round_trip_exact(bits, n, m, seed):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 2**bits, (n, m), generator=g, dtype=torch.int32)
    packed = pack_dim0(codes, bits)
    assert packed.dtype == torch.int32 and packed.shape == (packed_rows(n, bits), m)
    assert torch.equal(unpack_dim0(packed, bits, n), codes)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("n", [1, 13, 37, 64, 96])
def test_layout_matches_bitstream(bits, n):
    codes = torch.randint(0, 2**bits, (n, 3), generator=torch.Generator().manual_seed(n), dtype=torch.int32)
    assert torch.equal(pack_dim0(codes, bits), naive_pack(codes, bits))


def test_3bit_straddles_words_like_autogptq():
    # AutoGPTQ's 3-bit layout: code 10 puts its low 2 bits at bits 30-31 of word 0 and its high bit at bit 0
    # of word 1; code 21 puts bit 0 at bit 31 of word 1 and bits 1-2 at bits 0-1 of word 2.
    codes = torch.zeros(32, 1, dtype=torch.int32)
    codes[10] = 0b101
    codes[21] = 0b011
    w = pack_dim0(codes, 3).view(-1).tolist()
    assert w[0] & 0xFFFFFFFF == 0b01 << 30
    assert w[1] & 0xFFFFFFFF == (1 | (1 << 31))
    assert w[2] & 0xFFFFFFFF == 0b01


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("fmt", ["gptq", "gptq_v2"])
def test_qzeros_round_trip_including_zero(bits, fmt):
    z = torch.randint(0, 2**bits, (5, 37), dtype=torch.int32)
    z[0, 0] = 0  # v1 stores -1 (all ones): must still read back as 0
    z[0, 1] = 2**bits - 1
    assert torch.equal(unpack_qzeros(pack_qzeros(z, bits, fmt), bits, 37, fmt), z)


def test_v1_stores_zero_minus_one():
    z = torch.full((1, 8), 8, dtype=torch.int32)  # symmetric 4-bit
    assert int(pack_qzeros(z, 4, "gptq")) == 0x77777777
    assert int(pack_qzeros(z, 4, "gptq_v2")) & 0xFFFFFFFF == 0x88888888


def test_qweight_is_transposed_codes():
    codes = torch.randint(0, 16, (7, 40), dtype=torch.int32)  # [out, in]
    qw = pack_qweight(codes, 4)
    assert qw.shape == (5, 7)
    assert torch.equal(unpack_qweight(qw, 4, 40).t(), codes)


def test_errors():
    with pytest.raises(ConfigError):
        pack_dim0(torch.zeros(4, 4, dtype=torch.int32), 5)
    with pytest.raises(ValueError, match="codes must lie"):
        pack_dim0(torch.full((4, 4), 16, dtype=torch.int32), 4)
    with pytest.raises(ValueError, match="packed rows"):
        unpack_dim0(torch.zeros(3, 4, dtype=torch.int32), 4, 32)
