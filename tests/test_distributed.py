"""Quantizing across torch.distributed ranks and placing blocks on a device (issue 15), all on CPU:

* the fixed-order Hessian sum (:class:`~gptq_plugin.distributed.GramTree`) against an independent computation,
  whatever contiguous ranges of batches separate trees sum;
* how batches and layers are split over ranks (:meth:`Ranks.batches`, :meth:`Ranks.owners`);
* 1 process vs 2 and 3 gloo ranks under ``torchrun``: byte-identical checkpoints (one pass, low memory, streaming,
  ``--damp-percent auto``, ``--gptaq``);
* a rank SIGKILLed mid-run: one clear error, a non-zero exit, no output; the same command resumes to the same bytes;
* clear errors: more ranks than batches, ranks started with different configurations, a collective that times
  out, ``--device cuda`` without CUDA, an unknown device;
* ``--device cpu`` equals the default bit for bit; the device placement of a block (``driver._on_device``) on the
  ``meta`` device, and a whole run through the moving path (``cpu:0``) giving the same bytes.

What needs a GPU and is not covered here: real host <-> CUDA copies, NCCL, bf16 forwards chosen by
``--forward-dtype auto`` on CUDA, and the free-memory check of ``_one_pass_fits`` on a CUDA device.

The torchrun runs of one world size share one launch (:data:`_JOB`: several CLI commands in one process group, to
keep the file fast on two cores); the killed-rank test launches ``python -m torch.distributed.run ... -m
gptq_plugin.cli quantize`` exactly as a user does."""

from __future__ import annotations

import contextlib
import io
import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest
import torch
from torch import nn

from gptq_plugin import driver
from gptq_plugin.config import QuantizeConfig
from gptq_plugin.distributed import GramTree, Ranks, resolve_device
from gptq_plugin.errors import ConfigError, NumericalError
from gptq_plugin.pipeline import quantize_model
from gptq_plugin.solver import HessianAccumulator

from .test_reliability_cli import _calib_text, _save_tiny, cli, digests, one_error
from .tiny import tiny_llama

REPO = Path(__file__).resolve().parents[1]
TIMEOUT_S = 180  # any subprocess of this file; a collective gives up after GPTQ_PLUGIN_DIST_TIMEOUT (60 s) first
# 13 windows in batches of 2: 7 batches, the last one of a single window; 2 ranks take [0, 3) [3, 7), 3 ranks
# [0, 2) [2, 4) [4, 7): ranges that cut the Hessian tree's subtrees
SMALL = ["--nsamples", "13", "--seqlen", "32", "--batch-size", "2", "--group-size", "32", "--threads", "1"]
MODES = {"one-pass": ["--one-pass"], "low-memory": ["--low-memory"], "streaming": ["--streaming"],
         # held-out Hessians of the even and odd batches: two trees, cut by the ranks' ranges too
         "damp-auto": ["--one-pass", "--damp-percent", "auto"],
         # GPTAQ's asymmetric term: a second tree per group, cut by the ranks' ranges as well
         "gptaq": ["--gptaq", "0.25"]}
_MODES_OF = {2: ["one-pass", "streaming", "damp-auto", "gptaq"],
             3: ["one-pass", "streaming", "low-memory", "gptaq"]}  # per launch


@pytest.fixture(autouse=True)
def _keep_threads():
    """``--threads 1`` in an in-process CLI run sets torch's thread count for the whole session: restore it."""
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("dist")
    return {"model": _save_tiny(d / "model", layers=3), "calib": _calib_text(d / "calib.txt"), "dir": d}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(**extra: str) -> dict[str, str]:
    """This environment for a child process: one thread, a short collective timeout, this checkout's package, no
    progress bars, and no torch.distributed variables of an outer launcher."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", GPTQ_PLUGIN_DIST_TIMEOUT="60", TQDM_DISABLE="1",
               PYTHONPATH=os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p))
    env.update(extra)
    return env


def _torchrun(n: int) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(n), "--master-addr", "127.0.0.1",
            "--master-port", str(_free_port())]


def _error_lines(err: str) -> list[str]:
    return [l for l in err.splitlines() if l.startswith("error")]


def _our_traceback(err: str) -> bool:
    """Whether ``err`` holds a traceback through gptq-plugin's code (torchrun prints its own, for a failed rank)."""
    return re.search(r'File ".*gptq_plugin[/\\]', err) is not None


# --- 1. the fixed-order Hessian sum ------------------------------------------------------------------------------
def _leaves(n: int, seed: int = 0) -> list[torch.Tensor]:
    """``n`` fp32 6x6 matrices whose magnitudes span 1e-3 .. 1e3, so that the order of the additions shows in the
    bits."""
    g = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    return [torch.randn(6, 6, generator=g) * 10.0 ** rng.randint(-3, 3) for _ in range(n)]


def _reference(leaves: list[torch.Tensor]) -> torch.Tensor:
    """Σ leaves in the order GramTree documents, computed independently of it: ``[0, n)`` cut into the aligned
    power-of-two blocks given by ``n``'s binary digits (largest first), each summed as a perfect binary tree (left +
    right), the blocks then added from the left."""

    def perfect(lo: int, size: int) -> torch.Tensor:
        if size == 1:
            return leaves[lo].clone()
        return perfect(lo, size // 2) + perfect(lo + size // 2, size // 2)

    n, lo, acc = len(leaves), 0, None
    for bit in reversed(range(n.bit_length())):
        if n >> bit & 1:
            block = perfect(lo, 1 << bit)
            acc = block if acc is None else acc + block
            lo += 1 << bit
    return acc


def _tree_of(leaves: list[torch.Tensor], lo: int, hi: int) -> GramTree:
    tree = GramTree()
    for b in range(lo, hi):
        tree.push(0, b, leaves[b].clone())
    return tree


def _splits(n: int):
    """Every cut of ``[0, n)`` into 1, 2 or 3 contiguous non-empty ranges, and the cut into ``n`` single batches."""
    yield [(0, n)]
    for a in range(1, n):
        yield [(0, a), (a, n)]
        for b in range(a + 1, n):
            yield [(0, a), (a, b), (b, n)]
    if n > 3:
        yield [(b, b + 1) for b in range(n)]


@pytest.mark.parametrize("n", range(1, 18))
def test_gram_tree_is_the_same_whatever_the_split(n):
    """Pieces of separate trees over contiguous ranges, pushed in order into one tree (what ``Ranks.all_pieces``
    does), give exactly the single tree's total, which is exactly the independent reference, and the float64 sum
    within fp32 rounding."""
    leaves = _leaves(n, seed=n)
    single = _tree_of(leaves, 0, n).total()
    assert torch.equal(single, _reference(leaves))
    exact = torch.stack([l.double() for l in leaves]).sum(0)
    scale = torch.stack([l.double().abs() for l in leaves]).sum(0)
    assert ((single.double() - exact).abs() <= 1e-6 * scale + 1e-30).all()
    for split in _splits(n):
        merged = GramTree()
        for lo, hi in split:
            for level, index, t in _tree_of(leaves, lo, hi).stack:
                merged.push(level, index, t)
        assert len(merged.stack) == bin(n).count("1"), split  # the same nodes as one tree: n's binary digits
        assert torch.equal(merged.total(), single), split


def test_the_order_of_the_sum_shows_in_the_bits():
    """The tests above can fail: with these data, summing per range first (each rank totalling its own batches) or
    from left to right gives other bits than the tree."""
    differs = 0
    for n in range(3, 18):
        leaves = _leaves(n, seed=n)
        single = _reference(leaves)
        sequential = leaves[0].clone()
        for l in leaves[1:]:
            sequential = sequential + l
        per_range = _tree_of(leaves, 0, n // 3).total() + _tree_of(leaves, n // 3, n).total()
        differs += not torch.equal(sequential, single)
        differs += not torch.equal(per_range, single)
    assert differs >= 10
    assert GramTree().total() is None


def test_hessian_accumulator_is_the_tree_of_gram_matrices():
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(2, 5, 8, generator=g) * 10.0 ** (i % 3 - 1) for i in range(6)]
    acc = HessianAccumulator(8)
    for x in xs:
        acc.add_batch(x)
    grams = [x.reshape(-1, 8).t() @ x.reshape(-1, 8) for x in xs]
    H = acc.finalize()
    assert H.dtype == torch.float32 and H.shape == (8, 8)
    assert torch.equal(H, _reference(grams).mul_(2.0 / 60))
    with pytest.raises(RuntimeError, match="finalize"):
        acc.finalize()
    with pytest.raises(RuntimeError, match="finalize"):
        acc.add_batch(xs[0])


@pytest.mark.parametrize("heldout", [False, True])
def test_gptaq_term_is_the_tree_of_its_batch_products(heldout):
    """GPTAQ's ``2/n Σ (x_fp - x)ᵀ x``: one leaf per batch in the fixed tree, the same from any split into ranges
    (here: the accumulators of two ranks' ranges, their pieces pushed in order as :meth:`Ranks.all_pieces` does)."""
    g = torch.Generator().manual_seed(1)
    xs = [torch.randn(2, 5, 8, generator=g) * 10.0 ** (i % 3 - 1) for i in range(7)]
    fps = [x + 0.1 * torch.randn(x.shape, generator=g) * 10.0 ** (i % 2) for i, x in enumerate(xs)]
    leaves = [(f.reshape(-1, 8) - x.reshape(-1, 8)).t() @ x.reshape(-1, 8) for x, f in zip(xs, fps)]
    expected = _reference(leaves).mul_(2.0 / 70)
    acc = HessianAccumulator(8, heldout=heldout)
    acc.track_dxxt()
    for x, f in zip(xs, fps):
        acc.add_batch(x, x_fp=f)
    H = acc.finalize()
    assert H.shape == (8, 8) and torch.equal(acc.take_dxxt(), expected) and acc.take_dxxt() is None
    parts = []
    for lo, hi in ((0, 3), (3, 7)):  # two ranks' ranges
        a = HessianAccumulator(8, first_batch=lo)
        a.track_dxxt()
        for x, f in zip(xs[lo:hi], fps[lo:hi]):
            a.add_batch(x, x_fp=f)
        parts.append(a.asym)
    merged = GramTree()
    for t in parts:
        for level, index, m in t.stack:
            merged.push(level, index, m)
    assert torch.equal(merged.total().mul_(2.0 / 70), expected)
    plain = sum(leaves[1:], leaves[0].clone()).mul_(2.0 / 70)  # batch order: other bits
    assert not torch.equal(plain, expected)


def test_gptaq_term_misuse_is_refused():
    acc = HessianAccumulator(8)
    with pytest.raises(ValueError, match="x_fp is needed after track_dxxt"):
        acc.add_batch(torch.ones(3, 8), x_fp=torch.ones(3, 8))
    acc.add_batch(torch.ones(3, 8))
    with pytest.raises(RuntimeError, match="before the first batch"):
        acc.track_dxxt()
    acc = HessianAccumulator(8)
    acc.track_dxxt()
    with pytest.raises(ValueError, match="x_fp is needed"):
        acc.add_batch(torch.ones(3, 8))
    with pytest.raises(ValueError, match=r"x_fp has shape \(2, 8\), x \(3, 8\)"):
        acc.add_batch(torch.ones(3, 8), x_fp=torch.ones(2, 8))
    assert acc.finalize(allow_empty=True) is None and acc.take_dxxt() is None


def test_empty_hessian_accumulator():
    with pytest.raises(NumericalError, match="no calibration tokens"):
        HessianAccumulator(8).finalize()
    assert HessianAccumulator(8).finalize(allow_empty=True) is None


# --- 2. batches and layers over ranks ----------------------------------------------------------------------------
@pytest.mark.parametrize("world", range(1, 6))
def test_batches_are_a_contiguous_cover(world):
    for n in range(world, 4 * world + 5):
        ranges = [Ranks(rank=r, world=world).batches(n) for r in range(world)]
        assert [b for r in ranges for b in r] == list(range(n))
        sizes = [len(r) for r in ranges]
        assert min(sizes) >= 1 and max(sizes) - min(sizes) <= 1, (n, sizes)
    for n in range(world):
        with pytest.raises(ConfigError, match=rf"{n} calibration batches for {world} ranks"):
            Ranks(rank=0, world=world).batches(n)


@pytest.mark.parametrize("world", range(1, 6))
def test_owners_are_deterministic_and_balanced(world):
    rng = random.Random(world)
    for _ in range(30):
        costs = [rng.choice([1.0, 2.5, 4.0, 9.0, 16.0]) * rng.randint(1, 8) for _ in range(rng.randint(1, 9))]
        owners = [Ranks(rank=r, world=world).owners(costs) for r in range(world)]
        assert all(o == owners[0] for o in owners)  # every rank computes the same assignment
        assert owners[0] == Ranks(rank=0, world=world).owners(list(costs))
        assert all(0 <= o < world for o in owners[0]) and len(owners[0]) == len(costs)
        load = [sum(c for c, o in zip(costs, owners[0]) if o == r) for r in range(world)]
        if len(costs) >= world:  # largest first to the least loaded: the spread is at most one layer's cost
            assert max(load) - min(load) <= max(costs), (costs, owners[0])
        else:
            assert sorted(owners[0]) == sorted(set(owners[0]))  # each layer on a rank of its own
    counts = [Ranks(world=world).owners([1.0] * 7).count(r) for r in range(world)]
    assert max(counts) - min(counts) <= 1


# --- 3. 1 vs 2 vs 3 gloo ranks: the same bytes ------------------------------------------------------------------
_JOB = '''"""Run several gptq-plugin commands (JSON list of argument lists) in one torchrun process group."""
import json, os, sys
import torch.distributed as dist
import gptq_plugin.cli as cli
cli.close_ranks = lambda ranks: None  # one process group for every command of this job
for i, argv in enumerate(json.loads(sys.argv[1])):
    try:
        cli.main(argv)
        code = 0
    except SystemExit as e:
        code = e.code
    print(f"@@ rank={os.environ['RANK']} run={i} exit={code}", file=sys.stderr, flush=True)
if dist.is_initialized():
    dist.destroy_process_group()
'''


@pytest.fixture(scope="module")
def single(files) -> dict[str, object]:
    """A plain process's (no torchrun) checkpoint per mode (``mode``: file -> bytes) and report rows
    (``mode.report``)."""
    out = {}
    for mode in MODES:
        folder = files["dir"] / f"single-{mode}"
        rc, err = _cli_quiet(*_quantize_args(files, folder, mode))
        assert rc == 0, err
        out[mode] = digests(folder)
        out[mode + ".report"] = _report_rows(folder)
    return out


def _quantize_args(files: dict[str, Path], out: Path, mode: str) -> list[str]:
    """``quantize`` of the tiny model in ``mode``, with the per-layer report next to ``out`` (``<out>.json``): its
    relative errors are computed from each layer's Hessian, so they show a Hessian that differs in its last bits,
    which the 4-bit codes and fp16 scales of so small a model do not."""
    return ["quantize", str(files["model"]), str(out), "--dataset", str(files["calib"]), *SMALL, *MODES[mode],
            "--report", f"{out}.json"]


def _report_rows(out: Path) -> list[dict]:
    """The rows of the report written by :func:`_quantize_args`, without their timings."""
    rows = json.loads(Path(f"{out}.json").read_text())["layers"]
    return [{k: v for k, v in r.items() if k != "seconds"} for r in rows]


def _cli_quiet(*args) -> tuple[int, str]:
    """``gptq-plugin ARGS`` in this process, for module fixtures (which cannot take ``capsys``): (exit code,
    stderr)."""
    from gptq_plugin.cli import main

    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            main([str(a) for a in args])
        except SystemExit as e:
            return e.code, err.getvalue()
    return 0, err.getvalue()


@pytest.fixture(scope="module")
def jobs(files, tmp_path_factory) -> dict[int, tuple[subprocess.CompletedProcess, Path]]:
    """One torchrun launch per world size (2, 3) running the modes of :data:`_MODES_OF` (and, for 3 ranks, a run
    with 2 calibration batches) into ``<tmp>/ranks<world>N/<mode>``; returns (the finished torchrun, that folder)
    per world size."""
    script = files["dir"] / "job.py"
    script.write_text(_JOB)
    res = {}
    for world in (2, 3):
        folder = tmp_path_factory.mktemp(f"ranks{world}")
        runs = [_quantize_args(files, folder / mode, mode) for mode in _MODES_OF[world]]
        if world == 3:  # 4 windows in batches of 2: 2 batches for 3 ranks
            runs.append(["quantize", str(files["model"]), str(folder / "too-few"), "--dataset", str(files["calib"]),
                         "--nsamples", "4", "--seqlen", "32", "--batch-size", "2", "--group-size", "32"])
        p = subprocess.run([*_torchrun(world), str(script), json.dumps(runs)], cwd=folder, env=_env(),
                           capture_output=True, text=True, timeout=TIMEOUT_S)
        res[world] = (p, folder)
    return res


def _exits(err: str) -> dict[tuple[int, int], int]:
    """(rank, run) -> exit status, from the markers :data:`_JOB` prints (the ranks share stderr, so two markers
    can end up on one line)."""
    found = re.findall(r"@@ rank=(\d+) run=(\d+) exit=(-?\d+|None)", err)
    return {(int(r), int(i)): 0 if c == "None" else int(c) for r, i, c in found}


@pytest.mark.parametrize("world,mode", [(w, m) for w, modes in _MODES_OF.items() for m in modes])
def test_ranks_write_the_same_bytes_as_one_process(jobs, single, world, mode):
    p, folder = jobs[world]
    run = _MODES_OF[world].index(mode)
    exits = _exits(p.stderr)
    assert [exits.get((r, run)) for r in range(world)] == [0] * world, p.stderr[-4000:]
    assert f"{world} ranks" in p.stdout  # rank 0's summary: the run was shared
    assert p.stdout.count(f"-> {folder / mode}") == 1  # printed once, by rank 0
    got = digests(folder / mode)
    assert got.keys() == single[mode].keys()
    assert [k for k in got if got[k] != single[mode][k]] == []
    rows, expected = _report_rows(folder / mode), single[mode + ".report"]
    assert len(rows) == len(expected) == 21
    assert [a["name"] for a, b in zip(rows, expected) if a != b] == []  # rel_err to the last bit: same Hessians
    assert not any(x.name.startswith(".") for x in folder.iterdir())  # no resume or streaming state left


def test_more_ranks_than_batches_is_one_clear_error(jobs):
    p, folder = jobs[3]
    run = len(_MODES_OF[3])
    exits = _exits(p.stderr)
    assert [exits.get((r, run)) for r in range(3)] == [2, 2, 2], p.stderr[-4000:]
    lines = _error_lines(p.stderr)
    assert lines and not _our_traceback(p.stderr), p.stderr[-4000:]
    msgs = {l.split(": ", 1)[1] for l in lines}
    assert len(msgs) == 1, lines  # every rank says the same thing, nothing else
    msg = msgs.pop()
    assert "2 calibration batches for 3 ranks" in msg and "--nsamples" in msg, msg
    assert any(l.startswith("error: ") for l in lines), lines  # rank 0's line carries no rank prefix
    assert not (folder / "too-few").exists() and not (folder / ".too-few.partial").exists()


# --- 4. a killed rank --------------------------------------------------------------------------------------------
def _children(pid: int) -> list[int]:
    kids = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            kids += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            pass
    return kids


def _rank_of(pid: int) -> str | None:
    try:
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    return next((e[5:].decode() for e in env if e.startswith(b"RANK=")), None)


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="finds the rank's process in /proc (Linux)")
def test_killed_rank_stops_the_run_and_the_same_command_resumes(files, tmp_path, capsys):
    """SIGKILL rank 1 once a block is recorded: rank 0 stops with one error naming a rank and saying to rerun,
    torchrun exits non-zero, OUT is not written; rerunning the same command resumes (not restarts) and writes the
    bytes of a plain one-process run."""
    model = _save_tiny(tmp_path / "model8", layers=8)  # 8 blocks of ~0.2 s: the kill lands mid-run
    args = ["--dataset", files["calib"], "--nsamples", "32", "--seqlen", "64", "--batch-size", "2", "--group-size",
            "32", "--threads", "1"]
    rc, _, err = cli(capsys, "quantize", model, tmp_path / "single", *args)
    assert rc == 0, err
    out = tmp_path / "out"
    cmd = [*_torchrun(2), "-m", "gptq_plugin.cli", "quantize", str(model), str(out), *map(str, args)]
    manifest = tmp_path / ".out.partial" / "manifest.json"
    p = subprocess.Popen(cmd, cwd=tmp_path, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        done, t0 = 0, time.time()
        while p.poll() is None and time.time() - t0 < TIMEOUT_S:
            try:
                done = json.loads(manifest.read_text())["done"]
            except (OSError, ValueError, KeyError):
                pass
            if done >= 1:
                break
            time.sleep(0.005)
        victims = [c for c in _children(p.pid) if _rank_of(c) == "1"]
        assert p.poll() is None and done >= 1 and len(victims) == 1, (
            f"the run ended or never recorded a block before the kill (done={done}, rc={p.poll()}): make the model "
            f"bigger or give it more batches")
        assert done < 8, "every block was done before the kill: make the model bigger or give it more batches"
        os.kill(victims[0], signal.SIGKILL)
        stdout, stderr = p.communicate(timeout=TIMEOUT_S)
    finally:
        if p.poll() is None:
            p.kill()
            p.communicate()
    assert p.returncode != 0, stderr[-3000:]
    assert not out.exists()
    lines = _error_lines(stderr)
    assert len(lines) == 1 and not _our_traceback(stderr), stderr[-3000:]
    assert re.search(r"rank \d+ of 2", lines[0]) and "rerun the same command" in lines[0], lines[0]
    assert lines[0].startswith("error: "), lines[0]  # rank 0's line: no "(rank 0)" prefix
    assert "quantized" not in stdout

    p = subprocess.run(cmd, cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=TIMEOUT_S)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "resuming" in p.stderr and "2 ranks" in p.stdout
    assert digests(out) == digests(tmp_path / "single")
    assert not (tmp_path / ".out.partial").exists()


# --- 5. clear errors -----------------------------------------------------------------------------------------------
_GROUP = '''"""One rank of a 2-process gloo group joined by gptq_plugin.distributed.init_ranks; prints a JSON result."""
import json, os, time
import torch
from gptq_plugin.distributed import DistributedError, GramTree, init_ranks
from gptq_plugin.errors import ConfigError

ranks = init_ranks(torch.device("cpu"))
r, res = ranks.rank, {"world": ranks.world, "timeout_s": ranks.timeout_s}
ranks.agree({"config": {"bits": 4}, "weights": "abc"}, "configuration")  # the same everywhere: no error
try:
    ranks.agree({"config": {"bits": 4}, "weights": "abc", "batch_size": 8 + r}, "configuration")
except ConfigError as e:
    res["agree"] = str(e)
g = torch.Generator().manual_seed(0)
leaves = [torch.randn(16, 16, generator=g) * 10.0 ** (i % 5 - 2) for i in range(7)]
tree, mine = GramTree(), ranks.batches(7)
for b in mine:
    tree.push(0, b, leaves[b].clone())
merged, tokens = ranks.all_pieces(tree, 10 * len(mine), (16, 16))
one = GramTree()
for b in range(7):
    one.push(0, b, leaves[b].clone())
one = one.total()
res["pieces"], res["tokens"] = torch.equal(merged.total(), one), tokens
pieces = [sum(leaves[lo:hi], torch.zeros(16, 16)) for lo, hi in ((0, 3), (3, 7))]  # each rank's own total first
res["order_shows"] = not torch.equal(pieces[0] + pieces[1], one)
codes = torch.arange(6, dtype=torch.uint8).reshape(2, 3) + 7
t, meta = ranks.share({"codes": codes, "scales": torch.ones(3, dtype=torch.float16)} if r == 1 else None,
                      ("solved by", r), src=1)
res["share"] = [torch.equal(t["codes"], codes), t["scales"].dtype == torch.float16, list(meta)]

def refuse():
    raise ConfigError("OUT is not writable")
try:
    ranks.on_writer("opening the resume state", refuse)
except ConfigError as e:
    res["on_writer"] = str(e)
if r == 1:
    print("@@" + json.dumps(res), flush=True)
    time.sleep(ranks.timeout_s + 30)  # does not answer the next collective (the test kills it)
else:
    t0 = time.time()
    try:
        ranks.barrier("waiting for rank 1")
    except DistributedError as e:
        res["timeout"], res["waited"] = str(e), time.time() - t0
print("@@" + json.dumps(res), flush=True)
os._exit(0)
'''


def test_ranks_agree_share_and_time_out(tmp_path):
    """Two gloo ranks (plain processes with torchrun's variables): different configurations are one ConfigError
    naming the rank and the key; Hessian pieces of uneven ranges complete the single tree bit for bit; a shared
    layer arrives with its dtypes; an error on rank 0 is raised on every rank; a collective that rank 1 does not
    answer fails within GPTQ_PLUGIN_DIST_TIMEOUT with a DistributedError saying to rerun."""
    script = tmp_path / "group.py"
    script.write_text(_GROUP)
    port = str(_free_port())
    procs = [subprocess.Popen([sys.executable, str(script)], cwd=tmp_path, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True,
                              env=_env(RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                                       MASTER_PORT=port, GPTQ_PLUGIN_DIST_TIMEOUT="4"))
             for r in range(2)]
    res = []
    for p in procs:  # rank 0 ends after its timeout; rank 1, still asleep, is killed then
        try:
            out, err = p.communicate(timeout=60 if p is procs[0] else 0.5)
        except subprocess.TimeoutExpired:
            p.kill()
            out, err = p.communicate()
        finally:
            if p.poll() is None:
                p.kill()
        lines = [l[2:] for l in out.splitlines() if l.startswith("@@")]
        assert lines, err[-3000:]
        res.append(json.loads(lines[0]))
    for r, got in enumerate(res):
        assert got["world"] == 2 and got["timeout_s"] == 4
        assert "rank 1" in got["agree"] and "batch_size" in got["agree"] and "weights" not in got["agree"]
        assert got["pieces"] is True and got["tokens"] == 70 and got["order_shows"] is True
        assert got["share"] == [True, True, ["solved by", 1]]
        assert got["on_writer"] == "OUT is not writable"
    assert "timeout" not in res[1]
    assert "rank 0 of 2" in res[0]["timeout"] and "rerun the same command" in res[0]["timeout"]
    assert 3.0 <= res[0]["waited"] <= 30


def test_device_errors_are_one_line(files, tmp_path, capsys):
    base = ["quantize", files["model"], tmp_path / "q", "--method", "rtn", "--group-size", "32"]
    if not torch.cuda.is_available():
        rc, _, err = cli(capsys, *base, "--device", "cuda")
        one_error(rc, err, "--device cuda", "CUDA", "--device cpu")
        rc, _, err = cli(capsys, *base, "--device", "cuda:1")
        one_error(rc, err, "--device cuda:1")
    for bad in ("tpu", "meta", "cuda:x"):
        rc, _, err = cli(capsys, *base, "--device", bad)
        one_error(rc, err, f"--device {bad}", "auto, cpu, cuda or cuda:N")
    assert not (tmp_path / "q").exists() and list(tmp_path.iterdir()) == []


def test_resolve_device_with_a_pretended_gpu(monkeypatch):
    """The CUDA choices, with torch pretending to see two GPUs (nothing is allocated)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    assert resolve_device("auto") == torch.device("cuda", 0) == resolve_device("cuda")
    assert resolve_device("cuda:1") == torch.device("cuda", 1) and resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ConfigError, match="only 2 CUDA"):
        resolve_device("cuda:2")
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "1")  # under torchrun, plain cuda is this rank's GPU
    assert resolve_device("cuda") == torch.device("cuda", 1) == resolve_device("auto")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu") == resolve_device(None)


# --- 6. --device cpu is the default ------------------------------------------------------------------------------
def test_device_cpu_equals_the_default(files, single, tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("the default (auto) is CUDA on this machine")
    rc, _, err = cli(capsys, *_quantize_args(files, tmp_path / "cpu", "one-pass"), "--device", "cpu")
    assert rc == 0, err
    assert digests(tmp_path / "cpu") == single["one-pass"]
    assert _report_rows(tmp_path / "cpu") == single["one-pass.report"]


# --- 7. device placement -----------------------------------------------------------------------------------------
def _block_and_batches():
    g = torch.Generator().manual_seed(0)
    block = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
    inputs = [torch.randn(1, 2, 4, generator=g) for _ in range(3)]
    kwargs = [{"attention_mask": torch.ones(1, 2), "position_embeddings": (torch.zeros(2), [torch.ones(2)]),
               "use_cache": False, "extra": {"t": torch.ones(1)}} for _ in range(3)]
    return block, inputs, kwargs


def _recording_to(block: nn.Module) -> list[torch.device]:
    """Make ``block.to`` record its devices; from ``meta`` back to the CPU it allocates empty tensors (the values
    are lost: the tests check placement only)."""
    moves = []

    def to(self, device):
        device = torch.device(device)
        moves.append(device)
        return self.to_empty(device=device) if next(self.parameters()).is_meta else nn.Module.to(self, device)

    block.to = types.MethodType(to, block)
    return moves


def test_on_device_moves_the_block_and_its_batches():
    block, inputs, kwargs = _block_and_batches()
    moves = _recording_to(block)
    meta = torch.device("meta")
    fp = [x.clone() for x in inputs]  # GPTAQ's second stream travels the same way
    with driver._on_device(block, inputs, kwargs, meta, fp) as (placed, placed_kwargs, placed_fp):
        assert moves == [meta] and all(p.is_meta for p in block.parameters())
        assert placed_fp[1].is_meta and placed_fp[1].shape == fp[1].shape
        placed_fp[1] = torch.zeros(1, 2, 4)
        assert fp[1].device.type == "cpu" and not fp[1].any()
        assert len(placed) == 3
        assert [x.device for x in placed] == [meta] * 3 and placed[2].shape == inputs[2].shape
        kw = placed_kwargs[1]
        assert kw["attention_mask"].is_meta and kw["extra"]["t"].is_meta and kw["use_cache"] is False
        pos = kw["position_embeddings"]
        assert type(pos) is tuple and type(pos[1]) is list and pos[0].is_meta and pos[1][0].is_meta
        assert kwargs[1]["attention_mask"].device.type == "cpu"  # the stored kwargs stay where they were
        y = torch.full((1, 2, 4), 5.0)
        placed[0] = y
        assert inputs[0].device.type == "cpu" and torch.equal(inputs[0], y)  # outputs are stored at home
        assert all(x.device.type == "cpu" for x in inputs)
    assert moves == [meta, torch.device("cpu")]
    assert all(p.device.type == "cpu" for p in block.parameters())


def test_on_device_stores_outputs_on_the_home_device():
    """The write direction, with the roles swapped (home on ``meta``, computing on the CPU): an output computed on
    the device is stored on the home device."""
    store = [torch.empty(1, 2, 4, device="meta") for _ in range(2)]
    placed = driver._Placed(store, torch.device("cpu"), torch.device("meta"))
    placed[1] = torch.ones(1, 2, 4)
    assert store[1].is_meta and store[1].shape == (1, 2, 4)


def test_on_device_moves_the_block_home_after_an_error():
    block, inputs, kwargs = _block_and_batches()
    moves = _recording_to(block)
    with pytest.raises(NumericalError):
        with driver._on_device(block, inputs, kwargs, torch.device("meta")):
            raise NumericalError("a block's outputs contain NaN")
    assert moves == [torch.device("meta"), torch.device("cpu")]
    assert all(p.device.type == "cpu" for p in block.parameters())


def test_on_device_moves_nothing_when_the_block_is_there():
    block, inputs, kwargs = _block_and_batches()
    moves = _recording_to(block)
    with driver._on_device(block, inputs, kwargs, torch.device("cpu")) as (placed, placed_kwargs, _):
        assert placed is inputs and placed_kwargs is kwargs
    assert moves == []
    with driver._on_device(block, None, None, torch.device("meta")) as (placed, placed_kwargs, _):  # RTN: no batches
        assert placed is None and placed_kwargs is None
    assert moves == [torch.device("meta"), torch.device("cpu")]


def _quantized_tiny(device, monkeypatch) -> tuple[nn.Module, dict, int]:
    """A 3-block tiny Llama quantized with ``quantize_model(device=...)``; the number of blocks that went through
    the moving path of ``_on_device`` (``_Placed`` objects made) is counted."""
    made = []

    class Counting(driver._Placed):
        def __init__(self, *a, **kw):
            made.append(1)
            super().__init__(*a, **kw)

    monkeypatch.setattr(driver, "_Placed", Counting)
    model = tiny_llama(seed=5, layers=3)
    before = {n: (p, p.data_ptr()) for n, p in model.named_parameters() if ".layers." not in n}
    calib = torch.randint(3, 128, (13, 32), generator=torch.Generator().manual_seed(2))
    cfg = QuantizeConfig(bits=4, group_size=32, desc_act=True, static_groups=True)
    quantize_model(model, calib, cfg, batch_size=2, progress=False, device=device)
    for n, (p, ptr) in before.items():  # embeddings, final norm, lm_head: the same tensors, never moved
        q = dict(model.named_parameters())[n]
        assert q is p and q.data_ptr() == ptr, n
    return model, {k: v.clone() for k, v in model.state_dict().items()}, len(made)


def test_quantize_model_on_cpu_moves_nothing_and_the_moving_path_gives_the_same_bytes(monkeypatch):
    """``device="cpu"``: no block is moved (no ``_Placed``). ``device="cpu:0"`` is another ``torch.device`` than
    the blocks' ``cpu``, so every block takes the moving path (``block.to``, ``_Placed`` batches, kwargs copied with
    ``_to``) onto the same memory: the quantized tensors must be the same bit for bit. (Real host <-> GPU copies
    need CUDA.)"""
    model_a, a, moved_a = _quantized_tiny("cpu", monkeypatch)
    _, b, moved_b = _quantized_tiny("cpu:0", monkeypatch)
    assert moved_a == 0 and moved_b == 3
    assert a.keys() == b.keys() and sum(k.endswith("qweight") for k in a) == 3 * 7
    assert [k for k in a if not torch.equal(a[k], b[k])] == []
    assert all(t.device.type == "cpu" for t in b.values())


@pytest.mark.parametrize("mode", ["one-pass", "streaming"])
def test_cli_moving_path_gives_the_same_bytes(files, single, tmp_path, capsys, monkeypatch, mode):
    """The CLI with ``--device cpu:0`` (every block through ``_on_device``'s moving path, with the resume state's
    activation buffer as the batches) writes the bytes of the default run."""
    made = []
    real = driver._Placed
    monkeypatch.setattr(driver, "_Placed", lambda *a: made.append(1) or real(*a))
    rc, _, err = cli(capsys, *_quantize_args(files, tmp_path / "q", mode), "--device", "cpu:0")
    assert rc == 0, err
    assert len(made) == 3 * (2 if mode == "streaming" else 1)  # streaming runs the default's GPTAQ: two streams
    assert digests(tmp_path / "q") == single[mode]
    assert _report_rows(tmp_path / "q") == single[mode + ".report"]
