"""GPTQPluginConfig, the routing of GPTQ checkpoints and the registration with Transformers (no model needed)."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import textwrap

import pytest

transformers = pytest.importorskip("transformers", reason="Transformers is not installed: pip install 'gptq-plugin[transformers]'")

from transformers.quantizers import auto  # noqa: E402

from gptq_plugin import ConfigError, GPTQPluginConfig, QuantizeConfig  # noqa: E402
from gptq_plugin.adapters import transformers as adapter  # noqa: E402

LOGGER = "gptq_plugin.adapters.transformers"


def ckpt_dict(**kw) -> dict:
    """A checkpoint's ``quantization_config``, written by ``quantizer`` (another tool by default)."""
    quantizer = kw.pop("quantizer", "auto_gptq:0.7.1")
    d = QuantizeConfig(**kw).to_dict()
    d["meta"]["quantizer"] = [quantizer]
    return d


# --- the config -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kw, needle", [(dict(bits=5), "bits=5"), (dict(group_size=0), "group_size=0"),
                                        (dict(checkpoint_format="marlin"), "checkpoint_format"),
                                        (dict(nsamples=0), "nsamples=0"), (dict(seqlen=-1), "seqlen=-1"),
                                        (dict(dataset=3.5), "dataset=float")])
def test_invalid_arguments_raise_config_error(kw, needle):
    with pytest.raises(ConfigError, match=needle) as e:
        GPTQPluginConfig(**kw)
    assert isinstance(e.value, ValueError)


def test_to_dict_is_the_standard_gptq_config_and_round_trips():
    cfg = GPTQPluginConfig(bits=3, group_size=64, desc_act=True, sym=False, checkpoint_format="gptq_v2",
                           dataset=["some text"] * 3, tokenizer=object(), nsamples=7)
    d = cfg.to_dict()
    assert d == QuantizeConfig(bits=3, group_size=64, desc_act=True, sym=False, checkpoint_format="gptq_v2").to_dict()
    assert d["quant_method"] == "gptq"
    json.loads(cfg.to_json_string())  # no tokenizer or texts in the JSON form
    back = GPTQPluginConfig.from_dict(d)
    assert (back.bits, back.group_size, back.desc_act, back.sym, back.checkpoint_format) == (3, 64, True, False, "gptq_v2")
    assert back.quant_method == "gptq_plugin"
    assert "nsamples=7" in repr(cfg) and "3 texts" in repr(cfg)


def test_damp_auto_round_trips_through_meta():
    d = GPTQPluginConfig(damp_auto=True).to_dict()
    assert d["meta"]["damp_auto"] is True and d["damp_percent"] == 0.01  # other readers see a number
    assert GPTQPluginConfig.from_dict(d).damp_auto is True
    assert GPTQPluginConfig().damp_auto is False
    spelled = GPTQPluginConfig(damp_percent="auto")  # the CLI's spelling
    assert spelled.damp_auto is True and spelled.damp_percent == 0.01
    assert GPTQPluginConfig(damp_percent="0.05").damp_percent == 0.05
    with pytest.raises(ConfigError, match="damp_percent='often' is invalid: .* or 'auto'"):
        GPTQPluginConfig(damp_percent="often")


def test_gptaq_round_trips_through_meta_and_bad_alphas_are_refused():
    """GPTAQ's alpha is recorded in meta as GPTQModel records it ({"alpha": ...}) and read back; left out, plain GPTQ
    (as the other recipe fields); an alpha outside (0, 1] is the core's one ConfigError."""
    d = GPTQPluginConfig(gptaq=0.25).to_dict()
    assert d["meta"]["gptaq"] == {"alpha": 0.25} and d == QuantizeConfig(gptaq=0.25).to_dict()
    assert GPTQPluginConfig.from_dict(d).gptaq == 0.25 and "gptaq=0.25" in repr(GPTQPluginConfig.from_dict(d))
    assert GPTQPluginConfig().gptaq is None and "gptaq" not in GPTQPluginConfig().to_dict()["meta"]
    for bad in (2.0, -0.5):
        with pytest.raises(ConfigError, match=f"gptaq={bad!r} is invalid"):
            GPTQPluginConfig(gptaq=bad)
    with pytest.raises(ConfigError, match="needs true_sequential"):
        GPTQPluginConfig(gptaq=0.25, true_sequential=False)
    # the CLI's default recipe, as docs/transformers.md spells it for this config
    from gptq_plugin.config import RECOMMENDED
    from gptq_plugin.quantize_job import resolve_gptaq, resolve_recipe

    assert RECOMMENDED == dict(act_group_aware=True, mse=2.4, refit_scales=True, gptaq=0.25)
    cfg = GPTQPluginConfig(**RECOMMENDED)
    assert (cfg.desc_act, cfg.act_group_aware, cfg.static_groups, cfg.mse, cfg.refit_scales) == resolve_recipe(
        "gptq", None, None, None, None, None)
    assert cfg.gptaq == resolve_gptaq("gptq", None, True, None, False)[0]


def test_defaults_when_quantizing():
    cfg = GPTQPluginConfig()
    assert (cfg.bits, cfg.group_size, cfg.desc_act, cfg.sym, cfg.nsamples, cfg.seqlen, cfg.batch_size) == (
        4, 128, False, True, 128, 512, 8)


# --- precedence against a checkpoint ------------------------------------------------------------------------
def test_checkpoint_values_win_over_defaults():
    cfg = adapter.route_checkpoint_config(ckpt_dict(bits=3, group_size=64, desc_act=True), GPTQPluginConfig())
    assert isinstance(cfg, GPTQPluginConfig)
    assert (cfg.bits, cfg.group_size, cfg.desc_act) == (3, 64, True)


def test_contradicting_layout_is_one_clear_error():
    user = GPTQPluginConfig(bits=4, group_size=128, desc_act=True)  # desc_act agrees
    with pytest.raises(ConfigError) as e:
        adapter.route_checkpoint_config(ckpt_dict(bits=3, group_size=64, desc_act=True), user)
    msg = str(e.value)
    assert "bits=4, group_size=128" in msg and "bits=3, group_size=64" in msg and "desc_act" not in msg
    assert "GPTQPluginConfig()" in msg  # the fix


def test_agreeing_layout_and_calibration_arguments_are_accepted(caplog):
    user = GPTQPluginConfig(bits=3, nsamples=16, dataset="wikitext2")
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        cfg = adapter.route_checkpoint_config(ckpt_dict(bits=3), user)
    assert cfg.bits == 3
    assert "dataset, nsamples" in caplog.text and "ignored" in caplog.text


def test_routing_without_a_user_config(monkeypatch):
    route = adapter.route_checkpoint_config
    assert isinstance(route(ckpt_dict(quantizer="gptq-plugin:0.1.0"), None), GPTQPluginConfig)
    monkeypatch.setattr(adapter, "_transformers_gptq_available", lambda: True)
    assert route(ckpt_dict(), None) is None  # another tool's checkpoint: Transformers' own GPTQ path
    assert isinstance(route(ckpt_dict(quantizer="gptq-plugin:0.1.0"), None), GPTQPluginConfig)
    monkeypatch.setattr(adapter, "_transformers_gptq_available", lambda: False)
    assert isinstance(route(ckpt_dict(), None), GPTQPluginConfig)  # optimum/gptqmodel missing: the plugin


def test_other_methods_and_other_user_configs_are_left_to_transformers():
    from transformers import GPTQConfig

    route = adapter.route_checkpoint_config
    assert route({"quant_method": "awq", "bits": 4}, GPTQPluginConfig()) is None
    assert route(ckpt_dict(quantizer="gptq-plugin:0.1.0"), GPTQConfig(bits=4)) is None


def test_merge_wrapper_routes_and_delegates(monkeypatch):
    from transformers import GPTQConfig

    merge = auto.AutoHfQuantizer.merge_quantization_configs
    assert isinstance(merge(ckpt_dict(bits=8), GPTQPluginConfig()), GPTQPluginConfig)
    monkeypatch.setattr(adapter, "_transformers_gptq_available", lambda: True)
    assert isinstance(merge(ckpt_dict(), None), GPTQConfig)


# --- registration ------------------------------------------------------------------------------------------
def test_registered_and_idempotent():
    assert auto.AUTO_QUANTIZATION_CONFIG_MAPPING["gptq_plugin"] is adapter.GPTQPluginConfig
    assert auto.AUTO_QUANTIZER_MAPPING["gptq_plugin"] is adapter.GPTQPluginHfQuantizer
    assert adapter.register() and adapter.register()
    original = auto.AutoHfQuantizer.__dict__["merge_quantization_configs"].__func__._gptq_plugin_original
    assert not hasattr(original.__func__, "_gptq_plugin_original")  # wrapped once, never stacked
    assert isinstance(auto.AutoHfQuantizer.from_config(GPTQPluginConfig(), pre_quantized=False),
                      adapter.GPTQPluginHfQuantizer)


def test_a_name_taken_by_another_package_is_left_alone(monkeypatch, caplog):
    class Other(transformers.utils.quantization_config.QuantizationConfigMixin):
        pass

    monkeypatch.setitem(auto.AUTO_QUANTIZATION_CONFIG_MAPPING, "gptq_plugin", Other)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert adapter.register() is False
    assert auto.AUTO_QUANTIZATION_CONFIG_MAPPING["gptq_plugin"] is Other
    assert "already has 'gptq_plugin' registered" in caplog.text


def test_import_twice_and_without_transformers():
    """In a fresh interpreter: importing gptq_plugin imports no Transformers; with Transformers missing it
    raises nothing (GPTQPluginConfig then names the pip command); imported after Transformers it registers;
    re-importing (reload) raises nothing and leaves one registration and one wrapper."""
    script = textwrap.dedent("""
        import importlib, sys
        import gptq_plugin
        assert "transformers" not in sys.modules, "import gptq_plugin imported transformers"
        sys.modules["transformers"] = None  # as if not installed
        importlib.reload(gptq_plugin)
        try:
            gptq_plugin.GPTQPluginConfig
        except ImportError as e:
            assert "pip install 'gptq-plugin[transformers]'" in str(e), e
        else:
            raise AssertionError("GPTQPluginConfig without transformers")
        del sys.modules["transformers"]
        import transformers
        importlib.reload(gptq_plugin)
        adapter = sys.modules["gptq_plugin.adapters.transformers"]
        importlib.reload(gptq_plugin)
        adapter = importlib.reload(adapter)
        from transformers.quantizers import auto
        assert auto.AUTO_QUANTIZER_MAPPING["gptq_plugin"] is adapter.GPTQPluginHfQuantizer
        assert auto.AUTO_QUANTIZATION_CONFIG_MAPPING["gptq_plugin"] is gptq_plugin.GPTQPluginConfig
        original = auto.AutoHfQuantizer.__dict__["merge_quantization_configs"].__func__._gptq_plugin_original
        assert not hasattr(original.__func__, "_gptq_plugin_original")
        print("OK")
    """)
    p = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0 and p.stdout.strip().endswith("OK"), p.stderr[-3000:]


def test_older_gptqmodel_format_key_is_read():
    d = ckpt_dict(bits=4)
    del d["checkpoint_format"]
    d["format"] = "gptq_v2"
    cfg = adapter.route_checkpoint_config(d, GPTQPluginConfig())
    assert cfg.checkpoint_format == "gptq_v2" and cfg.checkpoint_dict()["format"] == "gptq_v2"
