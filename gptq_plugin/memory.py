"""Memory saved by a quantized checkpoint: its tensor bytes against the 16-bit original's, split into the
quantized linears and what stays 16-bit (embeddings and ``lm_head``, norms, other unquantized tensors).

The original is counted at 2 bytes per weight (its dtype is bf16 or fp16): a quantized linear ``in x out`` was
``in * out * 2`` bytes (+ ``2 * out`` for a bias); every other floating tensor ``numel * 2``. An ``lm_head`` tied to
``embed_tokens`` is stored once, in the original as in the checkpoint, and counted once.
"""

from __future__ import annotations

# bytes per element of the safetensors dtypes (header "dtype" strings)
DTYPE_BYTES = {"F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2, "I16": 2, "U16": 2,
               "I8": 1, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}
ROWS = ("quantized linears", "embeddings + lm_head", "norms", "other 16-bit")
_FLOAT = ("F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2")


def tensor_bytes(shape: list[int], dtype: str) -> int:
    """Bytes of a tensor's data: ``prod(shape) * DTYPE_BYTES[dtype]`` (safetensors dtype name, e.g. ``"I32"``)."""
    n = 1
    for s in shape:
        n *= s
    return n * DTYPE_BYTES.get(dtype, 1)


def _row(name: str) -> str:
    leaf = name.lower()
    if "embed" in leaf or "wte" in leaf or "wpe" in leaf or leaf.startswith("lm_head"):
        return ROWS[1]
    if "norm" in leaf or ".ln_" in leaf or leaf.startswith("ln_"):
        return ROWS[2]
    return ROWS[3]


def memory_split(shapes: dict[str, tuple], layers: list[dict], owned: dict[str, str], tied: bool) -> dict:
    """The memory table of a checkpoint.

    Args:
        shapes: tensor name -> ``(shape, safetensors dtype, ...)`` of every tensor in the checkpoint's files.
        layers: the quantized linears, ``{"name", "in_features", "out_features"}`` each.
        owned: tensor name -> quantized layer name, for every tensor a quantized layer owns (its bias included).
        tied: the config ties ``lm_head`` to ``embed_tokens`` (stored once).

    Returns:
        ``{"rows": [{"part", "tensors", "checkpoint_bytes", "original_16bit_bytes"}, ...]`` (one per :data:`ROWS`
        that holds tensors), ``"checkpoint_bytes"`` (sum of the tensors' data bytes: the files' sizes less their
        safetensors headers), ``"original_16bit_bytes"``, ``"saving_percent"`` (``100 * (1 - checkpoint /
        original)``), ``"stays_16bit_share_percent"`` (the share of the original's bytes in tensors that are not
        quantized), ``"tied_embeddings"``}.
    """
    rows = {r: {"part": r, "tensors": 0, "checkpoint_bytes": 0, "original_16bit_bytes": 0} for r in ROWS}
    q = rows[ROWS[0]]
    for layer in layers:
        q["original_16bit_bytes"] += layer["in_features"] * layer["out_features"] * 2
    for k, (shape, dt, *_) in shapes.items():
        nbytes = tensor_bytes(shape, dt)
        if k in owned:
            q["tensors"] += 1
            q["checkpoint_bytes"] += nbytes
            if k.endswith(".bias"):
                q["original_16bit_bytes"] += nbytes // DTYPE_BYTES.get(dt, 1) * 2
            continue
        r = rows[_row(k)]
        r["tensors"] += 1
        r["checkpoint_bytes"] += nbytes
        r["original_16bit_bytes"] += nbytes // DTYPE_BYTES[dt] * 2 if dt in _FLOAT else nbytes
    out = [r for r in rows.values() if r["tensors"]]
    ck = sum(r["checkpoint_bytes"] for r in out)
    orig = sum(r["original_16bit_bytes"] for r in out)
    return {"rows": out, "checkpoint_bytes": ck, "original_16bit_bytes": orig,
            "saving_percent": 100 * (1 - ck / orig) if orig else None,
            "stays_16bit_share_percent": 100 * (1 - q["original_16bit_bytes"] / orig) if orig else None,
            "tied_embeddings": tied}


def format_memory(mem: dict) -> list[str]:
    """The memory table as text lines (a Markdown table and a summary line), sizes in MB (10^6 bytes)."""
    def saved(ck: int, orig: int) -> str:
        return f"{100 * (1 - ck / orig):.1f}%" if orig else "-"

    lines = [f"| {'part':<22} | {'tensors':>7} | {'checkpoint MB':>13} | {'16-bit original MB':>18} | {'saved':>6} |",
             f"|{'-' * 24}|{'-' * 9}|{'-' * 15}|{'-' * 20}|{'-' * 8}|"]
    for r in mem["rows"]:
        lines.append(f"| {r['part']:<22} | {r['tensors']:>7} | {r['checkpoint_bytes'] / 1e6:>13.2f} | "
                     f"{r['original_16bit_bytes'] / 1e6:>18.2f} | "
                     f"{saved(r['checkpoint_bytes'], r['original_16bit_bytes']):>6} |")
    lines.append(f"| {'total':<22} | {sum(r['tensors'] for r in mem['rows']):>7} | "
                 f"{mem['checkpoint_bytes'] / 1e6:>13.2f} | {mem['original_16bit_bytes'] / 1e6:>18.2f} | "
                 f"{saved(mem['checkpoint_bytes'], mem['original_16bit_bytes']):>6} |")
    if mem["saving_percent"] is not None:
        lines.append(f"saving {mem['saving_percent']:.1f}% of the 16-bit original; "
                     f"{mem['stays_16bit_share_percent']:.1f}% of the original stays 16-bit (not quantized)"
                     + ("; lm_head is tied to the embedding and stored once" if mem["tied_embeddings"] else ""))
    return lines
