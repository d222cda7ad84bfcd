"""lm-eval task accuracy through the plugin: the offline cloze task's documents, its scores against an independent
computation on a quantized checkpoint, and the CLI's errors."""

from __future__ import annotations

import importlib.util
import json
import math
import sys

import pytest
import torch

from gptq_plugin.errors import ConfigError, GPTQPluginError
from gptq_plugin.tasks import CLOZE_TASK, check_tasks, cloze_documents
from tests.test_cli import assert_one_line_error, run_cli

PARA = " ".join(["word"] * 45)


def test_cloze_documents_follow_the_rules(tmp_path):
    f = tmp_path / "t.raw"
    f.write_text("\n".join([
        " = Heading = ",
        f" {PARA} the end of the Story . ",  # kept: target ' Story'
        f" {PARA} in 1997 . ",  # number before the period: skipped
        " Too short to be a document but it ends well in a Word . ",  # fewer than 40 words: skipped
        f" {PARA} no final period here",  # no final ' .': skipped
        f" {PARA} a one letter end a . ",  # a single letter: skipped
        "",
        f" {PARA} and then @-@ some Words . ",  # kept
    ]) + "\n", encoding="utf-8")
    docs = cloze_documents(f)
    assert [d["target"] for d in docs] == [" Story", " Words"]
    assert docs[0]["context"] + docs[0]["target"] + " ." == f"{PARA} the end of the Story ."
    assert not docs[0]["context"].endswith(" ")


def test_a_text_without_documents_is_one_clear_error(tmp_path):
    f = tmp_path / "t.raw"
    f.write_text(" = Only = \n a short line .\n", encoding="utf-8")
    with pytest.raises(GPTQPluginError, match="holds no paragraph for the cloze task"):
        cloze_documents(f)


def test_the_shipped_text_gives_1372_documents_that_rebuild_their_paragraphs():
    from gptq_plugin.calibration_data import default_eval_file, read_text

    docs = cloze_documents()
    assert len(docs) == 1372
    paragraphs = {l.strip() for l in read_text(default_eval_file()).split("\n")}
    assert all(d["context"] + d["target"] + " ." in paragraphs for d in docs)
    assert docs[0]["target"] == " Hall"


needs_lm_eval = pytest.mark.skipif(importlib.util.find_spec("lm_eval") is None,
                                   reason="lm-eval is not installed: pip install 'gptq-plugin[eval]'")


def _independent_scores(model, tok, docs):
    """Greedy accuracy and target perplexity, computed here as lm-eval's lambada does: the continuation's tokens are
    those of tokenize(context + target) after tokenize(context)."""
    lls, hits = [], []
    for d in docs:
        ctx = tok(d["context"], add_special_tokens=False)["input_ids"]
        whole = tok(d["context"] + d["target"], add_special_tokens=False)["input_ids"]
        cont = whole[len(ctx):]
        ids = torch.tensor([ctx + cont])
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=ids).logits[0, len(ctx) - 1:-1].double(), -1)
        tgt = torch.tensor(cont)
        lls.append(float(logp.gather(-1, tgt[:, None]).sum()))
        hits.append(bool((logp.argmax(-1) == tgt).all()))
    return sum(hits) / len(hits), math.exp(-sum(lls) / len(lls))


@needs_lm_eval
def test_cloze_scores_of_a_quantized_checkpoint_equal_an_independent_computation(demo_ckpt_factory, monkeypatch):
    from gptq_plugin import tasks
    from gptq_plugin.linear import QuantLinear
    from gptq_plugin.models import load_model, load_tokenizer
    from gptq_plugin.tasks import run_tasks

    made = []  # the run prepares its data in its own temporary folder, removed afterwards
    real = tasks.cloze_task_config
    monkeypatch.setattr(tasks, "cloze_task_config", lambda *a, **k: made.append(k.get("cache_dir")) or real(*a, **k))

    ckpt = demo_ckpt_factory(n_blocks=2)
    model, tok = load_model(ckpt), load_tokenizer(ckpt)
    assert any(isinstance(m, QuantLinear) for m in model.modules())  # scored through the plugin's layers
    res = run_tasks(model, tok, [CLOZE_TASK], limit=6)[CLOZE_TASK]
    acc, ppl = _independent_scores(model, tok, cloze_documents()[:6])
    assert res["n"] == 6
    assert res["acc"] == pytest.approx(acc)
    assert res["perplexity"] == pytest.approx(ppl, rel=1e-4)
    assert len(made) == 1 and made[0] is not None and not made[0].parent.exists()


@needs_lm_eval
def test_eval_cli_reports_the_task_beside_perplexity(demo_ckpt_factory):
    ckpt = demo_ckpt_factory(n_blocks=2)
    rc, out, err = run_cli("eval", ckpt, "--windows", "1", "--tasks", CLOZE_TASK, "--task-limit", "3", "--json")
    assert rc == 0, err
    r = json.loads(out.strip().splitlines()[-1])
    t = r["tasks"][CLOZE_TASK]
    assert t["n"] == 3 and 0 <= t["acc"] <= 1 and t["perplexity"] > 1 and r["perplexity"] > 1


@needs_lm_eval
@pytest.mark.parametrize("tasks, needle", [("no_such_task_xyz", "--tasks no_such_task_xyz: lm-eval knows no such"),
                                           (",", "--tasks is empty")])
def test_bad_task_names_are_one_clear_error_before_loading(tmp_path, tasks, needle):
    # the model folder does not even exist: the task names are checked first
    rc, _, err = run_cli("eval", tmp_path / "nope", "--tasks", tasks)
    assert_one_line_error(rc, err, needle)


@pytest.mark.parametrize("args, needle", [(["--task-limit", "5"], "--task-limit needs --tasks"),
                                          (["--tasks", CLOZE_TASK, "--task-limit", "0"], "--task-limit 0")])
def test_a_task_limit_alone_or_below_1_is_refused(tmp_path, args, needle):
    rc, _, err = run_cli("eval", tmp_path / "nope", *args)
    assert_one_line_error(rc, err, needle)


def test_the_cloze_data_is_prepared_in_the_run_s_own_folder(tmp_path):
    from gptq_plugin.tasks import cloze_task_config

    cfg = cloze_task_config(tmp_path / "c.jsonl", cache_dir=tmp_path / "ds")
    assert cfg["dataset_kwargs"] == {"data_files": {"test": str(tmp_path / "c.jsonl")}, "cache_dir": str(tmp_path / "ds")}
    assert cfg["target_delimiter"] == "" and cfg["output_type"] == "loglikelihood"


def test_without_lm_eval_the_error_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval.tasks", None)
    with pytest.raises(ConfigError, match=r"pip install 'gptq-plugin\[eval\]'"):
        check_tasks([CLOZE_TASK])
