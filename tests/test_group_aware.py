"""Group-aware reordering (``--act-group-aware``) end to end: the checkpoint keeps ``g_idx`` in input order and says
``desc_act: false``, records the ordering in ``meta``, and loads back to the solver's own result."""

import json

import pytest
import torch
from safetensors.torch import load_file

from gptq_plugin.checkpoint import load_quantized
from gptq_plugin.packing import default_g_idx

from .test_reliability_cli import _calib_text, _save_tiny, cli


@pytest.fixture(scope="module")
def tiny_src(tmp_path_factory):
    return _save_tiny(tmp_path_factory.mktemp("tiny") / "model")


def test_cli_group_aware_checkpoint(tiny_src, tmp_path, capsys):
    data = _calib_text(tmp_path / "calib.txt")
    common = ["--group-size", "16", "--dataset", data, "--nsamples", "4", "--seqlen", "32", "--no-static-groups"]
    rc, _, err = cli(capsys, "quantize", tiny_src, tmp_path / "gar", "--act-group-aware", *common)
    assert rc in (0, None), err
    qc = json.loads((tmp_path / "gar" / "config.json").read_text())["quantization_config"]
    assert qc["desc_act"] is False and qc["meta"]["act_group_aware"] is True
    tensors = load_file(tmp_path / "gar" / "model.safetensors")
    g_idx = {k: v for k, v in tensors.items() if k.endswith(".g_idx")}
    assert g_idx and all(torch.equal(v.long(), default_g_idx(v.numel(), 16).long()) for v in g_idx.values())
    rc, _, err = cli(capsys, "quantize", tiny_src, tmp_path / "plain", "--no-act-order", "--no-act-group-aware", *common)
    assert rc in (0, None), err
    plain = load_file(tmp_path / "plain" / "model.safetensors")
    differs = [k for k in tensors if k.endswith(".qweight") and not torch.equal(tensors[k], plain[k])]
    assert differs, "group-aware order gave the same codes as input order"
    x = torch.randint(3, 128, (1, 12))
    with torch.no_grad():
        assert torch.isfinite(load_quantized(tmp_path / "gar")(x).logits).all()


@pytest.mark.parametrize("opts, needle", [(["--act-order", "--act-group-aware"], "exclude each other"),
                                          (["--act-group-aware", "--group-size", "-1"], "needs groups")])
def test_cli_group_aware_conflicts_are_one_error(tiny_src, tmp_path, capsys, opts, needle):
    rc, _, err = cli(capsys, "quantize", tiny_src, tmp_path / "out", *opts)
    assert rc == 2 and needle in err, err
    assert not (tmp_path / "out").exists()


def test_recipe_resolution_follows_the_recommended_recipe(monkeypatch):
    from gptq_plugin import quantize_job

    monkeypatch.setattr(quantize_job, "RECOMMENDED", {"act_group_aware": True, "mse": 2.4, "refit_scales": True})
    r = quantize_job.resolve_recipe
    assert r("gptq", None, None, None, None, None) == (False, True, False, 2.4, True)
    # an explicit --act-order replaces the group-aware order and keeps g_idx in input order with static groups
    assert r("gptq", True, None, None, None, None) == (True, False, True, 2.4, True)
    assert r("gptq", True, None, False, 0.0, False) == (True, False, False, 0.0, False)
    assert r("gptq", False, False, None, None, None) == (False, False, False, 2.4, True)
    assert r("rtn", None, None, None, None, None) == (False, False, False, 0.0, False)
    # one group per row: the recipe's group-aware order becomes act-order (the same order), unless refused
    assert r("gptq", None, None, None, None, None, -1) == (True, False, True, 2.4, True)
    assert r("gptq", False, None, None, None, None, -1) == (False, False, False, 2.4, True)
    monkeypatch.setattr(quantize_job, "RECOMMENDED", {"desc_act": True, "static_groups": True, "mse": 2.4})
    assert r("gptq", None, None, None, None, None) == (True, False, True, 2.4, False)
    assert r("gptq", None, True, None, None, None) == (False, True, True, 2.4, False)


def test_default_recipe_with_one_group_per_row_quantizes(tiny_src, tmp_path, capsys):
    """--group-size -1 without recipe flags must not trip over the default's group-aware order (it needs groups)."""
    data = _calib_text(tmp_path / "calib.txt")
    rc, _, err = cli(capsys, "quantize", tiny_src, tmp_path / "g1", "--group-size", "-1", "--dataset", data,
                     "--nsamples", "4", "--seqlen", "32")
    assert rc in (0, None), err
    qc = json.loads((tmp_path / "g1" / "config.json").read_text())["quantization_config"]
    assert (qc["group_size"], qc["desc_act"], qc["meta"]["act_group_aware"]) == (-1, True, False)


def test_default_recipe_reruns_give_identical_bytes(tiny_src, tmp_path, capsys):
    """The default recipe (group-aware order, MSE clipping, scale refit) is deterministic: two runs, same bytes."""
    from gptq_plugin.config import RECOMMENDED

    assert RECOMMENDED.get("act_group_aware") and RECOMMENDED.get("refit_scales")
    data = _calib_text(tmp_path / "calib.txt")
    for out in ("a", "b"):
        rc, _, err = cli(capsys, "quantize", tiny_src, tmp_path / out, "--group-size", "16", "--dataset", data,
                         "--nsamples", "4", "--seqlen", "32")
        assert rc in (0, None), err
    qc = json.loads((tmp_path / "a" / "config.json").read_text())["quantization_config"]
    assert (qc["desc_act"], qc["static_groups"], qc["meta"]["act_group_aware"], qc["meta"]["refit_scales"]) == (
        False, False, True, True)
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (tmp_path / "b" / "model.safetensors").read_bytes()
