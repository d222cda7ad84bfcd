import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gptq_plugin.config import QuantizeConfig
from gptq_plugin.errors import CheckpointError, ConfigError


@settings(max_examples=50, deadline=None)
@given(bits=st.sampled_from([2, 3, 4, 8]), group_size=st.one_of(st.just(-1), st.integers(1, 4096)),
       desc_act=st.booleans(), sym=st.booleans(), static_groups=st.booleans(), true_sequential=st.booleans(),
       damp=st.floats(0.0001, 0.5), fmt=st.sampled_from(["gptq", "gptq_v2"]), method=st.sampled_from(["gptq", "rtn"]))
def test_json_round_trip(bits, group_size, desc_act, sym, static_groups, true_sequential, damp, fmt, method):
    cfg = QuantizeConfig(bits=bits, group_size=group_size, desc_act=desc_act, sym=sym, static_groups=static_groups,
                         true_sequential=true_sequential, damp_percent=damp, checkpoint_format=fmt, method=method)
    d = json.loads(cfg.to_json())
    assert d["quant_method"] == "gptq" and d["checkpoint_format"] == fmt
    assert d["meta"]["quantizer"][0].startswith("gptq-plugin:")
    back = QuantizeConfig.from_dict(d)
    for f in ("bits", "group_size", "desc_act", "sym", "static_groups", "true_sequential", "damp_percent",
              "checkpoint_format", "method"):
        assert getattr(back, f) == getattr(cfg, f), f


def test_reads_autogptq_style_config():
    d = {"bits": 4, "group_size": 128, "desc_act": True, "sym": True, "damp_percent": 0.01,
         "quant_method": "gptq", "model_file_base_name": "model", "format": "gptq_v2"}
    cfg = QuantizeConfig.from_dict(d)
    assert cfg.desc_act and cfg.checkpoint_format == "gptq_v2"


@pytest.mark.parametrize("kw, match", [
    (dict(bits=5), "bits=5"), (dict(bits=True), "bits=True"), (dict(group_size=0), "group_size=0"),
    (dict(group_size=-2), "group_size=-2"), (dict(damp_percent=0), "damp_percent"), (dict(damp_percent=1.5), "damp_percent"),
    (dict(checkpoint_format="awq"), "checkpoint_format"), (dict(method="awq"), "method"), (dict(sym="yes"), "sym"),
])
def test_invalid_configs_name_the_field(kw, match):
    with pytest.raises(ConfigError, match=match):
        QuantizeConfig(**kw)


def test_other_quant_method_refused():
    with pytest.raises(ConfigError, match="awq"):
        QuantizeConfig.from_dict({"quant_method": "awq", "bits": 4})


def test_from_pretrained_errors(tmp_path):
    with pytest.raises(CheckpointError, match="not a GPTQ checkpoint"):
        QuantizeConfig.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        QuantizeConfig.from_pretrained(tmp_path)
