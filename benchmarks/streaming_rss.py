"""Peak memory of streaming quantization against model size, under a hard memory limit.

Quantizes a (synthetic) model folder with `gptq-plugin quantize --streaming` in a child process placed in a fresh
memory cgroup whose limit is `--limit-gb` (cgroup v1 `memory.limit_in_bytes` or v2 `memory.max`; needs a writable
/sys/fs/cgroup, e.g. root in a container; without one the run is unlimited and the table says so). The page cache
of the shards read counts in the cgroup but is reclaimable; peak RSS is the child's (getrusage, anonymous + mapped).

    gptq-plugin synthetic-model /data/llama7b-shape --tokenizer-from ~/.cache/gptq-plugin/SmolLM2-135M-Instruct
    python benchmarks/streaming_rss.py /data/llama7b-shape --limit-gb 4 --out /tmp/rss -- --nsamples 16 --seqlen 128

Arguments after `--` go to `gptq-plugin quantize`. Prints a markdown table and appends a JSON line to
benchmarks/results/streaming.jsonl (or --results).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def block_bytes(model: Path) -> tuple[int, int, int]:
    """(bytes on disk, number of decoder blocks, bytes of one decoder block in fp32) from the shard headers."""
    from gptq_plugin.streaming import SourceWeights

    src = SourceWeights(model)
    cfg = json.loads((model / "config.json").read_text())
    n_blocks = int(cfg["num_hidden_layers"])
    disk = sum(f.stat().st_size for f in set(src.where.values()))
    block = sum(4 * torch.Size(shape).numel() for k, (shape, _) in src.shapes.items() if k.startswith("model.layers.0."))
    return disk, n_blocks, block


def make_cgroup(limit: int) -> tuple[Path | None, str]:
    """A fresh memory cgroup limited to ``limit`` bytes: (its procs file, description) or (None, why not)."""
    name = f"gptq-plugin-rss-{os.getpid()}"
    why = "no memory cgroup found"
    for base, limit_file in ((Path("/sys/fs/cgroup/memory"), "memory.limit_in_bytes"),
                             (Path("/sys/fs/cgroup"), "memory.max")):
        if not (base / "cgroup.procs").exists():
            continue
        try:
            (base / name).mkdir()
            (base / name / limit_file).write_text(str(limit))
        except OSError as e:
            why = f"no writable memory cgroup ({e})"
            continue
        return base / name / "cgroup.procs", f"{limit / 2**30:.1f} GiB (cgroup {limit_file})"
    return None, f"none: {why}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", type=Path)
    ap.add_argument("--limit-gb", type=float, default=4.0)
    ap.add_argument("--out", type=Path, default=Path("/tmp/gptq-plugin-rss"))
    ap.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results" / "streaming.jsonl")
    argv = sys.argv[1:]
    cut = argv.index("--") if "--" in argv else len(argv)
    a = ap.parse_args(argv[:cut])
    a.quantize_args = argv[cut + 1:]
    disk, n_blocks, block = block_bytes(a.model)
    procs, limit_desc = make_cgroup(int(a.limit_gb * 2**30))
    shutil.rmtree(a.out, ignore_errors=True)
    cmd = [sys.executable, "-m", "gptq_plugin.cli", "quantize", str(a.model), str(a.out), "--streaming",
           *a.quantize_args]

    def enter_cgroup():
        if procs is not None:
            procs.write_text(str(os.getpid()))

    t0 = time.time()
    p = subprocess.run(cmd, preexec_fn=enter_cgroup, capture_output=True, text=True,
                       env={**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"})
    wall = time.time() - t0
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    if procs is not None:
        try:
            procs.parent.rmdir()
        except OSError:
            pass
    if p.returncode != 0:
        raise SystemExit(f"quantize failed (exit {p.returncode}; killed by the memory limit if -9):\n{p.stderr[-3000:]}")
    m = re.search(r"in ([\d.]+) s", p.stdout)
    row = {"model": str(a.model), "disk_gb": disk / 1e9, "blocks": n_blocks, "block_fp32_gb": block / 1e9,
           "limit": limit_desc, "peak_rss_gb": peak / 1e9, "wall_s": wall,
           "quantize_s": float(m.group(1)) if m else None, "args": a.quantize_args,
           "threads": torch.get_num_threads(), "date": time.strftime("%Y-%m-%d")}
    a.results.parent.mkdir(parents=True, exist_ok=True)
    with open(a.results, "a") as f:
        f.write(json.dumps(row) + "\n")
    print("| model on disk | decoder blocks | one block fp32 | memory limit | peak RSS | peak / block | wall |")
    print("|---:|---:|---:|---|---:|---:|---:|")
    print(f"| {disk / 1e9:.1f} GB | {n_blocks} | {block / 1e9:.2f} GB | {limit_desc} | {peak / 1e9:.2f} GB | "
          f"{peak / block:.1f}x | {wall:.0f} s |")
    print("\n".join(l for l in p.stdout.splitlines() if l.startswith(("quantized", "mean relative"))))


if __name__ == "__main__":
    main()
