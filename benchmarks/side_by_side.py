"""gptq-plugin vs GPTQModel, side by side, same machine, same thread count, one configuration after the other.

For each configuration (4-bit g64 sym by default, act-order off and on) it runs, one at a time, never in parallel:
  1. `gptq-plugin quantize` (our CLI, its own process, `--threads T`), then `gptq-plugin eval` on the checkpoint;
  2. `benchmarks/gptqmodel_baseline.py` in GPTQModel's own venv (`bash benchmarks/setup_gptqmodel_venv.sh`),
     `--threads T` (torch threads; GPTQModel's CPU worker pool is max(2, T): it refuses fewer), which quantizes
     and saves; its checkpoint is then evaluated by `gptq-plugin eval`, the same protocol as ours.
Quantize wall time is the quantization call alone for both (our CLI's "quantized ... in X s" line, GPTQModel's
`quant_wall_s`): model load, save and evaluation are left out of both. Peak RSS is the process's.

    python benchmarks/side_by_side.py --out /tmp/sbs --threads 1 [--configs 4:64:noao,4:64:ao]

Needs the demo model (`gptq-plugin demo-model`), `../shared/data`, and `.venv-gptqmodel`. Prints a markdown
table and appends JSON lines to OUT/side_by_side.jsonl.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from quality import PLAIN  # noqa: E402  (plain GPTQ: every part of the default recipe off by name)


def timed(cmd: list[str], env: dict) -> tuple[subprocess.CompletedProcess, float, float]:
    """Run ``cmd`` under /usr/bin/time -v: (process, wall s, peak RSS MB)."""
    t0 = time.time()
    p = subprocess.run(["/usr/bin/time", "-v", *cmd], capture_output=True, text=True, env=env)
    wall = time.time() - t0
    if p.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed (exit {p.returncode}):\n{p.stderr[-3000:]}")
    m = re.search(r"Maximum resident set size \(kbytes\): (\d+)", p.stderr)
    return p, wall, int(m.group(1)) / 1024 if m else float("nan")


def cpu_seconds(stderr: str) -> float:
    u = re.search(r"User time \(seconds\): ([\d.]+)", stderr)
    s = re.search(r"System time \(seconds\): ([\d.]+)", stderr)
    return float(u.group(1)) + float(s.group(1)) if u and s else float("nan")


def ours(model: str, out: Path, bits: str, group: str, ao: bool, a, env: dict, extra: list[str]) -> dict:
    exe = [sys.executable, "-m", "gptq_plugin.cli"]
    p, wall, rss = timed([*exe, "quantize", model, str(out), "--bits", bits, "--group-size", group, "--overwrite",
                          "--nsamples", str(a.nsamples), "--threads", str(a.threads),
                          "--act-order" if ao else "--no-act-order",
                          *(extra or PLAIN)], env)  # plain GPTQ unless flags given
    m = re.search(r"in ([\d.]+) s, peak RSS", p.stdout)
    ev, _, _ = timed([*exe, "eval", str(out), "--windows", str(a.windows), "--json", "--threads", str(a.threads)], env)
    return {"tool": "gptq-plugin", "quant_wall_s": float(m.group(1)), "process_wall_s": round(wall, 1),
            "process_cpu_s": cpu_seconds(p.stderr), "peak_rss_mb": round(rss),
            "perplexity": json.loads(ev.stdout.strip().splitlines()[-1])["perplexity"]}


def gptqmodel(model: str, out: Path, bits: str, group: str, ao: bool, a, env: dict, extra: list[str]) -> dict:
    py = ROOT / a.gptqmodel_venv / "bin" / "python"
    if not py.exists():
        raise SystemExit(f"{py} not found: run `bash benchmarks/setup_gptqmodel_venv.sh` first")
    calib = Path(a.data) / "wikitext-2" / "valid.tokens.txt"
    p, wall, rss = timed([str(py), str(ROOT / "benchmarks" / "gptqmodel_baseline.py"), model, str(calib), str(out),
                          "--bits", bits, "--group-size", group, "--act-order" if ao else "--no-act-order",
                          "--threads", str(a.threads), "--nsamples", str(a.nsamples),
                          "--no-eval", *extra], env)
    rec = json.loads([l for l in p.stdout.strip().splitlines() if l.startswith("{")][-1])
    # the same evaluation as ours, through our reader (GPTQModel's own TORCH-backend evaluation takes ~5x
    # longer here; tests/interop checks that both give the same perplexity on its checkpoints)
    ev, _, _ = timed([sys.executable, "-m", "gptq_plugin.cli", "eval", str(out), "--windows", str(a.windows),
                      "--json", "--threads", str(a.threads)], env)
    return {"tool": f"GPTQModel {rec.get('version')}", "quant_wall_s": rec["quant_wall_s"],
            "process_wall_s": round(wall, 1), "process_cpu_s": cpu_seconds(p.stderr),
            "peak_rss_mb": rec["peak_rss_mb"],
            "perplexity": json.loads(ev.stdout.strip().splitlines()[-1])["perplexity"]}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--model", default=None, help="HF model folder (default: the demo model)")
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data"))
    ap.add_argument("--configs", default="4:64:noao,4:64:ao",
                    help="comma list of BITS:GROUP:(ao|noao)[:FLAG...]: plain GPTQ (every part of the default recipe "
                         "off) on our side unless FLAGs (e.g. static-groups:mse=2.4) are given")
    ap.add_argument("--gptqmodel-flags", default="", help="extra flags for benchmarks/gptqmodel_baseline.py")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--nsamples", type=int, default=128)
    ap.add_argument("--windows", type=int, default=40)
    ap.add_argument("--gptqmodel-venv", default=".venv-gptqmodel")
    ap.add_argument("--tools", default="ours,gptqmodel")
    a = ap.parse_args(argv)
    if a.model is None:
        from gptq_plugin.tools.demo import get_demo_model

        a.model = str(get_demo_model())
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "OMP_NUM_THREADS": str(a.threads), "GPTQMODEL_CPU_WORKERS": str(max(2, a.threads))}
    a.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for spec in a.configs.split(","):
        bits, group, mode, *ours_flags = spec.split(":")
        for tool in a.tools.split(","):
            run = ours if tool == "ours" else gptqmodel
            out = a.out / f"{tool}-{bits}b-g{group}-{mode}{''.join('-' + f for f in ours_flags)}-t{a.threads}"
            load = os.getloadavg()[0]
            extra = [f"--{f}" for f in ours_flags] if tool == "ours" else a.gptqmodel_flags.split()
            row = {"config": f"{bits}-bit g{group} sym" + (" act-order" if mode == "ao" else ""),
                   "threads": a.threads, "load_avg_1m_start": round(load, 2), "flags": " ".join(extra),
                   **run(a.model, out, bits, group, mode == "ao", a, env, extra)}
            rows.append(row)
            with open(a.out / "side_by_side.jsonl", "a") as f:
                f.write(json.dumps(row) + "\n")
            print(json.dumps(row), flush=True)
    print(f"\n| configuration | tool | flags | threads | quantize wall s | process CPU s | peak RSS MB | ppl ({a.windows}x512) |")
    print("|---|---|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['config']} | {r['tool']} | {r['flags'] or '-'} | {r['threads']} | {r['quant_wall_s']:.0f} | {r['process_cpu_s']:.0f} | "
              f"{r['peak_rss_mb']:.0f} | {r['perplexity']:.2f} |")


if __name__ == "__main__":
    main()
