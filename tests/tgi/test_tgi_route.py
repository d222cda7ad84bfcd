"""The route from TGI's ``get_loader`` to the plugin's loader, and the ``gptq-plugin-tgi-server`` wrapper, against
stand-in ``text_generation_server`` modules (the real TGI is exercised in test_real_tgi.py when available)."""

from __future__ import annotations

import abc
import inspect
import json
import sys
import types

import pytest

from gptq_plugin.adapters import tgi, tgi_launcher
from gptq_plugin.errors import ConfigError

from tgi_standin import ATTN, StandInWeights


def _module(name: str, **attrs) -> types.ModuleType:
    mod = types.ModuleType(name)
    mod.__dict__.update(attrs)
    return mod


def make_fake_tgi(get_loader_params=("quantize", "model_id", "revision"), extra_abstract: str | None = None):
    """Modules with the shapes of TGI's: utils.weights (WeightsLoader, Weight, Weights), utils.quantization
    (get_loader, _get_config_json) and a model module that imported ``get_loader`` by name, as TGI's do."""

    abstract = {m: abc.abstractmethod(lambda self, *a: None) for m in
                ("get_weights", "get_weights_col_packed", "get_multi_weights_col", "get_weights_row")}
    if extra_abstract:
        abstract[extra_abstract] = abc.abstractmethod(lambda self: None)
    WeightsLoader = abc.ABCMeta("WeightsLoader", (abc.ABC,), abstract)
    Weight = abc.ABCMeta("Weight", (abc.ABC,), {"get_linear": abc.abstractmethod(lambda self, bias: None)})

    def _get_config_json(model_id, revision, filename):
        with open(f"{model_id}/{filename}") as f:
            return json.load(f)

    def get_loader(quantize, model_id, revision):
        return ("tgi's own loader", quantize)

    if tuple(get_loader_params) != ("quantize", "model_id", "revision"):
        get_loader.__signature__ = inspect.Signature(
            [inspect.Parameter(p, inspect.Parameter.POSITIONAL_OR_KEYWORD) for p in get_loader_params])
    return {
        "text_generation_server": _module("text_generation_server", __path__=[]),
        "text_generation_server.utils": _module("text_generation_server.utils", __path__=[]),
        "text_generation_server.utils.weights": _module("text_generation_server.utils.weights",
                                                        WeightsLoader=WeightsLoader, Weight=Weight,
                                                        Weights=StandInWeights),
        "text_generation_server.utils.quantization": _module("text_generation_server.utils.quantization",
                                                             get_loader=get_loader, _get_config_json=_get_config_json),
        "text_generation_server.models": _module("text_generation_server.models", __path__=[]),
        "text_generation_server.models.causal_lm": _module("text_generation_server.models.causal_lm",
                                                           get_loader=get_loader),
    }


@pytest.fixture
def fake_tgi(monkeypatch):
    def install_modules(**kw):
        mods = make_fake_tgi(**kw)
        for name, mod in mods.items():
            monkeypatch.setitem(sys.modules, name, mod)
        mods["text_generation_server"].utils = mods["text_generation_server.utils"]
        mods["text_generation_server.utils"].weights = mods["text_generation_server.utils.weights"]
        mods["text_generation_server.utils"].quantization = mods["text_generation_server.utils.quantization"]
        return types.SimpleNamespace(weights=mods["text_generation_server.utils.weights"],
                                     quantization=mods["text_generation_server.utils.quantization"],
                                     causal_lm=mods["text_generation_server.models.causal_lm"])

    monkeypatch.setattr(tgi_launcher, "_original_get_loader", None)
    return install_modules


def test_install_routes_gptq_checkpoints_to_the_plugin(fake_tgi, ckpts):
    fake = fake_tgi()
    original = fake.quantization.get_loader
    ckpt = ckpts["3bit-g64-actorder"]
    tgi_launcher.install()
    assert tgi_launcher.is_installed()
    for get_loader in (fake.quantization.get_loader, fake.causal_lm.get_loader):  # also where imported by name
        loader = get_loader(quantize="gptq", model_id=str(ckpt.path), revision=None)
        assert isinstance(loader, tgi.GPTQPluginWeightsLoader)
        assert isinstance(loader, fake.weights.WeightsLoader)  # a virtual subclass of TGI's ABC
        assert (loader.bits, loader.groupsize, loader.desc_act) == (3, 64, True)
    weight = StandInWeights(ckpt.files, "cpu", None, _PG(), loader).get_weights_row(f"{ATTN}.o_proj")
    assert isinstance(weight, fake.weights.Weight)
    tgi_launcher.uninstall()
    assert fake.quantization.get_loader is original and fake.causal_lm.get_loader is original
    assert not tgi_launcher.is_installed()


class _PG:
    def rank(self):
        return 0

    def size(self):
        return 1


def test_other_methods_and_awq_stay_with_tgi(fake_tgi, ckpts, tmp_path):
    fake = fake_tgi()
    tgi_launcher.install()
    path = str(ckpts["4bit-g16"].path)
    assert fake.quantization.get_loader("marlin", path, None) == ("tgi's own loader", "marlin")
    assert fake.quantization.get_loader(None, path, None) == ("tgi's own loader", None)
    (tmp_path / "config.json").write_text(json.dumps({"quantization_config": {"quant_method": "awq", "bits": 4,
                                                                              "group_size": 128}}))
    assert fake.quantization.get_loader("gptq", str(tmp_path), None) == ("tgi's own loader", "gptq")
    empty = tmp_path / "no-config"
    empty.mkdir()
    assert fake.quantization.get_loader("gptq", str(empty), None) == ("tgi's own loader", "gptq")


def test_quantize_config_json_is_read_when_config_json_has_none(fake_tgi, tmp_path):
    fake = fake_tgi()
    tgi_launcher.install()
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (tmp_path / "quantize_config.json").write_text(json.dumps({"bits": 2, "group_size": 32, "desc_act": False}))
    loader = fake.quantization.get_loader("gptq", str(tmp_path), None)
    assert isinstance(loader, tgi.GPTQPluginWeightsLoader) and loader.bits == 2


def test_install_is_idempotent(fake_tgi, ckpts):
    fake = fake_tgi()
    original = fake.quantization.get_loader
    tgi_launcher.install()
    tgi_launcher.install()
    assert isinstance(fake.quantization.get_loader("gptq", str(ckpts["4bit-g16"].path), None),
                      tgi.GPTQPluginWeightsLoader)
    tgi_launcher.uninstall()
    assert fake.quantization.get_loader is original


def test_invalid_quantization_config_names_the_model(fake_tgi, tmp_path):
    fake = fake_tgi()
    tgi_launcher.install()
    (tmp_path / "config.json").write_text(json.dumps({"quantization_config": {"quant_method": "gptq", "bits": 5,
                                                                              "group_size": 128}}))
    with pytest.raises(ConfigError, match=r"bits=5 is not supported"):
        fake.quantization.get_loader("gptq", str(tmp_path), None)


def test_incompatible_tgi_fails_with_a_clear_message(fake_tgi):
    fake_tgi(get_loader_params=("quantize", "model_id", "revision_id", "trust_remote_code"))
    with pytest.raises(tgi_launcher.TGIIncompatibleError,
                       match=r"get_loader takes .*expected \(quantize, model_id, revision\)"
                             r".*tested against text-generation-inference v3\.3\.7"):
        tgi_launcher.install()
    fake_tgi(extra_abstract="get_weights_fused")
    with pytest.raises(tgi_launcher.TGIIncompatibleError, match=r"abstract methods .*\['get_weights_fused'\]"):
        tgi_launcher.install()
    assert not tgi_launcher.is_installed()


def hide_tgi(monkeypatch) -> None:
    """Make ``text_generation_server`` unimportable, also when (the real) TGI was imported earlier."""
    for name in [n for n in sys.modules if n.startswith("text_generation_server.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "text_generation_server", None)


def test_missing_tgi_fails_with_a_clear_message(monkeypatch):
    hide_tgi(monkeypatch)
    with pytest.raises(tgi_launcher.TGIIncompatibleError, match="cannot import TGI's server package"):
        tgi_launcher.check_tgi()


def test_launcher_exits_2_with_one_line_without_tgi(monkeypatch, capsys):
    hide_tgi(monkeypatch)
    assert tgi_launcher.main(["serve", "model", "--quantize", "gptq"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("gptq-plugin-tgi-server: error: cannot import TGI's server package")


def test_launcher_installs_the_route_before_tgi_cli_runs(fake_tgi, monkeypatch):
    fake_tgi()
    seen = {}

    def app(args=None, prog_name=None):
        seen.update(args=args, prog_name=prog_name, routed=tgi_launcher.is_installed())
        raise SystemExit(0)

    monkeypatch.setitem(sys.modules, "text_generation_server.cli", _module("text_generation_server.cli", app=app))
    assert tgi_launcher.main(["serve", "m", "--quantize", "gptq"]) == 0
    assert seen == {"args": ["serve", "m", "--quantize", "gptq"], "prog_name": "text-generation-server",
                    "routed": True}
    tgi_launcher.uninstall()
