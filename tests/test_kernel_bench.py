"""benchmarks/kernel_bench.py runs as a script from a checkout (it is not part of the installed package)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "kernel_bench.py"


def _bench(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu", "--iters", "2", "--budget", "0", *args],
                          capture_output=True, text=True, timeout=300)


def test_every_kernel_is_timed_next_to_dense_matmul():
    p = _bench("--shapes", "256x64", "--m", "1,3", "--json")
    assert p.returncode == 0, p.stderr
    rows = json.loads(p.stdout)["rows"]
    kernels = {r["kernel"] for r in rows}
    assert kernels and "reference" not in kernels  # the slow reference runs only when named
    assert sorted((r["kernel"], r["M"]) for r in rows) == sorted((k, m) for k in kernels for m in (1, 3))
    for r in rows:
        assert (r["K"], r["N"], r["bits"], r["group_size"], r["device"]) == (256, 64, 4, 128, "cpu")
        assert r["median_us"] > 0 and r["dense_fp32_us"] > 0 and r["dense_bf16_us"] > 0
        assert r["dense_fp16_us"] is None and r["marlin_us"] is None  # GPU-only columns


def test_an_unknown_kernel_is_one_error_line():
    p = _bench("--shapes", "256x64", "--m", "1", "--kernels", "no_such_kernel")
    assert p.returncode == 2
    assert p.stderr.strip().splitlines()[-1].startswith("error: unknown kernel(s) no_such_kernel; registered: ")


def test_chosen_kernel_for_several_bit_widths_in_one_run():
    """``--bits 2,3,4,8 --chosen``: one row per bit width and M, the registry's kernel, against the same dense
    timings (one set of rounds per shape and M)."""
    p = _bench("--shapes", "256x64", "--m", "1,3", "--bits", "2,3,4,8", "--chosen", "--json")
    assert p.returncode == 0, p.stderr
    rows = json.loads(p.stdout)["rows"]
    assert sorted((r["bits"], r["M"]) for r in rows) == sorted((b, m) for b in (2, 3, 4, 8) for m in (1, 3))
    assert {r["bits"]: r["kernel"] for r in rows} == {2: "cpu_int4", 3: "cpu_int4", 4: "cpu_int4", 8: "cpu_int8"}
    assert {r["path"] for r in rows} <= {"op", "gemv", "tiles", "chunked"}  # the path each kernel took at that M
    for m in (1, 3):
        assert len({r["dense_bf16_us"] for r in rows if r["M"] == m}) == 1
