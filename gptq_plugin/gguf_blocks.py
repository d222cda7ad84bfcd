"""One GPTQ layer as a GGML block-quantized tensor (Q4_0, Q4_1, Q5_0, Q8_0), checked for exactness.

GGML's legacy block types cut every weight row into blocks of 32 consecutive inputs, each with its own fp16 scale
``d`` (ggml ``ggml-common.h`` ``block_q4_0`` ... and ``ggml-quants.c`` ``dequantize_row_q4_0`` ...; the same
math in gguf-py's ``gguf/quants.py``):

======== ============================================ ======================= ===========================
type     block (bytes)                                 value of code ``q``     GPTQ code ``c``, zero ``z``
======== ============================================ ======================= ===========================
Q4_0     ``d`` fp16, 16 bytes of nibbles (18)          ``d * (q - 8)``         ``q = c - z + 8`` in 0..15
Q4_1     ``d``, ``m`` fp16, 16 bytes of nibbles (20)   ``d * q + m``           ``q = c``, ``m = -d * z``
Q5_0     ``d``, 4 bytes of high bits, 16 nibbles (22)  ``d * (q - 16)``        ``q = c - z + 16`` in 0..31
Q8_0     ``d``, 32 int8 (34)                           ``d * q``               ``q = c - z`` in -128..127
======== ============================================ ======================= ===========================

A GPTQ layer ``W[n, k] = scales[g_idx[k], n] * (code[k, n] - zero[g_idx[k], n])`` maps onto one of these block
for block when every block of 32 inputs lies in one group (``g_idx`` constant on it: groups of a multiple of 32
inputs in input order, which act-order with static groups keeps) and the scales are fp16: then ``d`` is the
group's scale and the codes shift into the type's range. Symmetric 2/3/4-bit layers fit Q4_0, asymmetric 4-bit
fits Q5_0, symmetric 8-bit fits Q8_0. Q4_1 is exact only when ``-d * z`` happens to round to itself in fp16.

Exactness is not assumed: :func:`encode_layer` decodes what it wrote with gguf-py's ``dequantize`` and compares
it bit for bit with the plugin's dequantization (:func:`gptq_plugin.kernels.reference.dequantize_weight`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .errors import GPTQPluginError
from .packing import unpack_qweight, unpack_qzeros

QK = 32  # inputs per GGML block (QK4_0 = QK4_1 = QK5_0 = QK8_0 = 32)
#: exact candidates, smallest first (bytes per 32 weights: 18, 22, 34)
EXACT_ORDER = ("q4_0", "q5_0", "q8_0")
BLOCK_TYPES = ("q4_0", "q4_1", "q5_0", "q8_0")
#: the range of ``code - zero`` each offset type stores
_SHIFTED_RANGE = {"q4_0": (-8, 7), "q5_0": (-16, 15), "q8_0": (-128, 127)}


class GGUFExportError(GPTQPluginError):
    """A checkpoint or layer that cannot be exported to GGUF as asked (the message names it and the options)."""


def ggml_type(name: str):
    """The ``gguf.GGMLQuantizationType`` called ``name`` (``"q4_0"``, ``"f16"``, ...)."""
    import gguf

    return gguf.GGMLQuantizationType[name.upper()]


@dataclass
class GPTQLayer:
    """One quantized linear in row-major form (the ``nn.Linear.weight`` orientation).

    Attributes:
        name: the checkpoint prefix (``model.layers.0.self_attn.q_proj``).
        codes: int32 ``[N, K]`` in ``[0, 2**bits)``. zeros: int32 ``[G, N]`` (true zero points, not v1's ``z - 1``).
        scales: ``[G, N]`` (fp16 as stored). g_idx: int32 ``[K]``. bits: 2, 3, 4 or 8.
    """

    name: str
    codes: torch.Tensor
    zeros: torch.Tensor
    scales: torch.Tensor
    g_idx: torch.Tensor
    bits: int

    @classmethod
    def from_v1(cls, name: str, tensors: dict[str, torch.Tensor], bits: int) -> "GPTQLayer":
        """From the in-memory GPTQ v1 tensors of :func:`gptq_plugin.reader.read_checkpoint`
        (``qweight``, ``qzeros``, ``scales``, ``g_idx``)."""
        k, n = int(tensors["g_idx"].numel()), int(tensors["scales"].shape[1])
        codes = unpack_qweight(tensors["qweight"], bits, k).t().contiguous()
        zeros = unpack_qzeros(tensors["qzeros"], bits, n, "gptq")
        return cls(name, codes, zeros, tensors["scales"], tensors["g_idx"].to(torch.int32), bits)

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)

    def permute_rows(self, perm: torch.Tensor) -> "GPTQLayer":
        """The same layer with output rows reordered (``W[perm]``): exact, since groups run along the inputs."""
        return GPTQLayer(self.name, self.codes[perm], self.zeros[:, perm], self.scales[:, perm], self.g_idx, self.bits)

    def dequantize(self) -> torch.Tensor:
        """fp32 ``[N, K]``: ``scales[g] * (code - zero[g])`` computed as :mod:`kernels.reference` does."""
        g = self.g_idx.long()
        return (self.scales.float()[g].t() * (self.codes.float() - self.zeros.float()[g].t())).contiguous()

    def block_groups(self) -> tuple[torch.Tensor | None, str]:
        """``(group of each 32-input block, "")`` when every block lies in one group, else ``(None, reason)``."""
        k = self.codes.shape[1]
        if k % QK:
            return None, f"in_features {k} is not a multiple of {QK} (GGML blocks)"
        blocks = self.g_idx.view(-1, QK)
        if bool((blocks == blocks[:, :1]).all()):
            return blocks[:, 0].long(), ""
        if bool((self.g_idx[1:] >= self.g_idx[:-1]).all()):
            sizes = sorted(set(torch.bincount(self.g_idx.long()).tolist()))
            return None, (f"its groups ({'/'.join(map(str, sizes))} inputs) do not fall on GGML's {QK}-input blocks "
                          f"(use a group size that is a multiple of {QK})")
        return None, ("g_idx is not in input order (act-order with dynamic groups), so a block of 32 inputs mixes "
                      "groups (quantize with the default recipe, --act-order --static-groups, or --no-act-order)")


@dataclass
class EncodedLayer:
    """A layer encoded as a GGML tensor.

    Attributes:
        qtype: ``"q4_0"``, ``"q4_1"``, ``"q5_0"``, ``"q8_0"`` or ``"f16"``.
        data: uint8 ``[N, K // 32 * block bytes]`` (``[N, 2 * K]`` for f16), as ``GGUFWriter.add_tensor`` takes it.
        exact: whether gguf-py's dequantization equals the plugin's bit for bit.
        max_abs_err: ``max |W_gguf - W_gptq|``. rel_err: ``||W_gguf - W_gptq|| / ||W_gptq||`` (Frobenius).
        note: why the layer is approximate (empty when exact).
    """

    qtype: str
    data: np.ndarray
    exact: bool
    max_abs_err: float
    rel_err: float
    note: str = ""


def _nibbles(q: np.ndarray) -> np.ndarray:
    """``[..., 32]`` 4-bit values -> ``[..., 16]`` bytes: byte ``j`` holds ``q[j]`` low, ``q[j + 16]`` high (ggml)."""
    return (q[..., :16] & 0x0F) | ((q[..., 16:] & 0x0F) << 4)


def encode_blocks(qtype: str, q: np.ndarray, d: np.ndarray, m: np.ndarray | None = None) -> np.ndarray:
    """Pack block codes into GGML's byte layout.

    Args:
        qtype: ``"q4_0"``/``"q4_1"``/``"q5_0"`` (``q`` unsigned: 0..15, 0..15, 0..31) or ``"q8_0"`` (``q`` in -128..127).
        q: integer ``[N, B, 32]``: the stored code of each weight of each of the ``B`` blocks of each row.
        d: ``[N, B]`` block scales (rounded to fp16 here). m: ``[N, B]`` block minimums (Q4_1 only).

    Returns:
        uint8 ``[N, B * block bytes]`` (ggml ``block_q4_0`` ... laid end to end along each row).
    """
    n, b = d.shape
    dh = d.astype(np.float16)[..., None].view(np.uint8)  # [N, B, 2], little-endian fp16
    if qtype == "q4_0":
        parts = [dh, _nibbles(q.astype(np.uint8))]
    elif qtype == "q4_1":
        parts = [dh, m.astype(np.float16)[..., None].view(np.uint8), _nibbles(q.astype(np.uint8))]
    elif qtype == "q5_0":
        qu = q.astype(np.uint8)
        qh = np.packbits((qu >> 4) & 1, axis=-1, bitorder="little")  # [N, B, 4]: bit j of a uint32 = q[j]'s 5th bit
        parts = [dh, qh, _nibbles(qu)]
    elif qtype == "q8_0":
        parts = [dh, q.astype(np.int8).view(np.uint8)]
    else:
        raise GGUFExportError(f"block type {qtype!r} is not one the exporter writes: use one of {', '.join(BLOCK_TYPES)}")
    return np.ascontiguousarray(np.concatenate(parts, axis=-1).reshape(n, -1))


def decode(data: np.ndarray, qtype: str) -> np.ndarray:
    """gguf-py's dequantization of an encoded tensor: fp32 ``[N, K]``."""
    import gguf

    if qtype == "f16":
        return data.view(np.float16).astype(np.float32)
    return gguf.quants.dequantize(data, ggml_type(qtype))


def direct_encoding(layer: GPTQLayer, qtype: str) -> tuple[np.ndarray | None, str]:
    """The block-for-block encoding of ``layer`` in ``qtype`` (``d`` = the group's scale, codes shifted), or
    ``(None, reason)`` when the layer's groups or codes do not map onto ``qtype``'s blocks. The result is exact
    when the reason is empty and :func:`encode_layer`'s check passes."""
    groups, why = layer.block_groups()
    if groups is None:
        return None, why
    n, k = layer.shape
    scale = layer.scales[groups].t()  # [N, B]
    if not torch.equal(scale.half().float(), scale.float()):
        return None, f"its scales ({layer.scales.dtype}) are not all fp16 values (GGML's block scale d is fp16)"
    d = scale.half().numpy()
    zero = layer.zeros[groups].t()  # [N, B]
    codes = layer.codes.view(n, k // QK, QK)
    if qtype == "q4_1":
        if layer.bits > 4:
            return None, f"{layer.bits}-bit codes do not fit Q4_1's 4-bit codes"
        m = (-(scale.float() * zero.float())).numpy()  # rounded to fp16: exact only if it happens to be
        return encode_blocks(qtype, codes.numpy(), d, m), ""
    lo, hi = _SHIFTED_RANGE[qtype]
    cz = codes - zero[..., None]
    if int(cz.min()) < lo or int(cz.max()) > hi:
        return None, (f"code - zero spans {int(cz.min())}..{int(cz.max())}, outside {qtype.upper()}'s {lo}..{hi} "
                      f"({'asymmetric' if int(cz.max()) - int(cz.min()) >= 2 ** layer.bits - 1 else 'wide'} codes)")
    offset = {"q4_0": 8, "q5_0": 16, "q8_0": 0}[qtype]
    return encode_blocks(qtype, (cz + offset).numpy(), d), ""


def _errors(got: np.ndarray, ref: np.ndarray) -> tuple[float, float]:
    diff = got.astype(np.float64) - ref.astype(np.float64)
    norm = float(np.linalg.norm(ref.astype(np.float64)))
    return float(np.abs(diff).max()) if diff.size else 0.0, float(np.linalg.norm(diff)) / (norm or 1.0)


def approximate_type(layer: GPTQLayer, sym: bool) -> str:
    """The type a layer that no exact type holds is requantized to: Q4_0 (symmetric, up to 4 bits), Q4_1
    (asymmetric, up to 4 bits) or Q8_0 (8 bits): the size of the GPTQ layer, not a larger one."""
    if layer.bits > 4:
        return "q8_0"
    return "q4_0" if sym else "q4_1"


def encode_layer(layer: GPTQLayer, qtype: str = "auto", allow_approximate: bool = False, sym: bool = True,
                 gguf_name: str | None = None) -> EncodedLayer:
    """Encode one GPTQ layer as a GGML tensor, exactly when possible.

    Args:
        layer: the layer (rows already in the order the GGUF stores them).
        qtype: ``"auto"`` (the smallest of Q4_0, Q5_0, Q8_0 that holds it exactly) or one of :data:`BLOCK_TYPES`.
        allow_approximate: when no exact encoding exists, write the nearest one (the block-for-block mapping where
            the blocks line up, else gguf-py's round-to-nearest of the dequantized weights; F16 when the input
            size is not a multiple of 32) instead of raising.
        sym: the checkpoint's ``sym`` (picks the approximate type for ``"auto"``).
        gguf_name: the tensor's GGUF name, for messages.

    Returns:
        An :class:`EncodedLayer`; ``exact`` is decided by decoding with gguf-py and comparing bit for bit with
        :meth:`GPTQLayer.dequantize`.

    Raises:
        GGUFExportError: no exact encoding and ``allow_approximate`` is False; the message names the layer, why,
            and the options.
    """
    import gguf

    ref = layer.dequantize().numpy()
    candidates = EXACT_ORDER if qtype == "auto" else (qtype,)
    reasons = []
    for t in candidates:
        data, why = direct_encoding(layer, t)
        if data is not None:
            got = decode(data, t)
            if np.array_equal(got.view(np.int32), ref.view(np.int32)):
                return EncodedLayer(t, data, True, 0.0, 0.0)
            why = "its block values round differently in fp16 (Q4_1's m = -d*z is not an fp16 value)"
        reasons.append(f"{t.upper()}: {why}")
    whys = {r.split(": ", 1)[1] for r in reasons}
    if len(whys) == 1:  # the same reason for every type (groups, scales): say it once
        reasons = [f"{'/'.join(t.upper() for t in candidates)}: {whys.pop()}"]
    what = f"layer {layer.name}" + (f" ({gguf_name})" if gguf_name else "")
    if not allow_approximate:
        raise GGUFExportError(
            f"{what}, {layer.bits}-bit, cannot be written exactly in GGUF: {'; '.join(reasons)}. Options: re-quantize "
            "with a GGUF-exact recipe (groups of a multiple of 32 in input order, or act-order with static groups), "
            "choose another --type, or pass --allow-approximate to requantize it (max error reported)")
    t = approximate_type(layer, sym) if qtype == "auto" else qtype
    n, k = layer.shape
    data, why = direct_encoding(layer, t)
    if data is None and k % QK == 0:
        data = gguf.quants.quantize(ref, ggml_type(t))  # ggml's own round-to-nearest of the GPTQ weights
        why = why or "requantized"
    elif data is None:
        t, data = "f16", ref.astype(np.float16).view(np.uint8).reshape(n, 2 * k)
    got = decode(data, t)
    err = _errors(got, ref)
    exact = np.array_equal(got.view(np.int32), ref.view(np.int32))
    return EncodedLayer(t, data, exact, *err, note="" if exact else "; ".join(reasons))
