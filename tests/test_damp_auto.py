"""``--damp-percent auto`` (``QuantizeConfig.damp_auto``): each layer's dampening chosen by its output error on
held-out calibration batches (:func:`gptq_plugin.solver.choose_damp`).

* the accumulator's halves against float64 sums of the even and the odd batches' Gram matrices;
* the choice against an independent held-out computation (float64 errors of the plain solver's results), and on
  a constructed layer where the fitting half is rank-poor, so that only the held-out score prefers more damping;
* the CLI: the chosen dampenings in the report, ``meta.damp_auto`` in the checkpoint (its ``damp_percent`` stays a
  number), reruns byte-identical, one clear error for a bad value or a single calibration batch, no output.
The 2-rank run writing the same bytes as one process is in ``tests/test_distributed.py`` (mode ``damp-auto``)."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from gptq_plugin.config import DAMP_CANDIDATES, QuantizeConfig
from gptq_plugin.solver import HessianAccumulator, choose_damp, gptq_quantize

from .test_reliability_cli import _calib_text, _save_tiny, cli, digests

RECIPE = dict(bits=4, group_size=16, act_group_aware=True, mse=2.4, refit_scales=True)


@pytest.fixture(autouse=True)
def _keep_threads():
    """``--threads`` in an in-process CLI run sets torch's thread count for the session: restore it."""
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


@pytest.mark.parametrize("batches", [2, 5, 8])
def test_halves_are_the_even_and_odd_batches(batches):
    g = torch.Generator().manual_seed(batches)
    xs = [torch.randn(1 + b % 3, 7, 12, generator=g) for b in range(batches)]
    acc = HessianAccumulator(12, heldout=True)
    for x in xs:
        acc.add_batch(x)
    H = acc.finalize()
    rows = [x.reshape(-1, 12).double() for x in xs]

    def hess(part):
        return 2 * sum(r.t() @ r for r in part) / sum(r.shape[0] for r in part)

    even, odd = acc.halves
    assert H.dtype == even.dtype == odd.dtype == torch.float32
    torch.testing.assert_close(H.double(), hess(rows), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(even.double(), hess(rows[0::2]), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(odd.double(), hess(rows[1::2]), rtol=1e-5, atol=1e-5)


def test_one_batch_has_no_halves_and_the_plain_accumulator_none():
    x = torch.randn(4, 8)
    one = HessianAccumulator(8, heldout=True)
    one.add_batch(x)
    plain = HessianAccumulator(8)
    plain.add_batch(x)
    assert torch.equal(one.finalize(), plain.finalize())  # one leaf: the same bits either way
    assert one.halves is None and plain.halves is None
    assert HessianAccumulator(8, heldout=True).finalize(allow_empty=True) is None


def _layer(seed: int, out: int = 24, inp: int = 64, fit_tokens: int = 512):
    """A weight and the Hessians of two independent token sets from one correlated distribution."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(inp, inp, generator=g) / inp ** 0.5 + torch.eye(inp)
    scale = torch.exp(torch.randn(inp, generator=g))  # channels of very different size, as in LLMs

    def hessian(n):
        x = (torch.randn(n, inp, generator=g) @ mix) * scale
        return 2 * x.t() @ x / n

    return torch.randn(out, inp, generator=g), hessian(fit_tokens), hessian(512)


@pytest.mark.parametrize("seed,fit_tokens", [(0, 512), (1, 512), (2, 40), (3, 24)])
def test_choice_matches_an_independent_held_out_computation(seed, fit_tokens):
    W, H_fit, H_held = _layer(seed, fit_tokens=fit_tokens)
    cfg = QuantizeConfig(damp_auto=True, **RECIPE)
    fit_before = H_fit.clone()
    damp, scores = choose_damp(W, H_fit, H_held, cfg)
    assert torch.equal(H_fit, fit_before)  # borrowed and given back bit for bit
    ref = []
    for d in DAMP_CANDIDATES:
        D = W.double() - gptq_quantize(W, H_fit.clone(), QuantizeConfig(damp_percent=d, **RECIPE)).dequantize().double()
        ref.append(float(torch.einsum("ri,ij,rj->", D, H_held.double(), D)))
    assert scores == pytest.approx(ref, rel=1e-4)
    assert damp == DAMP_CANDIDATES[min(range(len(ref)), key=ref.__getitem__)]


def test_a_rank_poor_fitting_half_needs_more_damping_than_its_own_error_says():
    """24 tokens for 64 input channels: the fitting half's Hessian is rank-poor. Scored on that half itself, the
    smallest dampening wins; scored on held-out tokens, a larger one does, and the full solve then uses it."""
    W, H_fit, H_held = _layer(3, fit_tokens=24)
    cfg = QuantizeConfig(damp_auto=True, **RECIPE)
    on_itself, _ = choose_damp(W, H_fit, H_fit.clone(), cfg)
    held, scores = choose_damp(W, H_fit, H_held, cfg)
    assert on_itself == DAMP_CANDIDATES[0]
    assert held > on_itself and min(scores) < scores[0]
    res = gptq_quantize(W, H_held.clone(), cfg, halves=(H_fit, H_held))
    assert res.damp_percent == held
    plain = gptq_quantize(W, H_held.clone(), QuantizeConfig(damp_percent=held, **RECIPE))
    assert torch.equal(res.codes, plain.codes) and torch.equal(res.scales, plain.scales)
    # without halves, damp_auto falls back to damp_percent
    assert gptq_quantize(W, H_held.clone(), cfg).damp_percent == cfg.damp_percent


def test_python_api_refuses_a_single_batch():
    from gptq_plugin.errors import ConfigError
    from gptq_plugin.pipeline import quantize_model

    from .tiny import tiny_llama

    calib = torch.randint(3, 128, (4, 16), generator=torch.Generator().manual_seed(0))
    with pytest.raises(ConfigError, match="needs at least 2; 4 windows in batches of 8 make 1"):
        quantize_model(tiny_llama(), calib, QuantizeConfig(damp_auto=True, group_size=16), batch_size=8,
                       progress=False)
    report = quantize_model(tiny_llama(), calib, QuantizeConfig(damp_auto=True, group_size=16), batch_size=2,
                            progress=False)
    assert {row.damp_percent for row in report.layers} <= set(DAMP_CANDIDATES)


def test_halves_are_handed_over_once():
    acc = HessianAccumulator(8, heldout=True)
    for _ in range(2):
        acc.add_batch(torch.randn(3, 8))
    acc.finalize()
    assert acc.take_halves() is not None and acc.take_halves() is None and acc.halves is None


def test_candidate_solves_are_labelled_parked_and_stand_for_the_damping_they_used(monkeypatch, tmp_path, caplog):
    """A fitting half that is not positive definite at the smallest candidates: their solves raise the dampening
    (logged as the layer's candidates, not as the layer), and the full Hessian and the fitting half wait on disk
    while the candidates' column loops run, as the plain solve's Hessian does."""
    from gptq_plugin import solver

    W, H_fit, H_held = _layer(4)
    H_fit -= 0.006 * torch.mean(H_fit.diagonal()) * torch.eye(H_fit.shape[0]) + torch.diag(
        torch.linalg.eigvalsh(H_fit)[0].expand(H_fit.shape[0]))  # smallest eigenvalue -0.006 mean(diag)
    H = H_held.clone()
    parked = []
    real = solver.offloaded

    def spy(t, folder, min_bytes, what="Hessian"):
        parked.append((t.data_ptr(), folder is not None))
        return real(t, folder, min_bytes, what)

    monkeypatch.setattr(solver, "offloaded", spy)
    monkeypatch.setattr(solver, "OFFLOAD_MIN_BYTES", 0)
    ptrs = (H.data_ptr(), H_fit.data_ptr())
    cfg = QuantizeConfig(damp_auto=True, damp_auto_increment=0.0025, **RECIPE)
    with caplog.at_level("WARNING", logger="gptq_plugin.solver"):
        res = gptq_quantize(W, H, cfg, name="L", offload_dir=tmp_path, halves=(H_fit, H_held))
    assert set(ptrs) <= {p for p, on in parked if on}
    assert "L (damp_auto candidate 0.005): Hessian not positive definite at damp_percent=0.005" in caplog.text
    assert not any(r.getMessage().startswith("L:") for r in caplog.records)
    damp, scores = choose_damp(W, H_fit, H_held, cfg)
    assert res.damp_percent == damp and damp not in (0.005,) and min(scores) < float("inf")
    assert list(tmp_path.iterdir()) == []


def test_a_layer_without_halves_is_noted_in_the_report():
    from gptq_plugin.blockquant import _solve_layer

    W, H_fit, H_held = _layer(0)
    mod = torch.nn.Linear(W.shape[1], W.shape[0], bias=False)
    mod.weight.data.copy_(W)
    cfg = QuantizeConfig(damp_auto=True, **RECIPE)
    _, row = _solve_layer("mlp.experts.3.down_proj", mod, H_held.clone(), cfg, "model.layers.0", False)
    assert row.damp_percent == 0.01 and "do not cover both halves" in row.note
    _, row = _solve_layer("mlp.experts.3.down_proj", mod, H_held.clone(), cfg, "model.layers.0", False,
                          halves=(H_fit, H_held))
    assert row.damp_percent in DAMP_CANDIDATES and row.note is None


def test_config_records_damp_auto_only_when_on():
    assert "damp_auto" not in QuantizeConfig().to_dict()["meta"]  # other checkpoints keep their bytes
    d = QuantizeConfig(damp_auto=True).to_dict()
    assert d["meta"]["damp_auto"] is True and d["damp_percent"] == 0.01
    assert QuantizeConfig.from_dict(d).damp_auto is True
    assert QuantizeConfig.from_dict(QuantizeConfig().to_dict()).damp_auto is False
    off = dataclasses.replace(QuantizeConfig.from_dict(d), damp_auto=False)  # meta carries it: off wins
    assert "damp_auto" not in off.to_dict()["meta"] and QuantizeConfig.from_dict(off.to_dict()).damp_auto is False
    from gptq_plugin.errors import ConfigError

    with pytest.raises(ConfigError, match="damp_auto"):
        QuantizeConfig(damp_auto="yes")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("damp-auto")
    return {"model": _save_tiny(d / "model"), "calib": _calib_text(d / "calib.txt")}


def test_cli_damp_auto_reports_each_layers_choice_and_reruns_identically(files, tmp_path, capsys):
    args = ["--group-size", "16", "--dataset", files["calib"], "--nsamples", "8", "--seqlen", "32", "--batch-size",
            "2", "--threads", "1", "--damp-percent", "auto"]
    for out in ("a", "b"):
        rc, _, err = cli(capsys, "quantize", files["model"], tmp_path / out, *args, "--report", tmp_path / f"{out}.json")
        assert rc in (0, None), err
    assert digests(tmp_path / "a") == digests(tmp_path / "b")
    qc = json.loads((tmp_path / "a" / "config.json").read_text())["quantization_config"]
    assert qc["damp_percent"] == 0.01 and qc["meta"]["damp_auto"] is True
    damps = [row["damp_percent"] for row in json.loads((tmp_path / "a.json").read_text())["layers"]]
    assert len(damps) == 14 and set(damps) <= set(DAMP_CANDIDATES)
    rc, _, err = cli(capsys, "quantize", files["model"], tmp_path / "fixed", *args[:-2], "--damp-percent", "0.01")
    assert rc in (0, None), err
    assert digests(tmp_path / "fixed")["model.safetensors"] != digests(tmp_path / "a")["model.safetensors"]


def test_cli_rtn_does_not_record_damp_auto(files, tmp_path, capsys, caplog):
    rc, _, err = cli(capsys, "quantize", files["model"], tmp_path / "rtn", "--method", "rtn", "--group-size", "16",
                     "--damp-percent", "auto")
    assert rc in (0, None) and "--damp-percent auto is not used" in caplog.text, err
    qc = json.loads((tmp_path / "rtn" / "config.json").read_text())["quantization_config"]
    assert "damp_auto" not in qc["meta"]


@pytest.mark.parametrize("opts, needle", [
    (["--damp-percent", "often"], "damp_percent='often' is invalid: use a value in (0, 1), e.g. 0.01, or 'auto'"),
    (["--damp-percent", "1.5"], "damp_percent='1.5' is invalid"),
    (["--damp-percent", "auto", "--nsamples", "4", "--batch-size", "8"], "needs at least 2; 4 windows in batches of 8 make 1: use more calibration windows (--nsamples) or a smaller --batch-size"),
])
def test_cli_damp_errors_are_one_line_and_write_nothing(files, tmp_path, capsys, opts, needle):
    rc, _, err = cli(capsys, "quantize", files["model"], tmp_path / "out", "--dataset", files["calib"], "--seqlen",
                     "32", *opts)
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert rc == 2 and len(lines) == 1 and needle in lines[0], err
    assert "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == []
