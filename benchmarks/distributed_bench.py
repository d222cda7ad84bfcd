"""1 process against N torch.distributed ranks (torchrun, gloo) on the same model, same machine, one run: quantize
wall time, peak RSS of every rank, and whether the checkpoints are byte-identical (SHA-256 of every file).

    python benchmarks/distributed_bench.py [--model DIR] [--ranks 2] [--threads 1] [--extra one-pass-2t,low-memory]
        [--baseline CHECKOUT [--baseline-threads 2]]

``--ranks 0`` leaves the torchrun row out (e.g. to compare one process before and after a change:
``--ranks 0 --threads 1 --baseline /tmp/base --baseline-threads 1``).

Each configuration is one ``gptq-plugin quantize`` (or ``torchrun ... -m gptq_plugin.cli quantize``) subprocess, run
one after the other, with the default recipe; ``--threads`` torch threads per process (torchrun's default is 1 per
rank, so compare like with like). ``--extra`` adds single-process rows: ``one-pass-2t`` (two threads, one pass:
today's default on a 2-core machine) and ``low-memory`` (``--low-memory``, two threads). The first row is the
reference the others' speed-up and bytes are compared with. Prints one Markdown table.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _digest(folder: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(p for p in folder.rglob("*") if p.is_file()):
        h.update(f.relative_to(folder).as_posix().encode())
        h.update(f.read_bytes())
    return h.hexdigest()


def _run(label: str, cmd: list[str], env: dict, out: Path, cwd: Path | None = None) -> dict:
    t = time.time()
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=cwd)
    wall = time.time() - t
    if p.returncode != 0 or not out.is_dir():
        sys.exit(f"{label}: exit {p.returncode}\n{p.stderr[-3000:]}")
    m = re.search(r"in ([\d.]+) s, peak RSS ([\d / ]+) MB", p.stdout)
    if not m:
        sys.exit(f"{label}: no result line in its output:\n{p.stdout[-2000:]}")
    return {"label": label, "quantize_s": float(m.group(1)), "process_s": wall,
            "rss": [int(x) for x in m.group(2).split("/")], "digest": _digest(out)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=Path.home() / ".cache/gptq-plugin/SmolLM2-135M-Instruct",
                    help="unquantized model folder (default: the demo model, `gptq-plugin demo-model` makes it)")
    ap.add_argument("--ranks", type=int, default=2, help="ranks of the torchrun row (0: no torchrun row)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per process")
    ap.add_argument("--extra", default="", help="comma-separated extra single-process rows: one-pass-2t, low-memory")
    ap.add_argument("--args", default="", help="extra quantize arguments for every row (e.g. '--nsamples 64')")
    ap.add_argument("--baseline", type=Path, default=None,
                    help="a checkout of another revision (e.g. `git worktree add /tmp/base HEAD~1`): one more row, "
                         "its `python -m gptq_plugin.cli quantize` run from there with --baseline-threads threads "
                         "(the memory and time before a change, side by side)")
    ap.add_argument("--baseline-threads", type=int, default=2)
    a = ap.parse_args()
    if not (a.model / "config.json").is_file():
        sys.exit(f"{a.model}: no model folder there; run `gptq-plugin demo-model {a.model}` first or pass --model")

    base_env = dict(os.environ, OMP_NUM_THREADS=str(a.threads))
    extra = a.args.split()
    rows = []
    with tempfile.TemporaryDirectory(prefix="dist-bench-") as tmp:
        tmp = Path(tmp)
        out = tmp / "r1"
        rows.append(_run(f"1 process, {a.threads} thread(s)", ["gptq-plugin", "quantize", str(a.model), str(out),
                                                               "--threads", str(a.threads), *extra], base_env, out))
        out = tmp / f"r{a.ranks}"
        rows.append(None if a.ranks < 1 else _run(f"torchrun {a.ranks} ranks (gloo), {a.threads} thread(s) each",
                         [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(a.ranks),
                          "--master-port", str(_free_port()), "-m", "gptq_plugin.cli", "quantize", str(a.model),
                          str(out), "--threads", str(a.threads), *extra], base_env, out))
        for name in filter(None, a.extra.split(",")):
            out = tmp / name
            flags = {"one-pass-2t": ["--one-pass"], "low-memory": ["--low-memory"]}.get(name)
            if flags is None:
                sys.exit(f"--extra {name}: use one-pass-2t or low-memory")
            rows.append(_run(f"1 process, 2 threads, {flags[0]}", ["gptq-plugin", "quantize", str(a.model), str(out),
                                                                   "--threads", "2", *flags, *extra],
                             dict(os.environ, OMP_NUM_THREADS="2"), out))

        if a.baseline is not None:
            out = tmp / "baseline"
            bt = str(a.baseline_threads)
            rows.append(_run(f"1 process, {bt} thread(s), {a.baseline.name} (baseline checkout)",
                             [sys.executable, "-m", "gptq_plugin.cli", "quantize", str(a.model), str(out), "--threads",
                              bt, *extra], dict(os.environ, OMP_NUM_THREADS=bt, PYTHONPATH=str(a.baseline)), out,
                             cwd=a.baseline))
        rows = [r for r in rows if r is not None]

    ref = rows[0]
    print(f"\nmodel {a.model.name}, default recipe{' ' + a.args if a.args else ''}; load average before: "
          f"{os.getloadavg()[0]:.2f}; {os.cpu_count()} CPUs\n")
    print("| configuration | quantize wall s | process wall s | speed-up vs row 1 | peak RSS MB per rank | "
          "checkpoint = row 1 |")
    print("| --- | ---: | ---: | ---: | --- | --- |")
    for r in rows:
        print(f"| {r['label']} | {r['quantize_s']:.1f} | {r['process_s']:.1f} | "
              f"{ref['quantize_s'] / r['quantize_s']:.2f}x | {' / '.join(map(str, r['rss']))} | "
              f"{'yes' if r['digest'] == ref['digest'] else 'NO'} ({r['digest'][:12]}) |")


if __name__ == "__main__":
    main()
