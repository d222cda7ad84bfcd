"""Compiled CPU helpers for the int4-op kernels: a bf16 tile dequantizer (prefill) and a GEMV (8-bit decode).

PyTorch has no CPU op that runs a GPTQ layer as fast as a dense bf16 GEMM at prefill (its int4 op multiplies in
fp32 without AMX: 2.3x the dense bf16 time at ``M = 128`` on the benchmark machine), nor one that decodes 8-bit
codes at a byte per weight. Both are small loops, so they are written in C (:data:`SOURCE`), compiled once per
machine with the system C compiler (``$CC``, else ``cc``/``gcc``/``clang``; ``-O3 -march=native``, ~0.3 s) into
:func:`cache_dir`, and called through :mod:`ctypes` (which releases the GIL). Without a compiler, or with
``GPTQ_PLUGIN_CPU_NATIVE=0``, :func:`library` returns None and the kernels keep their pure-torch paths.

Layout (:class:`NativeWeight`): one row per output channel, input channels in group order padded to ``Kp`` (a
multiple of 32), 8-bit codes one byte each and 2/3/4-bit codes as nibbles; one group per run of 32 channels.
``W[n, k] = q * s + (-z * s)`` is the fp32 weight of :func:`gptq_plugin.kernels.reference.dequantize_weight` (both
terms exact in fp32 for fp16/bf16 scales and codes below 256).

* ``gp_dequant``: rows of ``W`` rounded to bf16 (nearest even) into a reused buffer (a few MiB, in cache), each tile
  then one bf16 GEMM (:meth:`NativeWeight.matmul_tiles`): a prefill costs a dense bf16 GEMM plus ~0.07 ns per
  weight, never a whole bf16 weight in memory.
* ``gp_gemv``: ``x @ Wᵀ`` for a few rows of ``x``, products and sums in fp32, reading the codes once
  (:meth:`NativeWeight.gemv`).

The C code has an AVX-512 (F, BW, BF16) path and a portable one (``-DGP_PORTABLE``) that the compiler vectorizes
as it can; the tests run both against :mod:`gptq_plugin.kernels.reference`. Measurements: docs/kernels.md.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import torch
import torch.nn.functional as F

from gptq_plugin.errors import KernelError

from .layout import GroupOrder, unpack_codes, zeros_and_scales

ENV_NATIVE = "GPTQ_PLUGIN_CPU_NATIVE"  # "0": do not compile or load the C helpers
ENV_CACHE = "GPTQ_PLUGIN_CACHE"  # folder for the compiled library (default: $XDG_CACHE_HOME/gptq-plugin)
CHUNK = 32  # input channels per run that shares one scale (the layout's unit)
TILE_ELEMS = 1 << 21  # weights per dequantized bf16 tile (4 MiB: [512, 4096]) ...
TILE_MIN_ROWS = 256  # ... but at least this many output channels ([256, 14336]); both measured in docs/kernels.md
ROW_MAJOR_MAX_M = 32  # tiles: x @ W[tile]ᵀ up to this M, W[tile] @ xᵀ above (faster GEMMs either side; measured)

SOURCE = r"""
#include <stdint.h>
#include <string.h>
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512BF16__) && !defined(GP_PORTABLE)
#include <immintrin.h>
#define GP_AVX512 1
#endif
/* bytes ahead of the current chunk to prefetch: one stream of codes is not read at full bandwidth by the hardware
   prefetchers alone (8-bit GEMV on 4096x4096, cold caches: 1.7 ms without, 0.94 ms with; docs/kernels.md) */
#define GP_PREFETCH 256

/* Layout (one row per output channel n, Kp input channels in group order, Kp % 32 == 0):
   bits8 = 1: packed u8 [N, Kp], the codes;
   bits8 = 0: packed u8 [N, Kp / 2], for each chunk c of 32 channels the 16 bytes 16c..16c+15, byte i holding
              channel 32c + i in its low nibble and 32c + 16 + i in its high nibble.
   gc: int32 [Kp / 32] the group of each chunk; scales, nzs: fp32 [N, G] (nzs = -zero * scale).
   Weight: W[n, k] = q * s + nzs, s = scales[n, gc[k / 32]] (exactly s * (q - zero) when q * s and zero * s are exact
   in fp32, as for fp16/bf16 scales and codes below 256). */

int gp_has_avx512(void) {
#ifdef GP_AVX512
    return 1;
#else
    return 0;
#endif
}

static inline uint16_t bf16_rne(float f) { /* fp32 -> bf16 bits, round to nearest even (finite inputs) */
    uint32_t u;
    memcpy(&u, &f, 4);
    return (uint16_t)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

static inline float bf16_to_f32(uint16_t b) {
    const uint32_t u = (uint32_t)b << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline float code_at(int bits8, const uint8_t *row, int64_t k) {
    if (bits8) return (float)row[k];
    const uint8_t b = row[(k / 32) * 16 + (k % 16)];
    return (float)((k % 32) < 16 ? (b & 15) : (b >> 4));
}

#ifdef GP_AVX512
/* The 32 codes of chunk c of one row as fp32: lo = channels 32c..32c+15, hi = 32c+16..32c+31. */
static inline __attribute__((always_inline)) void chunk_codes(int bits8, const uint8_t *row, int64_t c, __m512 *lo,
                                                              __m512 *hi) {
    __m128i a, b;
    if (bits8) {
        a = _mm_loadu_si128((const __m128i *)(row + 32 * c));
        b = _mm_loadu_si128((const __m128i *)(row + 32 * c + 16));
    } else {
        const __m128i v = _mm_loadu_si128((const __m128i *)(row + 16 * c));
        a = _mm_and_si128(v, _mm_set1_epi8(15));
        b = _mm_and_si128(_mm_srli_epi16(v, 4), _mm_set1_epi8(15));
    }
    *lo = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(a));
    *hi = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(b));
}

/* The 32 fp32 weights of chunk c of one row (codes * s + nz): lo = channels 32c..32c+15, hi = 32c+16..32c+31. */
static inline __attribute__((always_inline)) void chunk_weights(int bits8, const uint8_t *row, int64_t c, __m512 s,
                                                                __m512 nz, __m512 *lo, __m512 *hi) {
    chunk_codes(bits8, row, c, lo, hi);
    *lo = _mm512_fmadd_ps(*lo, s, nz);
    *hi = _mm512_fmadd_ps(*hi, s, nz);
}
#endif

/* Rows n0..n1 of W, rounded to bf16: out [n1 - n0, Kp]. */
void gp_dequant(int bits8, const uint8_t *packed, const int32_t *gc, const float *scales, const float *nzs,
                int64_t Kp, int64_t G, int64_t n0, int64_t n1, uint16_t *out) {
    const int64_t rowb = bits8 ? Kp : Kp / 2;
    for (int64_t n = n0; n < n1; ++n) {
        const uint8_t *row = packed + n * rowb;
        const float *s = scales + n * G, *nz = nzs + n * G;
        uint16_t *o = out + (n - n0) * Kp;
#ifdef GP_AVX512
        for (int64_t c = 0; c < Kp / 32; ++c) {
            __m512 lo, hi;
            if (!(c & 1)) _mm_prefetch((const char *)(row + (bits8 ? 32 : 16) * c + GP_PREFETCH), _MM_HINT_T0);
            chunk_weights(bits8, row, c, _mm512_set1_ps(s[gc[c]]), _mm512_set1_ps(nz[gc[c]]), &lo, &hi);
            _mm512_storeu_si512((void *)(o + 32 * c), (__m512i)_mm512_cvtne2ps_pbh(hi, lo));
        }
#else
        for (int64_t k = 0; k < Kp; ++k) {
            const int32_t g = gc[k / 32];
            o[k] = bf16_rne(code_at(bits8, row, k) * s[g] + nz[g]);
        }
#endif
    }
}

/* MC rows of y[m, n] = sum over chunks c of s[gc[c]] * sum_{k in c} x[m, k] * q[n, k], for one n (x: bf16 bits;
   products of bf16 numbers are exact in fp32, sums fp32; the zero points' term is added by the caller). */
static inline __attribute__((always_inline)) void gemv_row(const int MC, int bits8, const uint8_t *row,
        const int32_t *gc, const float *s, int64_t Kp, const uint16_t *x, float *y, int64_t ldy) {
    const int64_t C = Kp / 32;
#ifdef GP_AVX512
    __m512 acc[4][2];  /* two independent sums per row of x: the FMA latency is hidden */
    for (int m = 0; m < MC; ++m) acc[m][0] = acc[m][1] = _mm512_setzero_ps();
    const __m512 zero = _mm512_setzero_ps();
    int64_t c = 0;
    for (; c + 1 < C; c += 2) {
        __m512 q0, q1, q2, q3;
        _mm_prefetch((const char *)(row + (bits8 ? 32 : 16) * c + GP_PREFETCH), _MM_HINT_T0);
        chunk_codes(bits8, row, c, &q0, &q1);
        chunk_codes(bits8, row, c + 1, &q2, &q3);
        const __m512bh b0 = _mm512_cvtne2ps_pbh(q1, q0), b1 = _mm512_cvtne2ps_pbh(q3, q2);  /* exact: q < 256 */
        const __m512 s0 = _mm512_set1_ps(s[gc[c]]), s1 = _mm512_set1_ps(s[gc[c + 1]]);
        for (int m = 0; m < MC; ++m) {
            const uint16_t *xc = x + m * Kp + 32 * c;
            const __m512bh x0 = (__m512bh)_mm512_loadu_si512((const void *)xc);
            const __m512bh x1 = (__m512bh)_mm512_loadu_si512((const void *)(xc + 32));
            acc[m][0] = _mm512_fmadd_ps(_mm512_dpbf16_ps(zero, x0, b0), s0, acc[m][0]);
            acc[m][1] = _mm512_fmadd_ps(_mm512_dpbf16_ps(zero, x1, b1), s1, acc[m][1]);
        }
    }
    if (c < C) {
        __m512 q0, q1;
        chunk_codes(bits8, row, c, &q0, &q1);
        const __m512bh b0 = _mm512_cvtne2ps_pbh(q1, q0);
        const __m512 s0 = _mm512_set1_ps(s[gc[c]]);
        for (int m = 0; m < MC; ++m) {
            const __m512bh x0 = (__m512bh)_mm512_loadu_si512((const void *)(x + m * Kp + 32 * c));
            acc[m][0] = _mm512_fmadd_ps(_mm512_dpbf16_ps(zero, x0, b0), s0, acc[m][0]);
        }
    }
    for (int m = 0; m < MC; ++m) y[m * ldy] = _mm512_reduce_add_ps(_mm512_add_ps(acc[m][0], acc[m][1]));
#else
    float acc[4] = {0, 0, 0, 0};
    for (int64_t c = 0; c < C; ++c) {
        float part[4] = {0, 0, 0, 0};
        for (int64_t k = 32 * c; k < 32 * c + 32; ++k) {
            const float q = code_at(bits8, row, k);
            for (int m = 0; m < MC; ++m) part[m] += bf16_to_f32(x[m * Kp + k]) * q;
        }
        for (int m = 0; m < MC; ++m) acc[m] += part[m] * s[gc[c]];
    }
    for (int m = 0; m < MC; ++m) y[m * ldy] = acc[m];
#endif
}

/* y fp32 [M, N] = sum over chunks c of s[n, gc[c]] * x[:, chunk c] @ q[n, chunk c] (x bf16 [M, Kp]): the product
   with the codes, without the zero points' term; each row of codes is read once per 4 rows of x. */
void gp_gemv(int bits8, const uint8_t *packed, const int32_t *gc, const float *scales, int64_t Kp, int64_t G,
             int64_t N, const uint16_t *x, int64_t M, float *y) {
    const int64_t rowb = bits8 ? Kp : Kp / 2;
    for (int64_t n = 0; n < N; ++n) {
        const uint8_t *row = packed + n * rowb;
        const float *s = scales + n * G;
        for (int64_t m0 = 0; m0 < M; m0 += 4) {
            const uint16_t *xm = x + m0 * Kp;
            float *ym = y + m0 * N + n;
            switch (M - m0 < 4 ? M - m0 : 4) {
                case 1: gemv_row(1, bits8, row, gc, s, Kp, xm, ym, N); break;
                case 2: gemv_row(2, bits8, row, gc, s, Kp, xm, ym, N); break;
                case 3: gemv_row(3, bits8, row, gc, s, Kp, xm, ym, N); break;
                default: gemv_row(4, bits8, row, gc, s, Kp, xm, ym, N); break;
            }
        }
    }
}
"""

_lock = threading.Lock()
_libs: dict[tuple[str, ...], ctypes.CDLL | None] = {}
_reasons: dict[tuple[str, ...], str] = {}


def cache_dir() -> Path:
    """Where compiled libraries are kept: ``$GPTQ_PLUGIN_CACHE``, else ``$XDG_CACHE_HOME/gptq-plugin`` (default
    ``~/.cache/gptq-plugin``), subfolder ``cpu_native``."""
    root = os.environ.get(ENV_CACHE) or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "gptq-plugin"
    return Path(root) / "cpu_native"


def _compiler() -> str | None:
    for cand in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if cand and shutil.which(cand.split()[0]):
            return cand
    return None


def _cpu_id() -> str:
    """A string that changes when the library must be rebuilt for another CPU (``-march=native``)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return line
    except OSError:
        pass
    return platform.processor() + platform.machine()


def _build(flags: tuple[str, ...]) -> ctypes.CDLL:
    cc = _compiler()
    if cc is None:
        raise RuntimeError("no C compiler found ($CC, cc, gcc, clang)")
    cmd = [*cc.split(), "-O3", "-march=native", "-shared", "-fPIC", *flags]
    key = hashlib.sha256("\0".join([SOURCE, *cmd, _cpu_id(), sys.platform]).encode()).hexdigest()[:16]
    folder = cache_dir()
    lib_path = folder / f"gptq_cpu_native_{key}.so"
    if not lib_path.exists():
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=folder) as tmp:
            src, out = Path(tmp) / "gptq_cpu_native.c", Path(tmp) / "lib.so"
            src.write_text(SOURCE)
            res = subprocess.run([*cmd, "-o", str(out), str(src)], capture_output=True, text=True, timeout=120)
            if res.returncode:
                raise RuntimeError(f"{' '.join(cmd)} failed: {res.stderr.strip()[-500:]}")
            os.replace(out, lib_path)  # atomic: concurrent builders write the same bytes
    lib = ctypes.CDLL(str(lib_path))
    P, I, C = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    lib.gp_dequant.argtypes = [C, P, P, P, P, I, I, I, I, P]
    lib.gp_dequant.restype = None
    lib.gp_gemv.argtypes = [C, P, P, P, I, I, I, P, I, P]
    lib.gp_gemv.restype = None
    lib.gp_has_avx512.restype = C
    return lib


def library(flags: tuple[str, ...] = ()) -> ctypes.CDLL | None:
    """The compiled helpers (built on first use, then loaded from :func:`cache_dir`), or None when they are
    disabled (``GPTQ_PLUGIN_CPU_NATIVE=0``) or cannot be built (:func:`unavailable_reason` says why).

    Args:
        flags: extra compiler flags, e.g. ``("-DGP_PORTABLE",)`` for the portable C path (tests).
    """
    if os.environ.get(ENV_NATIVE, "1").strip() == "0":
        _reasons[flags] = f"disabled by {ENV_NATIVE}=0"
        return None
    with _lock:
        if flags not in _libs:
            try:
                _libs[flags] = _build(flags)
            except (OSError, RuntimeError, subprocess.SubprocessError) as e:
                _libs[flags], _reasons[flags] = None, f"{type(e).__name__}: {e}"
        return _libs[flags]


def unavailable_reason(flags: tuple[str, ...] = ()) -> str | None:
    """Why :func:`library` returned None (None when it did not, or was not called)."""
    return _reasons.get(flags)


class NativeWeight:
    """A layer's codes in the row layout of the C helpers (see :data:`SOURCE`), for bf16 activations.

    Args:
        layer: a 2-, 3-, 4- or 8-bit :class:`gptq_plugin.linear.QuantLinear` on CPU whose groups, in group order,
            can be cut into runs of 32 channels (``K`` padded to a multiple of 32; the int4-op kernels'
            ``can_implement`` checks this).
        order: its :class:`~gptq_plugin.kernels.layout.GroupOrder`.
        lib: :func:`library`'s result (not None).

    Attributes:
        Kp: ``K`` padded to a multiple of 32. packed: uint8 ``[N, Kp / 2]`` (bits <= 4) or ``[N, Kp]`` (8-bit).
        gc: int32 ``[Kp / 32]``, the group of each run of 32 channels. scales, nzs: fp32 ``[N, G]`` (``nzs`` =
        ``-zero * scale``). perm: the act-order permutation or None.

    Raises:
        KernelError: bits not in (2, 3, 4, 8), or a run of 32 channels spans two groups.
    """

    def __init__(self, layer, order: GroupOrder, lib: ctypes.CDLL):
        if layer.bits not in (2, 3, 4, 8):
            raise KernelError(f"cpu_native: bits={layer.bits} is not 2, 3, 4 or 8")
        self.lib, self.bits8 = lib, int(layer.bits == 8)
        self.K, self.N = layer.in_features, layer.out_features
        self.Kp = (self.K + CHUNK - 1) // CHUNK * CHUNK
        self.perm = order.perm
        g = F.pad(order.g_idx, (0, self.Kp - self.K), value=int(order.g_idx[-1]) if self.K else 0).view(-1, CHUNK)
        if not bool((g == g[:, :1]).all()):
            raise KernelError(f"cpu_native: the groups of this layer (group_size={layer.group_size}) cannot be cut "
                              f"into runs of {CHUNK} channels")
        self.gc = g[:, 0].to(torch.int32).contiguous()
        codes = unpack_codes(layer, order).t().to(torch.uint8)  # [N, K]
        codes = F.pad(codes, (0, self.Kp - self.K))  # padded channels meet x = 0
        if not self.bits8:
            c = codes.view(self.N, -1, 2, CHUNK // 2)
            codes = c[:, :, 0] | (c[:, :, 1] << 4)  # [N, Kp / 32, 16]
        self.packed = codes.reshape(self.N, -1).contiguous()
        zeros, scales = zeros_and_scales(layer)  # [G, N]
        self.scales = scales.t().contiguous()
        self.nzs = (-zeros.float() * scales).t().contiguous()
        self.G = self.scales.shape[1]
        self.tile_n = max(16, min(self.N, max(TILE_MIN_ROWS, TILE_ELEMS // self.Kp) // 16 * 16))

    def _input(self, x2: torch.Tensor) -> torch.Tensor:
        """``x2`` ``[M, K]`` permuted to group order and zero-padded to ``[M, Kp]``."""
        if self.perm is not None:
            x2 = x2.index_select(1, self.perm)
        return F.pad(x2, (0, self.Kp - self.K)) if self.Kp != self.K else x2

    def dequantize_rows(self, n0: int, n1: int, out: torch.Tensor) -> torch.Tensor:
        """Rows ``n0:n1`` of the weight (input channels in group order, padded to ``Kp``), each element the
        reference's fp32 weight rounded to bf16 (nearest even), written into ``out``: contiguous bf16
        ``[n1 - n0, Kp]``.

        Raises:
            ValueError: ``out`` is not a contiguous bf16 tensor of that shape, or the rows are out of range.
        """
        if out.dtype != torch.bfloat16 or not out.is_contiguous() or tuple(out.shape) != (n1 - n0, self.Kp):
            raise ValueError(f"out must be a contiguous bf16 [{n1 - n0}, {self.Kp}] tensor, got {out.dtype} "
                             f"{tuple(out.shape)}")
        if not 0 <= n0 <= n1 <= self.N:
            raise ValueError(f"rows {n0}:{n1} are outside [0, {self.N}]")
        self.lib.gp_dequant(self.bits8, self.packed.data_ptr(), self.gc.data_ptr(), self.scales.data_ptr(),
                            self.nzs.data_ptr(), self.Kp, self.G, n0, n1, out.data_ptr())
        return out

    def matmul_tiles(self, x2: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """``x2 @ dequant(W)ᵀ + bias`` by tiles of :attr:`tile_n` output channels: each tile dequantized to bf16
        into one reused buffer (:data:`TILE_ELEMS` weights, at least :data:`TILE_MIN_ROWS` rows), then one bf16
        GEMM (fp32 accumulation inside, one rounding of the output): ``y[:, tile] = x @ W[tile]ᵀ`` for
        ``M <=`` :data:`ROW_MAJOR_MAX_M`, else ``yᵀ[tile] = W[tile] @ xᵀ``, whichever oneDNN/MKL runs faster.

        Args:
            x2: bf16 ``[M, K]`` in input order. bias: ``[N]`` or None.

        Returns:
            bf16 ``[M, N]``, contiguous.
        """
        xp = self._input(x2).contiguous()  # [M, Kp]
        M, N, tn = x2.shape[0], self.N, self.tile_n
        buf = _workspace(tn * self.Kp)
        b16 = None if bias is None else bias.to(torch.bfloat16)
        small = M <= ROW_MAJOR_MAX_M
        out = torch.empty(M, N, dtype=torch.bfloat16) if small else torch.empty(N, M, dtype=torch.bfloat16)
        xt = None if small else xp.t().contiguous()  # [Kp, M]
        for n0 in range(0, N, tn):
            n1 = min(n0 + tn, N)
            w = self.dequantize_rows(n0, n1, buf[:(n1 - n0) * self.Kp].view(n1 - n0, self.Kp))
            if small:  # y[:, tile] = x @ W[tile]ᵀ
                out[:, n0:n1] = F.linear(xp, w, None if b16 is None else b16[n0:n1])
            elif b16 is None:  # yᵀ[tile] = W[tile] @ xᵀ
                torch.mm(w, xt, out=out[n0:n1])
            else:
                torch.addmm(b16[n0:n1, None], w, xt, out=out[n0:n1])
        return out if small else out.t().contiguous()

    def gemv(self, x2: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """``x2 @ dequant(W)ᵀ + bias`` for a few rows: each weight is dequantized in registers (the reference's
        fp32 value) once per 4 rows of ``x2``, products and sums in fp32, one rounding of the output.

        Args:
            x2: bf16 ``[M, K]`` in input order. bias: ``[N]`` or None.

        Returns:
            bf16 ``[M, N]``.
        """
        xb = self._input(x2).contiguous()  # bf16 [M, Kp]
        M = xb.shape[0]
        y = torch.empty(M, self.N)
        self.lib.gp_gemv(self.bits8, self.packed.data_ptr(), self.gc.data_ptr(), self.scales.data_ptr(), self.Kp,
                         self.G, self.N, xb.data_ptr(), M, y.data_ptr())
        xg = torch.zeros(M, self.G).index_add_(1, self.gc.long(), xb.float().view(M, -1, CHUNK).sum(-1))  # per group
        y.addmm_(xg, self.nzs.t())  # + sum over groups of x_g * (-zero * scale)
        if bias is not None:
            y += bias.float()
        return y.to(torch.bfloat16)


_local = threading.local()


def _workspace(numel: int) -> torch.Tensor:
    """A bf16 buffer of at least ``numel`` elements, reused across calls and layers (per thread): a fresh
    multi-MiB allocation costs a page fault per 4 KiB on first touch."""
    buf = getattr(_local, "buf", None)
    if buf is None or buf.numel() < numel:
        buf = _local.buf = torch.empty(numel, dtype=torch.bfloat16)
    return buf
