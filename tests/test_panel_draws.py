"""benchmarks/panel.py --draws: the calibration sample of each draw and the table of means (no models are run)."""

import importlib.util
import math
import os
import re
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "panel.py"


@pytest.fixture(scope="module")
def panel():
    spec = importlib.util.spec_from_file_location("panel_bench", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def articles(text: str) -> tuple[str, list[str]]:
    """Independent split, line by line: a line ``= Title =`` with one '=' on each side starts an article."""
    head, arts = [], []
    for line in text.splitlines(keepends=True):
        if re.fullmatch(r" = [^=].* = \n", line):
            arts.append([line])
        elif arts:
            arts[-1].append(line)
        else:
            head.append(line)
    return "".join(head), ["".join(a) for a in arts]


def test_a_draw_reorders_the_articles_and_keeps_every_one(panel, tmp_path):
    head0, arts0 = articles(panel.calibration_file(tmp_path).read_text(encoding="utf-8"))
    assert len(arts0) == 60  # WikiText-2 valid's articles
    draws = {}
    for d in (1, 2):
        head, arts = articles(panel.draw_calibration_file(tmp_path, d).read_text(encoding="utf-8"))
        assert head == head0
        assert sorted(arts) == sorted(arts0)
        assert arts != arts0
        draws[d] = arts
    assert draws[1] != draws[2]
    # the first calibration windows come from other articles than draw 0's first one
    assert draws[1][0] != arts0[0] or draws[2][0] != arts0[0]


def test_a_draw_file_is_the_same_on_a_rerun(panel, tmp_path):
    files = []
    for sub in ("a", "b"):
        (tmp_path / sub).mkdir()
        files.append(panel.draw_calibration_file(tmp_path / sub, 1))
    assert files[0].read_bytes() == files[1].read_bytes()
    assert not list((tmp_path / "a").glob("*.tmp"))


def row(recipe, ppl, draw, kld=None):
    r = {"model": "m", "bits": 4, "recipe": recipe, "perplexity": ppl, "kld_mean": kld}
    if draw:
        r["draw"] = draw  # draw 0's rows carry no key, as rows written before --draws
    return r


def cells(table: str, recipe: str) -> list[str]:
    line = next(ln for ln in table.splitlines() if ln.startswith(f"| m | 4 | {recipe} |"))
    return [c.strip() for c in line.strip("|").split("|")]


def test_the_draws_table_gives_means_spreads_and_paired_ratios(panel):
    base = [10.0, 12.0, 11.0]
    ours = [9.0, 12.6]  # draws 0 and 1 only: the ratio pairs those two
    rows = [row("gptqmodel", p, d, 0.2) for d, p in enumerate(base)]
    rows += [row("default", p, d, k) for d, (p, k) in enumerate(zip(ours, (0.1, 0.3)))]
    rows += [row("rtn", 20.0, 0), row("original", 5.0, 0)]
    t = panel.draws_table(rows)
    c = cells(t, "default")
    assert c[3] == "2" and c[4] == "9.00 / 12.60"
    assert float(c[5]) == pytest.approx((9.0 + 12.6) / 2, abs=0.005)
    assert float(c[6]) == pytest.approx(math.sqrt(((9.0 - 10.8) ** 2 + (12.6 - 10.8) ** 2) / 1), abs=0.005)
    assert float(c[7]) == pytest.approx(0.2, abs=5e-5)
    assert c[8] == f"{(9.0 / 10.0 + 12.6 / 12.0) / 2:.3f} (2 paired)"
    g = cells(t, "gptqmodel")
    assert g[3] == "3" and float(g[5]) == pytest.approx(11.0, abs=0.005) and g[8] == "-"
    assert "| rtn |" not in t and "original" not in t  # one draw: no mean to give


def test_no_draws_table_without_a_second_draw(panel):
    assert panel.draws_table([row("default", 9.0, 0), row("gptqmodel", 10.0, 0)]) == ""


def test_a_row_names_the_machine_that_computed_it(panel):
    import torch

    m = panel.machine()
    assert f"torch {torch.__version__} " in m and f"{os.cpu_count()} cores" in m


def test_the_worst_case_table_ranks_recipes_by_their_worst_model(panel):
    def r(model, recipe, ppl, draw):
        return {"model": model, "bits": 4, "recipe": recipe, "perplexity": ppl, **({"draw": draw} if draw else {})}

    base = {"a": [10.0, 20.0], "b": [30.0, 40.0]}
    rows = [r(m, "gptqmodel", p, d) for m, ps in base.items() for d, p in enumerate(ps)]
    # x: 0.9 on a, 1.05 on b (worst 1.05); y: 1.0 on a, 0.95 on b (worst 1.0, so it ranks first)
    rows += [r("a", "x", 9.0, 0), r("a", "x", 18.0, 1), r("b", "x", 30.0, 0), r("b", "x", 44.0, 1)]
    rows += [r("a", "y", 10.0, 0), r("a", "y", 20.0, 1), r("b", "y", 28.5, 0), r("b", "y", 38.0, 1)]
    rows += [r("a", "z", 5.0, 0), r("a", "z", 10.0, 1)]  # never ran on b: after the complete ones
    rows += [r("a", "original", 1.0, 0), r("b", "x", 1.0, 2)]  # draw 2 has no baseline: not paired
    t = panel.worst_case_table(rows)
    body = [ln for ln in t.splitlines() if ln.startswith("| ") and not ln.startswith("| recipe")]
    assert [ln.split("|")[1].strip() for ln in body] == ["y", "x", "z"]
    assert [c.strip() for c in body[0].strip("|").split("|")] == ["y", "1.000 (2)", "0.950 (2)", "1.000"]
    x = [c.strip() for c in body[1].strip("|").split("|")]
    assert x[1:3] == ["0.900 (2)", f"{(1.0 + 1.1) / 2:.3f} (2)"] and x[3] == f"{(1.0 + 1.1) / 2:.3f}"
    assert [c.strip() for c in body[2].strip("|").split("|")] == ["z", "0.500 (2)", "-", "0.500 (of 1/2)"]
    assert "original" not in t and "gptqmodel |" not in t


def test_no_worst_case_table_from_single_draws(panel):
    rows = [{"model": "a", "bits": 4, "recipe": rec, "perplexity": p} for rec, p in (("gptqmodel", 10.0), ("x", 9.0))]
    assert panel.worst_case_table(rows) == ""


def test_a_recipe_is_paired_with_gptqmodel_on_as_many_calibration_windows(panel):
    def r(recipe, ppl, draw, flags=None, **extra):
        return {"model": "m", "bits": 4, "recipe": recipe, "perplexity": ppl, "flags": flags,
                **({"draw": draw} if draw else {}), **extra}

    rows = [r("gptqmodel", 10.0, 0, "GPTQModel default"), r("gptqmodel", 20.0, 1, "GPTQModel default")]
    # GPTQModel on 256 windows: older rows name it in their flags only, newer ones also carry "nsamples"
    rows += [r("gptqmodel-n256", 8.0, 0, "GPTQModel default --nsamples 256"),
             r("gptqmodel-n256", 16.0, 1, "GPTQModel default --nsamples 256", nsamples=256)]
    rows += [r("default", 9.0, 0, "-"), r("default", 19.0, 1, "-", nsamples=128)]
    rows += [r("default-n256", 7.6, 0, "--nsamples 256"), r("default-n256", 16.8, 1, "--mse 2.4 --nsamples 256")]
    rows += [r("gar-n512", 5.0, 0, "--nsamples 512"), r("gar-n512", 5.0, 1, "--nsamples 512")]  # no such baseline
    ratios = panel.paired_ratios(rows)
    assert ratios[("m", 4, "default")] == pytest.approx([0.9, 0.95])
    assert ratios[("m", 4, "default-n256")] == pytest.approx([7.6 / 8.0, 16.8 / 16.0])  # not / 10.0 and / 20.0
    assert ("m", 4, "gar-n512") not in ratios and ("m", 4, "gptqmodel-n256") not in ratios
    t = panel.draws_table(rows)
    assert cells(t, "default-n256")[8] == f"{(7.6 / 8.0 + 16.8 / 16.0) / 2:.3f} (2 paired)"
    assert cells(t, "gar-n512")[8] == "-" and cells(t, "gptqmodel-n256")[8] == "-"
    w = panel.worst_case_table(rows)
    assert "| gptqmodel-n256 |" not in w and "| gar-n512 |" not in w
    assert "| default-n256 | " + f"{(7.6 / 8.0 + 16.8 / 16.0) / 2:.3f} (2) |" in w


def test_a_row_records_the_calibration_windows_its_tool_was_given(panel):
    assert panel.calibration_windows({"flags": "--act-group-aware --nsamples 64 --nsamples 256"}) == 256
    assert panel.calibration_windows({"flags": "GPTQModel default"}) == 128
    assert panel.calibration_windows({"flags": "-", "nsamples": 32}) == 32


def test_a_new_row_carries_the_windows_of_its_own_flags_over_the_run_s(panel, tmp_path, monkeypatch):
    import argparse

    monkeypatch.setattr(panel, "quantize", lambda *a, **k: {"tool": "t", "quantize_s": 1.0, "peak_rss_mb": 1})
    monkeypatch.setattr(panel, "evaluate", lambda *a, **k: {"perplexity": 9.0})
    monkeypatch.setattr(panel, "checkpoint_sha256", lambda ckpt: "0")
    a = argparse.Namespace(out=tmp_path, group_size=128, threads=1, nsamples=64, keep=False)
    (tmp_path / "rows").mkdir()
    got = {rec: panel.run_row("m", tmp_path, 4, rec, a, {})["nsamples"]
           for rec in ("default", "gptqmodel", "gptqmodel-n256", "gar-mse-refit-n256")}
    assert got == {"default": 64, "gptqmodel": 64, "gptqmodel-n256": 256, "gar-mse-refit-n256": 256}


def test_named_recipes_run_their_flags_only(panel):
    """GPTAQ is in the CLI's default recipe: a named recipe that does not set ``--gptaq`` gets ``--gptaq 0`` (so
    ``gar-mse-refit`` is the default of 6 Dec 2026, as its rows say), ``default`` gets no flag at all."""
    from gptq_plugin.config import RECOMMENDED
    from gptq_plugin.quantize_job import resolve_gptaq

    assert RECOMMENDED.get("gptaq")  # else this test has nothing to check
    assert panel.recipe_flags("default") == []
    for name, flags in panel.RECIPES.items():
        if flags is None or name == "default":
            continue
        got = panel.recipe_flags(name)
        assert got[:len(flags)] == flags
        alpha = float(got[got.index("--gptaq") + 1])
        assert alpha == (0.25 if "gptaq" in name else 0.0), name
        assert resolve_gptaq("gptq", alpha, True, None, False)[0] == (alpha or None)
