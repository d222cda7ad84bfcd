"""KL divergence and top-1 agreement against the original model, and the chunked loss (tiny random Llama, fast)."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F

from gptq_plugin import evaluate
from gptq_plugin.config import QuantizeConfig
from gptq_plugin.evaluate import compare, perplexity
from gptq_plugin.pipeline import quantize_model
from tests.tiny import tiny_llama


@pytest.fixture(scope="module")
def ids() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 128, (5, 37), generator=g)


@pytest.fixture(scope="module")
def model():
    return tiny_llama(seed=1).eval()


@pytest.fixture(scope="module")
def rtn2(model):
    q = copy.deepcopy(model)
    quantize_model(q, None, QuantizeConfig(bits=2, group_size=32, method="rtn", mse=0.0), progress=False)
    return q.eval()


def test_a_model_against_itself_is_kld_0_and_agreement_1(model, ids):
    a = compare(model, model, ids, batch_size=2, progress=False)
    assert a.positions == 5 * 36
    assert a.kld_mean == a.kld_median == a.kld_p99 == a.kld_max == 0.0
    assert a.top1_agreement == 1.0
    assert a.perplexity == a.reference_perplexity


def test_rtn_2bit_has_kld_above_0_and_agreement_below_1(model, rtn2, ids):
    a = compare(rtn2, model, ids, progress=False)
    assert 0 < a.kld_median <= a.kld_p99 <= a.kld_max and a.kld_mean > 0
    assert 0 <= a.top1_agreement < 1
    assert a.perplexity != a.reference_perplexity


def test_chunked_figures_equal_the_whole_window_ones(model, rtn2, ids, monkeypatch):
    """Chunks of 5 positions (not a divisor of 36) give the unchunked KL divergence, agreement and perplexities."""
    with torch.no_grad():
        lq = F.log_softmax(rtn2(input_ids=ids).logits[:, :-1].float(), -1)
        lp = F.log_softmax(model(input_ids=ids).logits[:, :-1].float(), -1)
    kld = (lp.exp() * (lp - lq)).sum(-1).flatten().double()
    nll = -lq.gather(-1, ids[:, 1:, None]).mean().double()
    monkeypatch.setattr(evaluate, "position_chunk", lambda vocab, budget=0: 5)
    a = compare(rtn2, model, ids, batch_size=3, progress=False)
    assert a.kld_mean == pytest.approx(float(kld.mean()), rel=1e-5)
    assert a.kld_max == pytest.approx(float(kld.max()), rel=1e-5)
    assert a.kld_p99 == pytest.approx(float(kld.quantile(0.99)), rel=1e-5)
    assert a.top1_agreement == float((lq.argmax(-1) == lp.argmax(-1)).double().mean())
    assert a.perplexity == pytest.approx(math.exp(float(nll)), rel=1e-6)
    assert perplexity(rtn2, ids, batch_size=2, progress=False) == pytest.approx(math.exp(float(nll)), rel=1e-6)


def test_different_vocabularies_are_refused(model, ids):
    from gptq_plugin.errors import GPTQPluginError
    from transformers import AutoModelForCausalLM

    cfg = copy.deepcopy(model.config)
    cfg.vocab_size = 200
    other = AutoModelForCausalLM.from_config(cfg)
    with pytest.raises(GPTQPluginError, match=r"vocabulary \(200 logits\) differs from the reference's \(128\)"):
        compare(other, model, ids, progress=False)


def test_cli_eval_reference_reports_kld(tmp_path, capsys):
    from gptq_plugin.cli import main
    from tests.test_calibration import _tokenizer

    src = tmp_path / "orig"
    tiny_llama(seed=1).save_pretrained(src)
    _tokenizer().save_pretrained(src)
    text = tmp_path / "eval.txt"
    text.write_text(" ".join("a b c d e f g h hello world"[i % 21] for i in range(0, 2000, 2)), encoding="utf-8")
    with pytest.raises(SystemExit) as e:
        main(["quantize", str(src), str(tmp_path / "q"), "--method", "rtn", "--bits", "2", "--group-size", "32"])
    assert e.value.code == 0
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main(["eval", str(tmp_path / "q"), "--reference", str(src), "--dataset", str(text), "--seqlen", "16",
              "--json"])
    assert e.value.code == 0
    res = json.loads(capsys.readouterr().out)
    assert res["reference"] == str(src) and res["positions"] == res["windows"] * 15
    assert res["kld_mean"] > 0 and 0 <= res["top1_agreement"] < 1
    with pytest.raises(SystemExit) as e:
        main(["eval", str(src), "--reference", str(src), "--dataset", str(text), "--seqlen", "16"])
    out = capsys.readouterr().out
    assert e.value.code == 0 and "KL divergence mean 0.000000" in out and "top-1 agreement 100.00%" in out
