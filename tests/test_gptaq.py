"""GPTAQ in the driver (``QuantizeConfig.gptaq``, ``quantize --gptaq ALPHA``; Li et al., ICML 2025, arXiv
2504.02692): the second calibration stream through the unquantized blocks.

* the Hessian and the asymmetric term ``2/n Σ (x_fp - x)ᵀ x`` the solver gets for every layer of a tiny Llama's
  second block, against an independent computation from full-model forwards: ``x_fp`` in the original model,
  ``x`` in a copy whose earlier layers carry the dequantized weights the run produced;
* the config: its range, what it excludes, its record in ``meta`` (GPTQModel's ``{"alpha": ...}``), and reading
  GPTQModel's records without refusing a checkpoint;
* MoE with ``moe_calibration="all"``: an expert's term over every token, against full-model forwards;
* the driver's refusals (routed MoE calibration, ``low_memory=False``), and a run interrupted
  after its first block that resumes from both recorded streams to the same bytes as an uninterrupted run;
* the CLI: the flag recorded in the checkpoint, reruns byte-identical, the default recipe's GPTAQ (the bytes of
  ``--gptaq 0.25``; ``--gptaq 0`` turns it off) and its reported fallbacks to plain GPTQ (``--one-pass``,
  ``--no-true-sequential``, routed MoE calibration), one clear error and no output for a bad value.

Several torchrun ranks write one process's bytes, and the accumulator's tree for the term is checked against an
independent sum, in ``tests/test_distributed.py`` (mode ``gptaq``). The solver's GPTAQ term itself is tested against
a transcription of the reference loop in ``tests/test_solver.py``."""

from __future__ import annotations

import copy
import dataclasses
import json

import pytest
import torch

from gptq_plugin import blockquant, driver
from gptq_plugin.config import QuantizeConfig
from gptq_plugin.errors import ConfigError
from gptq_plugin.pipeline import quantize_model
from gptq_plugin.resume import ResumeState, fingerprint

from .test_reliability_cli import _calib_text, _save_tiny, cli, digests, one_error
from .tiny import tiny_llama, tiny_moe

CFG = dict(bits=3, group_size=32, act_group_aware=True, mse=2.4, refit_scales=True, gptaq=0.25)
GROUPS = [["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], ["self_attn.o_proj"],
          ["mlp.gate_proj", "mlp.up_proj"], ["mlp.down_proj"]]


@pytest.fixture(autouse=True)
def _keep_threads():
    """``--threads`` in an in-process CLI run sets torch's thread count for the session: restore it."""
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def _calib(n: int = 6, seqlen: int = 24) -> torch.Tensor:
    return torch.randint(3, 128, (n, seqlen), generator=torch.Generator().manual_seed(1))


def _record_solves(monkeypatch) -> dict[str, dict]:
    """Wrap the driver's solver call: layer name -> its Hessian, ``dxxt`` and dequantized result."""
    seen: dict[str, dict] = {}
    real = blockquant.gptq_quantize

    def spy(W, H, cfg, name="layer", dxxt=None, **kw):
        res = real(W, H, cfg, name=name, dxxt=dxxt, **kw)
        seen[name] = {"H": H.clone(), "dxxt": None if dxxt is None else dxxt.clone(), "W": res.dequantize(),
                      "alpha": kw.get("gptaq_alpha")}
        return res

    monkeypatch.setattr(blockquant, "gptq_quantize", spy)
    return seen


def _inputs_to(model, layer: str, calib: torch.Tensor, batch_size: int) -> torch.Tensor:
    """fp32 ``[tokens, in]``: the input of ``layer`` over full-model forwards of the calibration batches."""
    rows = []
    h = model.get_submodule(layer).register_forward_pre_hook(lambda m, a: rows.append(a[0].reshape(-1, a[0].shape[-1])))
    try:
        with torch.no_grad():
            for i in range(0, calib.shape[0], batch_size):
                model(input_ids=calib[i:i + batch_size], use_cache=False)
    finally:
        h.remove()
    return torch.cat(rows).double()


def test_each_layers_terms_match_full_model_forwards(monkeypatch):
    torch.manual_seed(0)
    original = tiny_llama(layers=2).eval()
    model, calib = copy.deepcopy(original), _calib()
    seen = _record_solves(monkeypatch)
    quantize_model(model, calib, QuantizeConfig(**CFG), batch_size=2, progress=False)
    assert len(seen) == 14 and all(s["dxxt"] is not None and s["alpha"] == 0.25 for s in seen.values())

    partly = copy.deepcopy(original)  # the earlier layers quantized, the rest as in the original
    for name in [f"model.layers.0.{n}" for g in GROUPS for n in g]:
        partly.get_submodule(name).weight.data = seen[name]["W"].clone()
    for group in GROUPS:
        head = f"model.layers.1.{group[0]}"
        x_fp = _inputs_to(original, head, calib, 2)
        x = _inputs_to(partly, head, calib, 2)
        n = x.shape[0]
        H, D = 2 / n * x.t() @ x, 2 / n * (x_fp - x).t() @ x
        assert D.abs().max() > 1e-3 * H.abs().max(), "the two streams agree: nothing would be tested"
        for layer in group:
            got = seen[f"model.layers.1.{layer}"]
            torch.testing.assert_close(got["H"].double(), H, rtol=1e-4, atol=1e-6 * float(H.abs().max()))
            torch.testing.assert_close(got["dxxt"].double(), D, rtol=1e-4, atol=1e-5 * float(D.abs().max()))
        for layer in group:  # later groups see this group's quantized weights
            partly.get_submodule(f"model.layers.1.{layer}").weight.data = seen[f"model.layers.1.{layer}"]["W"].clone()
    block0 = [s["dxxt"] for name, s in seen.items() if name.startswith("model.layers.0.self_attn.q_proj")]
    assert float(block0[0].abs().max()) == 0.0  # the first group of the first block: both streams are the embeddings


def test_gptaq_changes_the_weights_and_plain_runs_stay_plain(monkeypatch):
    torch.manual_seed(0)
    original = tiny_llama(layers=2).eval()
    seen = _record_solves(monkeypatch)
    plain = copy.deepcopy(original)
    quantize_model(plain, _calib(), QuantizeConfig(**dict(CFG, gptaq=None)), batch_size=2, progress=False)
    assert all(s["dxxt"] is None for s in seen.values())
    gptaq = copy.deepcopy(original)
    quantize_model(gptaq, _calib(), QuantizeConfig(**CFG), batch_size=2, progress=False)
    q = dict(plain.named_buffers()), dict(gptaq.named_buffers())
    assert any(not torch.equal(q[0][k], q[1][k]) for k in q[0] if k.endswith("qweight") and "layers.1" in k)


@pytest.mark.parametrize("kw, needle", [
    (dict(gptaq=0), "gptaq=0 is invalid: use an alpha in (0, 1]"),
    (dict(gptaq=1.5), "gptaq=1.5 is invalid"),
    (dict(gptaq=True), "gptaq=True is invalid"),
    (dict(gptaq="0.25"), "gptaq='0.25' is invalid"),
    (dict(gptaq=0.25, method="rtn"), "needs method='gptq'"),
    (dict(gptaq=0.25, true_sequential=False), "needs true_sequential"),
])
def test_config_refuses_impossible_values(kw, needle):
    with pytest.raises(ConfigError, match=needle.replace("(", r"\(").replace("]", r"\]")):
        QuantizeConfig(**kw)


def test_config_records_alpha_as_gptqmodel_does_and_reads_its_records():
    cfg = QuantizeConfig(gptaq=0.25)
    d = cfg.to_dict()
    assert d["meta"]["gptaq"] == {"alpha": 0.25} and QuantizeConfig.from_dict(d).gptaq == 0.25
    assert "gptaq" not in QuantizeConfig().to_dict()["meta"]  # checkpoints without it keep their bytes
    off = dataclasses.replace(QuantizeConfig.from_dict(d), gptaq=None)  # meta carries it: off wins
    assert "gptaq" not in off.to_dict()["meta"]
    gptqmodel = {"bits": 4, "group_size": 128, "desc_act": False, "sym": True, "quant_method": "gptq"}
    for record, alpha in [({"alpha": 0.25, "device": "cpu"}, 0.25), (None, None), ({"alpha": 7}, None),
                          ("on", None), (0.5, 0.5)]:  # never a reason to refuse a checkpoint
        assert QuantizeConfig.from_dict(dict(gptqmodel, meta={"gptaq": record})).gptaq == alpha
    unsequential = dict(gptqmodel, true_sequential=False, meta={"gptaq": {"alpha": .25}})
    assert QuantizeConfig.from_dict(unsequential).gptaq is None


@pytest.mark.parametrize("arch", ["qwen3_moe", "mixtral"])
def test_moe_experts_see_every_token_in_both_streams(monkeypatch, arch):
    """With moe_calibration "all", an expert's layers get the asymmetric term of all calibration tokens: checked for
    block 1's expert 2 against full-model forwards of the original and of the partly quantized model, both with
    their experts in the same calibration mode (every token through every expert, outputs routed)."""
    from gptq_plugin.moe import set_calibration
    from gptq_plugin.plugins import split_experts

    original = tiny_moe(arch, seed=1)
    model, calib = copy.deepcopy(original), _calib()
    seen = _record_solves(monkeypatch)
    quantize_model(model, calib, QuantizeConfig(**CFG), batch_size=2, progress=False)
    experts = [n for n in seen if n.startswith("model.layers.1.") and ".experts.2." in n]
    assert len(experts) == 3, sorted(seen)
    partly = copy.deepcopy(original)
    for ref in (original, partly):
        split_experts(ref, ref.model.layers)
        for b in ref.model.layers:
            set_calibration(b, "all")
    stored = driver.checkpoint_module_names(partly, partly.model.layers, "model.layers")  # e.g. mlp -> block_sparse_moe
    before = [n for n, m in partly.named_modules() if isinstance(m, torch.nn.Linear)
              and (n.startswith("model.layers.0.") or n.startswith("model.layers.1.self_attn."))]
    for name in before:  # what the driver quantized before block 1's experts
        partly.get_submodule(name).weight.data = seen[stored.get(name, name)]["W"].clone()
    module = {v: k for k, v in stored.items()}
    head = next(n for n in experts if n.endswith(("gate_proj", "w1")))
    x_fp, x = (_inputs_to(m, module.get(head, head), calib, 2) for m in (original, partly))
    assert x.shape[0] == calib.numel(), "every token reaches every expert"
    n = x.shape[0]
    D = 2 / n * (x_fp - x).t() @ x
    assert D.abs().max() > 0
    torch.testing.assert_close(seen[head]["dxxt"].double(), D, rtol=1e-4, atol=1e-5 * float(D.abs().max()))


def test_driver_refuses_routed_moe_and_one_pass():
    cfg = QuantizeConfig(**CFG)
    with pytest.raises(ConfigError, match="gptaq with moe_calibration='routed' is not supported .*--moe-calibration "
                                          "all"):
        quantize_model(tiny_moe(), _calib(), dataclasses.replace(cfg, moe_calibration="routed"), batch_size=2,
                       progress=False)
    with pytest.raises(ConfigError, match="gptaq runs the low-memory driver .*drop --one-pass"):
        quantize_model(tiny_llama(), _calib(), cfg, batch_size=2, progress=False, low_memory=False)
    changed = QuantizeConfig(**CFG)
    changed.true_sequential = False  # changed after it was checked: checked again
    with pytest.raises(ConfigError, match="needs true_sequential"):
        quantize_model(tiny_llama(), _calib(), changed, batch_size=2, progress=False)


def test_a_run_interrupted_after_a_block_resumes_to_the_same_bytes(tmp_path, monkeypatch):
    src = _save_tiny(tmp_path / "src", layers=3)
    cfg, calib = QuantizeConfig(**CFG), _calib()
    fp = fingerprint(cfg, src, calib, 2)

    def run(out, stop_after=None):
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
        state = ResumeState.open(out, fp)
        if stop_after is not None:
            real = ResumeState.save_block

            def save_then_stop(self, index, *a, **kw):
                real(self, index, *a, **kw)
                if index == stop_after:
                    raise KeyboardInterrupt

            monkeypatch.setattr(ResumeState, "save_block", save_then_stop)
        try:
            quantize_model(model, calib, cfg, batch_size=2, progress=False, resume=state)
        finally:
            monkeypatch.undo()
        return {k: v for k, v in model.state_dict().items()}, state

    whole, _ = run(tmp_path / "whole")
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "cut", stop_after=0)
    stored = sorted(p.name for p in (tmp_path / ".cut.partial" / "activations").iterdir())
    assert {f"{s}-00001-0000{i}.safetensors" for s in ("x", "xfp") for i in range(3)} <= set(stored)
    resumed, state = run(tmp_path / "cut")
    assert state.done == 3 and whole.keys() == resumed.keys()
    assert all(torch.equal(whole[k], resumed[k]) for k in whole)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("gptaq")
    return {"model": _save_tiny(d / "model"), "calib": _calib_text(d / "calib.txt")}


ARGS = ["--group-size", "16", "--nsamples", "8", "--seqlen", "32", "--batch-size", "2", "--threads", "1"]


def test_cli_records_gptaq_and_reruns_identically(files, tmp_path, capsys):
    for out in ("a", "b"):
        rc, _, err = cli(capsys, "quantize", files["model"], tmp_path / out, "--dataset", files["calib"], *ARGS,
                         "--gptaq", "0.25")
        assert rc in (0, None), err
    assert digests(tmp_path / "a") == digests(tmp_path / "b")
    qc = json.loads((tmp_path / "a" / "config.json").read_text())["quantization_config"]
    assert qc["meta"]["gptaq"] == {"alpha": 0.25}
    # the default recipe is GPTAQ with alpha 0.25: the same bytes; --gptaq 0 is plain GPTQ
    rc, _, err = cli(capsys, "quantize", files["model"], tmp_path / "default", "--dataset", files["calib"], *ARGS)
    assert rc in (0, None), err
    assert digests(tmp_path / "default") == digests(tmp_path / "a")
    rc, _, err = cli(capsys, "quantize", files["model"], tmp_path / "plain", "--dataset", files["calib"], *ARGS,
                     "--gptaq", "0")
    assert rc in (0, None), err
    assert digests(tmp_path / "plain")["model.safetensors"] != digests(tmp_path / "a")["model.safetensors"]
    assert "gptaq" not in json.loads((tmp_path / "plain" / "config.json").read_text())["quantization_config"]["meta"]


@pytest.mark.parametrize("opts", [["--one-pass"], ["--no-true-sequential"]])
def test_cli_default_falls_back_to_plain_gptq_and_says_so(files, tmp_path, capsys, caplog, opts):
    """Where GPTAQ cannot run, the default recipe runs plain GPTQ (the bytes of ``--gptaq 0``), with a warning and
    the reason in the summary; nothing about it in the checkpoint."""
    rc, out, err = cli(capsys, "quantize", files["model"], tmp_path / "default", "--dataset", files["calib"], *ARGS,
                       *opts)
    assert rc in (0, None), err
    assert f"GPTAQ (part of the default recipe) is off for this run: {opts[0]} needs plain GPTQ" in caplog.text
    assert f"(gptq, GPTAQ off: {opts[0]}, 4-bit" in out
    caplog.clear()
    rc, out, err = cli(capsys, "quantize", files["model"], tmp_path / "plain", "--dataset", files["calib"], *ARGS,
                       *opts, "--gptaq", "0")
    assert rc in (0, None), err
    assert "GPTAQ" not in caplog.text + out
    assert digests(tmp_path / "default") == digests(tmp_path / "plain")


def test_resolve_gptaq_and_has_experts(tmp_path):
    from gptq_plugin.quantize_job import has_experts, resolve_gptaq

    assert resolve_gptaq("gptq", None, True, None, False) == (0.25, None)
    assert resolve_gptaq("gptq", None, True, True, False) == (0.25, None)
    assert resolve_gptaq("gptq", 0.5, True, None, False) == (0.5, None)
    assert resolve_gptaq("gptq", 0.0, True, None, False) == (None, None)
    assert resolve_gptaq("gptq", None, False, None, False) == (None, "--no-true-sequential")
    assert resolve_gptaq("gptq", None, True, False, False) == (None, "--one-pass")
    assert resolve_gptaq("gptq", None, True, None, True) == (None, "--moe-calibration routed")
    assert resolve_gptaq("gptq", 0.25, True, False, True) == (0.25, None)  # explicit: refused later, not dropped
    assert resolve_gptaq("rtn", None, True, None, False) == (None, None)
    assert resolve_gptaq("rtn", 0.25, True, None, False) == (0.25, None)  # refused by the config
    for config, moe in [({"num_experts": 8}, True), ({"num_local_experts": 4}, True), ({"n_routed_experts": 64}, True),
                        ({"text_config": {"num_experts": 8}}, True), ({"num_experts": 0}, False),
                        ({"hidden_size": 64}, False), ([1, 2], False)]:
        (tmp_path / "config.json").write_text(json.dumps(config))
        assert has_experts(tmp_path) is moe, config
    (tmp_path / "config.json").write_text("{not json")
    assert has_experts(tmp_path) is False and has_experts(tmp_path / "missing") is False


def test_cli_default_with_routed_moe_calibration_runs_plain_gptq(tmp_path, capsys, caplog):
    from .test_moe import _save_moe

    src = _save_moe(tmp_path / "moe", layers=1)
    data = _calib_text(tmp_path / "calib.txt")
    rc, out, err = cli(capsys, "quantize", src, tmp_path / "out", "--dataset", data, *ARGS,
                       "--moe-calibration", "routed")
    assert rc in (0, None), err
    assert "off for this run: --moe-calibration routed needs plain GPTQ" in caplog.text
    assert "GPTAQ off: --moe-calibration routed" in out


@pytest.mark.parametrize("opts, needle", [
    (["--gptaq", "2"], "gptaq=2.0 is invalid: use an alpha in (0, 1]"),
    (["--gptaq", "0.25", "--one-pass"], "gptaq runs the low-memory driver"),
    (["--gptaq", "0.25", "--no-true-sequential"], "needs true_sequential"),
    (["--gptaq", "0.25", "--method", "rtn"], "needs method='gptq'"),
])
def test_cli_errors_are_one_line_and_write_nothing(files, tmp_path, capsys, opts, needle):
    rc, _, err = cli(capsys, "quantize", files["model"], tmp_path / "out", "--dataset", files["calib"], *ARGS, *opts)
    assert needle in one_error(rc, err)
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_cli_refuses_one_pass_before_loading_anything(files, tmp_path, capsys, monkeypatch):
    import gptq_plugin.quantize_job as job

    monkeypatch.setattr(job, "load_tokenizer", lambda *a: pytest.fail("loaded the tokenizer before refusing"))
    rc, _, err = cli(capsys, "quantize", files["model"], tmp_path / "out", *ARGS, "--gptaq", "0.25", "--one-pass")
    assert "drop --one-pass" in one_error(rc, err)


def test_cli_summary_names_gptaq(files, tmp_path, capsys):
    rc, out, err = cli(capsys, "quantize", files["model"], tmp_path / "out", "--dataset", files["calib"], *ARGS,
                       "--gptaq", "0.5")
    assert rc in (0, None), err
    assert "(gptq + GPTAQ alpha 0.5, 4-bit" in out and "which GPTAQ does not minimise" in out


@pytest.mark.parametrize("mode", ["noao", "ao"])
def test_benchmarks_plain_gptq_modes_turn_the_whole_default_recipe_off(files, tmp_path, capsys, monkeypatch, mode):
    """benchmarks/quality.py's plain-GPTQ modes (side_by_side.py's default too) name every part of the default recipe
    off: the checkpoint records no GAR, MSE clipping, refit, static groups or GPTAQ, where the default records them."""
    from pathlib import Path

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import quality

    qcs = {}
    for name, flags in (("default", []), (mode, quality.MODE_FLAGS[mode])):
        rc, _, err = cli(capsys, "quantize", files["model"], tmp_path / name, "--dataset", files["calib"], *ARGS,
                         *flags)
        assert rc in (0, None), err
        qcs[name] = json.loads((tmp_path / name / "config.json").read_text())["quantization_config"]
    meta = qcs["default"]["meta"]
    assert meta["act_group_aware"] and meta["mse"] > 0 and meta["refit_scales"] and meta["gptaq"] == {"alpha": 0.25}
    qc = qcs[mode]
    assert (qc["desc_act"], qc["static_groups"]) == (mode == "ao", False)
    assert (qc["meta"]["act_group_aware"], qc["meta"]["mse"], qc["meta"]["refit_scales"]) == (False, 0.0, False)
    assert "gptaq" not in qc["meta"]
    # and `inspect` says so
    from gptq_plugin.checkpoint import inspect_checkpoint, recipe_of

    assert inspect_checkpoint(tmp_path / mode)["recipe"] == "plain"
    rc, out, _ = cli(capsys, "inspect", tmp_path / "default")
    assert "recipe: group-aware order, MSE clipping 2.4, refit scales, GPTAQ alpha 0.25" in out
    assert recipe_of({"damp_auto": True, "mse": 0.0}) == "damping per layer"
    assert recipe_of({"quantizer": ["gptqmodel:7.7.0"]}) == recipe_of(None) == "not recorded"


def test_kept_stand_in_weight_is_built_once_with_the_same_values():
    from gptq_plugin.linear import QuantLinear
    from gptq_plugin.solver import gptq_quantize

    g = torch.Generator().manual_seed(0)
    W, X = torch.randn(24, 64, generator=g), torch.randn(100, 64, generator=g)
    res = gptq_quantize(W, 2 / 100 * X.t() @ X, QuantizeConfig(bits=4, group_size=32))
    packed = QuantLinear.from_result(res, 32, None, True)
    plain = blockquant._DequantizedLinear(packed, None, torch.float32)
    kept = blockquant._DequantizedLinear(packed, None, torch.float32, keep_weight=True)
    assert plain.weight is not plain.weight and kept.weight is kept.weight
    assert torch.equal(kept.weight, plain.weight) and torch.equal(kept.weight, res.dequantize())
