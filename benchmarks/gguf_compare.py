"""GPTQ in llama.cpp's own format: perplexity of a GPTQ checkpoint, of its exact GGUF export, and of the `gguf`
package's own round-to-nearest quantization of the original model, on the same windows (docs/gguf.md).

    python benchmarks/gguf_compare.py --original DEMO_DIR --ckpt GPTQ_CKPT --work DIR [--windows 40]
        [--rtn-type q4_0] [--llama-cpp-python /tmp/llama-venv/bin/python]

Rows: the original model (fp32), the GPTQ checkpoint through the plugin, its export (`gptq-plugin export`) through
Transformers' GGUF loader, the original model quantized by gguf-py (`gguf.quants.quantize`: ggml's Q4_0, blocks of
32, round-to-nearest; every decoder linear, embeddings F16, as the GPTQ export) through the same loader, and, with
--llama-cpp-python, both GGUF files through llama.cpp itself (benchmarks/llama_cpp_ppl.py). Perplexity protocol
of gptq_plugin.evaluate (WikiText-2 test, windows of 512 tokens, the first --windows).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import time
from pathlib import Path

import torch


def rtn_gguf(original: Path, out: Path, qtype: str = "q4_0") -> Path:
    """The original model as GGUF with every decoder linear quantized by gguf-py (ggml's RTN) in ``qtype``."""
    import gguf
    from safetensors.torch import load_file

    from gptq_plugin.gguf_export import (_model_config, _permutation_for, _plain_tensor, add_metadata, add_tokenizer)
    from gptq_plugin.gguf_blocks import ggml_type

    config, arch = _model_config(original)
    state = {}
    for f in sorted(original.glob("*.safetensors")):
        state.update(load_file(str(f)))
    tmap = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], config["num_hidden_layers"])
    w = gguf.GGUFWriter(out, arch)
    add_metadata(w, config, original, None, getattr(gguf.LlamaFileType, f"MOSTLY_{qtype.upper()}"))
    add_tokenizer(w, original, config["vocab_size"])
    for key in sorted(state):
        if config.get("tie_word_embeddings") and key == "lm_head.weight":
            continue
        t = state[key]
        perm = _permutation_for(key.rsplit(".", 1)[0], t.shape[0], config) if t.dim() else None
        if perm is not None:
            t = t[perm]
        name = tmap.get_name(key, try_suffixes=(".weight", ".bias"))
        if key.startswith("model.layers.") and t.dim() == 2:
            w.add_tensor(name, gguf.quants.quantize(t.float().numpy(), ggml_type(qtype)), raw_dtype=ggml_type(qtype))
        else:
            arr, kind = _plain_tensor(t, "f16")
            w.add_tensor(name, arr) if kind in ("f16", "f32") else w.add_tensor(name, arr, raw_dtype=ggml_type(kind))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--original", type=Path, required=True)
    ap.add_argument("--ckpt", type=Path, required=True)
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--windows", type=int, default=40)
    ap.add_argument("--rtn-type", default="q4_0")
    ap.add_argument("--llama-cpp-python", default=None)
    ap.add_argument("--skip-original", action="store_true")
    args = ap.parse_args()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from gptq_plugin.checkpoint import load_quantized
    from gptq_plugin.evaluate import eval_windows, perplexity
    from gptq_plugin.gguf_export import export_gguf

    args.work.mkdir(parents=True, exist_ok=True)
    ids = eval_windows(AutoTokenizer.from_pretrained(args.original), None, 512, args.windows)
    rows = []

    def row(name, fn):
        t0 = time.time()
        ppl = fn()
        rows.append({"model": name, "perplexity": round(ppl, 4), "seconds": round(time.time() - t0, 1)})
        print(json.dumps(rows[-1]), flush=True)

    if not args.skip_original:
        row("original (bf16 weights, fp32 compute)", lambda: perplexity(
            AutoModelForCausalLM.from_pretrained(args.original, dtype=torch.float32), ids, progress=False))
    row(f"GPTQ checkpoint, plugin ({args.ckpt.name})", lambda: perplexity(load_quantized(args.ckpt), ids, progress=False))
    gptq_gguf = args.work / "gptq.gguf"
    rep = export_gguf(args.ckpt, gptq_gguf, overwrite=True, modelfile=False)
    print(rep.summary().splitlines()[0], flush=True)
    row("GPTQ export, Transformers GGUF loader", lambda: perplexity(
        AutoModelForCausalLM.from_pretrained(args.work, gguf_file=gptq_gguf.name, dtype=torch.float32), ids, progress=False))
    rtn = rtn_gguf(args.original, args.work / f"rtn-{args.rtn_type}.gguf", args.rtn_type)
    row(f"gguf-py {args.rtn_type.upper()} RTN of the original, Transformers GGUF loader", lambda: perplexity(
        AutoModelForCausalLM.from_pretrained(args.work, gguf_file=rtn.name, dtype=torch.float32), ids, progress=False))
    if args.llama_cpp_python:
        (args.work / "ids.json").write_text(json.dumps(ids.tolist()))
        script = Path(__file__).with_name("llama_cpp_ppl.py")
        for label, f in (("GPTQ export, llama.cpp", gptq_gguf), (f"gguf-py {args.rtn_type.upper()} RTN, llama.cpp", rtn)):
            def run(f=f):
                p = subprocess.run([args.llama_cpp_python, str(script), str(f), str(args.work / "ids.json")],
                                   capture_output=True, text=True, check=True)
                return json.loads(p.stdout.strip().splitlines()[-1])["perplexity"]
            row(label, run)
    print("\n| model | perplexity |\n| --- | --- |")
    for r in rows:
        print(f"| {r['model']} | {r['perplexity']:.4f} |")
    (args.work / "results.json").write_text(json.dumps({"windows": args.windows, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
