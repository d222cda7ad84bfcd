"""Quality and cost table on the demo model: original vs RTN vs GPTQ (4/3-bit, act-order on/off, group 64/128).

Protocol (shared/data/README.md): calibration = the first NSAMPLES windows of 512 tokens of WikiText-2 valid;
perplexity = WikiText-2 test, first 40 windows of 512 tokens, fp32 compute. Each configuration runs in its own
process (`gptq-plugin quantize` then `gptq-plugin eval --json`) so wall time and peak RSS are its own.

    python benchmarks/quality.py --out /tmp/quality [--configs 4:64:rec,4:64:noao,3:64:ao,3:64:rtn] [--threads 2]

Modes: rtn (round-to-nearest, min-max), noao (plain GPTQ), ao (plain GPTQ with act-order), rec (the CLI's default
recipe, docs/quality.md: group-aware order, MSE clipping 2.4, refit scales, GPTAQ 0.25); extra `:flag` or
`:flag=value` items are passed on.

Prints a markdown table and appends one JSON line per configuration to OUT/results.jsonl.
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

DEFAULT = ("fp,4:64:rtn,4:64:noao,4:64:ao,4:64:rec,4:128:rtn,4:128:noao,4:128:ao,4:128:rec,"
           "3:64:rtn,3:64:noao,3:64:ao,3:64:rec,3:128:rtn,3:128:noao,3:128:ao,3:128:rec")
# noao / ao: plain GPTQ (min-max grids updated during the sweep), as GPTQModel runs it, so every part of the
# default recipe is turned off by name; rec: the CLI's defaults
PLAIN = ["--no-static-groups", "--mse", "0", "--no-act-group-aware", "--no-refit-scales", "--gptaq", "0"]
MODE_FLAGS = {"rtn": ["--mse", "0"], "noao": ["--no-act-order", *PLAIN], "ao": ["--act-order", *PLAIN], "rec": []}


def run(cmd: list[str], env: dict) -> tuple[str, float, float]:
    """Run ``cmd`` under /usr/bin/time -v; return (stdout, wall seconds, peak RSS MB)."""
    t0 = time.time()
    p = subprocess.run(["/usr/bin/time", "-v", *cmd], capture_output=True, text=True, env=env)
    wall = time.time() - t0
    if p.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{p.stderr[-2000:]}")
    m = re.search(r"Maximum resident set size \(kbytes\): (\d+)", p.stderr)
    return p.stdout, wall, (int(m.group(1)) / 1024 if m else float("nan"))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="HF model folder (default: the demo model)")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--configs", default=DEFAULT,
                    help="comma list of fp | BITS:GROUP:(rtn|noao|ao|rec)[:extra flags]")
    ap.add_argument("--nsamples", type=int, default=128)
    ap.add_argument("--windows", type=int, default=40)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    a = ap.parse_args(argv)
    exe = [sys.executable, "-m", "gptq_plugin.cli"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    if a.model is None:
        from gptq_plugin.tools.demo import get_demo_model

        a.model = str(get_demo_model())
    a.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for spec in a.configs.split(","):
        if spec == "fp":
            name, target, qwall, qrss = "original", a.model, None, None
        else:
            bits, group, mode, *extra = spec.split(":")
            name = {"rtn": "RTN", "noao": "GPTQ", "ao": "GPTQ act-order",
                    "rec": "GPTQ default recipe"}[mode]
            name = f"{name} {bits}-bit g{group}"
            if extra:
                name += " " + " ".join(extra)
            target = str(a.out / spec.replace(":", "_").replace("-", ""))
            cmd = [*exe, "quantize", a.model, target, "--bits", bits, "--group-size", group, "--overwrite",
                   "--nsamples", str(a.nsamples), "--threads", str(a.threads),
                   "--method", "rtn" if mode == "rtn" else "gptq", *MODE_FLAGS[mode],
                   *[f"--{e}" if "=" not in e else f"--{e.split('=')[0]}={e.split('=')[1]}" for e in extra]]
            _, qwall, qrss = run(cmd, env)
        out, _, erss = run([*exe, "eval", target, "--windows", str(a.windows), "--json", "--threads", str(a.threads)], env)
        res = json.loads(out.strip().splitlines()[-1])
        row = {"config": name, "spec": spec, "perplexity": res["perplexity"], "quant_wall_s": qwall,
               "quant_peak_rss_mb": qrss, "threads": a.threads, "nsamples": a.nsamples, "windows": res["windows"]}
        rows.append(row)
        with open(a.out / "results.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
        print(json.dumps(row), flush=True)
    print(f"\n| configuration | WikiText-2 ppl ({a.windows}x512) | quantize wall s | quantize peak RSS MB |")
    print("|---|---:|---:|---:|")
    for r in rows:
        w = "-" if r["quant_wall_s"] is None else f"{r['quant_wall_s']:.0f}"
        m = "-" if r["quant_peak_rss_mb"] is None else f"{r['quant_peak_rss_mb']:.0f}"
        print(f"| {r['config']} | {r['perplexity']:.2f} | {w} | {m} |")


if __name__ == "__main__":
    main()
