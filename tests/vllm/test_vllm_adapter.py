"""The vLLM adapter's seams, without starting a server: registration, method override, config parsing, the
weight mapper, load-time checks of a checkpoint's tensors, and the linear method on a vLLM layer (TP=1)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from vllm_helpers import reference_kernel, require_vllm

require_vllm()

from gptq_plugin.adapters import vllm as adapter  # noqa: E402
from gptq_plugin.config import QuantizeConfig  # noqa: E402
from gptq_plugin.errors import CheckpointError, ConfigError  # noqa: E402


def test_register_is_idempotent():
    from vllm.model_executor.layers.quantization import QUANTIZATION_METHODS, get_quantization_config

    adapter.register()
    adapter.register()
    assert QUANTIZATION_METHODS.count("gptq-plugin") == 1
    assert get_quantization_config("gptq-plugin") is adapter.GPTQPluginConfig
    assert hasattr(torch.ops.gptq_plugin, "vllm_gemm")


def test_entry_point_is_declared():
    from importlib.metadata import entry_points

    eps = [ep for ep in entry_points(group="vllm.general_plugins") if ep.name == "gptq_plugin"]
    assert eps and eps[0].load() is adapter.register


@pytest.mark.parametrize("user, method, expected", [
    ("gptq-plugin", "gptq", "gptq-plugin"),
    ("gptq_plugin", "GPTQ", "gptq-plugin"),
    (None, "gptq", None),            # a plain `vllm serve` keeps vLLM's own GPTQ method
    ("gptq", "gptq", None),
    ("gptq-plugin", "awq", None),    # not a GPTQ checkpoint: vLLM reports the mismatch
])
def test_override_only_when_asked(user, method, expected):
    assert adapter.GPTQPluginConfig.override_quantization_method({"quant_method": method}, user) == expected


def test_from_config_reads_every_configuration():
    for bits in (2, 3, 4, 8):
        for gs in (-1, 32, 64, 128):
            for desc_act in (False, True):
                for sym in (False, True):
                    d = QuantizeConfig(bits=bits, group_size=gs, desc_act=desc_act, sym=sym).to_dict()
                    c = adapter.GPTQPluginConfig.from_config(d)
                    q = c.quant
                    assert (q.bits, q.group_size, q.desc_act, q.sym) == (bits, gs, desc_act, sym)
    assert adapter.GPTQPluginConfig.get_name() == "gptq-plugin"
    assert {torch.float16, torch.bfloat16} <= set(adapter.GPTQPluginConfig.get_supported_act_dtypes())


@pytest.mark.parametrize("patch, match", [
    ({"bits": 5}, "bits=5"),
    ({"lm_head": True}, "quantized lm_head"),
    ({"dynamic": {"+:.*": {"bits": 8}}}, "dynamic"),
    ({"quant_method": "awq"}, r"quant_method=.awq.* no checkpoint format this plugin reads"),
])
def test_from_config_rejects_what_it_cannot_serve(patch, match):
    d = QuantizeConfig().to_dict()
    d.update(patch)
    with pytest.raises((ConfigError, CheckpointError), match=match):
        adapter.GPTQPluginConfig.from_config(d)


def test_weight_mapper_keeps_g_idx():
    from vllm.model_executor.layers.quantization.base_config import QuantizationConfig

    name = "model.layers.0.self_attn.q_proj.g_idx"
    assert QuantizationConfig.get_checkpoint_weight_mapper().map_name(name) is None  # vLLM's default drops it
    cfg = adapter.GPTQPluginConfig.from_config(QuantizeConfig(desc_act=True).to_dict())
    assert cfg.get_checkpoint_weight_mapper().map_name(name) == name


def _meta(k=64, n=96, bits=4, gs=32, **over):
    from gptq_plugin.packing import num_groups, packed_rows

    g = num_groups(k, gs)
    m = {
        "model.layers.0.mlp.up_proj.qweight": {"dtype": "I32", "shape": [packed_rows(k, bits), n]},
        "model.layers.0.mlp.up_proj.qzeros": {"dtype": "I32", "shape": [g, packed_rows(n, bits)]},
        "model.layers.0.mlp.up_proj.scales": {"dtype": "F16", "shape": [g, n]},
        "model.layers.0.mlp.up_proj.g_idx": {"dtype": "I32", "shape": [k]},
    }
    m.update(over)
    return {k_: v for k_, v in m.items() if v is not None}


def test_check_checkpoint_accepts_a_consistent_checkpoint():
    for bits in (2, 3, 4, 8):
        for gs in (-1, 32, 48):  # 48 leaves a partial last group of 16 channels
            info = adapter.check_checkpoint(_meta(bits=bits, gs=gs), QuantizeConfig(bits=bits, group_size=gs))
            assert info["modules"] == ["model.layers.0.mlp.up_proj"] and info["has_g_idx"]


@pytest.mark.parametrize("meta, cfg, match", [
    (_meta(**{"lm_head.qweight": {"dtype": "I32", "shape": [8, 100]}}), {}, r"lm_head\.qweight: .*quantized lm_head"),
    (_meta(bits=4), {"bits": 8}, r"up_proj\.qweight has shape \[8, 96\], expected \[16, 96\]"),
    (_meta(gs=32), {"group_size": 64}, r"up_proj\.scales has shape \[2, 96\], expected \[1, 96\]"),
    (_meta(**{"model.layers.0.mlp.up_proj.qzeros": None}), {}, r"up_proj\.qzeros is missing"),
    (_meta(**{"model.layers.0.mlp.up_proj.scales": {"dtype": "I8", "shape": [2, 96]}}), {}, r"scales has dtype I8"),
])
def test_check_checkpoint_names_the_tensor(meta, cfg, match):
    base = {"bits": 4, "group_size": 32}
    base.update(cfg)
    with pytest.raises(CheckpointError, match=match):
        adapter.check_checkpoint(meta, QuantizeConfig(**base))


def test_maybe_update_config_reads_the_folder(tmp_path: Path):
    from safetensors.torch import save_file

    save_file({"lm_head.qweight": torch.zeros(8, 4, dtype=torch.int32)}, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps({"quantization_config": QuantizeConfig().to_dict()}))
    cfg = adapter.GPTQPluginConfig.from_config(QuantizeConfig().to_dict())
    with pytest.raises(CheckpointError, match=r"lm_head\.qweight"):
        cfg.maybe_update_config(str(tmp_path))


@pytest.mark.parametrize("stored_as, labelled", [("gptq", "gptq_v2"), ("gptq_v2", "gptq")])
def test_mislabelled_zero_points_fail_before_loading(tmp_path: Path, stored_as, labelled):
    """A symmetric 4-bit checkpoint whose qzeros follow one convention (v1 stores 7, v2 stores 8) while its
    config names the other: the core's zero-point check stops vLLM before it loads garbage; the right label
    passes, and a compressed-tensors config that is not integer pack-quantized is refused naming its format
    (pack-quantized ones are served: test_vllm_compressed_tensors.py)."""
    from safetensors.torch import save_file

    from gptq_plugin.plugins import get_format

    layer = _quantized_layer(64, 96, 4, 32, desc_act=False, sym=True, bias=False)
    v1 = {leaf: getattr(layer, leaf) for leaf in ("qweight", "qzeros", "scales", "g_idx")}
    stored = get_format(stored_as).from_internal(v1, QuantizeConfig(bits=4, group_size=32), "up_proj")
    save_file({f"model.layers.0.mlp.up_proj.{k}": v.contiguous() for k, v in stored.items()},
              str(tmp_path / "model.safetensors"))
    for label, ok in ((labelled, False), (stored_as, True)):
        qcfg = dict(QuantizeConfig(bits=4, group_size=32).to_dict(), checkpoint_format=label)
        (tmp_path / "config.json").write_text(json.dumps({"quantization_config": qcfg}))
        cfg = adapter.GPTQPluginConfig.from_config(qcfg)
        assert cfg.checkpoint_format == label
        if ok:
            cfg.maybe_update_config(str(tmp_path))
        else:
            with pytest.raises(CheckpointError, match=rf"{stored_as}|zero - 1|zero as is"):
                cfg.maybe_update_config(str(tmp_path))
    with pytest.raises(CheckpointError, match=r"compressed-tensors format float-quantized.*pack-quantized"):
        adapter.GPTQPluginConfig.from_config({"quant_method": "compressed-tensors", "format": "float-quantized",
                                              "config_groups": {}})


# --- the linear method on a real vLLM layer, in this process ----------------------------------------------
@pytest.fixture(scope="module")
def vllm_tp1():
    """vLLM's tensor-parallel state for a single process (world size 1)."""
    import tempfile

    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.distributed import cleanup_dist_env_and_memory, init_distributed_environment, \
        initialize_model_parallel

    adapter.register()
    with set_current_vllm_config(VllmConfig()):
        f = tempfile.NamedTemporaryFile(delete=False)
        init_distributed_environment(1, 0, f"file://{f.name}", 0, backend="gloo")
        initialize_model_parallel(1)
        yield
        cleanup_dist_env_and_memory()


def _quantized_layer(k, n, bits, gs, desc_act, sym, bias, seed=0):
    from gptq_plugin.linear import QuantLinear
    from gptq_plugin.solver import HessianAccumulator, gptq_quantize

    g = torch.Generator().manual_seed(seed)
    W = torch.randn(n, k, generator=g) * 0.05
    acc = HessianAccumulator(k)
    acc.add_batch(torch.randn(64, k, generator=g) * torch.linspace(0.1, 2.0, k))
    res = gptq_quantize(W, acc.finalize(), QuantizeConfig(bits=bits, group_size=gs, desc_act=desc_act, sym=sym))
    b = torch.randn(n, generator=g) * 0.1 if bias else None
    return QuantLinear.from_result(res, gs, b, sym)


@pytest.mark.parametrize("bits, gs, desc_act, sym, bias, dtype", [
    (4, 32, True, False, True, torch.bfloat16),
    (3, 48, False, True, False, torch.float16),   # partial last group (112 = 2 * 48 + 16)
    (2, -1, False, False, True, torch.float32),
    (8, 64, True, True, False, torch.bfloat16),
])
def test_linear_method_matches_reference(vllm_tp1, bits, gs, desc_act, sym, bias, dtype):
    from vllm.model_executor.layers.linear import ColumnParallelLinear

    k, n = 112, 96
    q = _quantized_layer(k, n, bits, gs, desc_act, sym, bias)
    qcfg = QuantizeConfig(bits=bits, group_size=gs, desc_act=desc_act, sym=sym)
    cfg = adapter.GPTQPluginConfig.from_config(qcfg.to_dict())
    layer = ColumnParallelLinear(k, n, bias=bias, quant_config=cfg, params_dtype=dtype, prefix="probe")
    assert isinstance(layer.quant_method, adapter.GPTQPluginLinearMethod)
    for name in ("qweight", "qzeros", "scales", "g_idx"):
        p = getattr(layer, name)
        p.weight_loader(p, getattr(q, name))
    if bias:
        layer.bias.weight_loader(layer.bias, q.bias.to(dtype))
    layer.quant_method.process_weights_after_loading(layer)
    x = torch.randn(5, k, generator=torch.Generator().manual_seed(1)).to(dtype)
    y = layer(x)[0]
    with reference_kernel():
        q.prepare(dtype)
        ref = q(x)
    assert y.dtype == dtype and y.shape == (5, n)
    torch.testing.assert_close(y.float(), ref.float(), rtol=2e-2, atol=2e-2)


# --- tensor-parallel shards, emulated in one process -------------------------------------------------------
class _ShardLayer(torch.nn.Module):
    """What the linear method sees of a vLLM layer on rank ``tp_rank`` (parameters are registered on it)."""

    def __init__(self, tp_rank: int):
        super().__init__()
        self.tp_rank = tp_rank
        self.prefix = f"probe.rank{tp_rank}"


def _load_shard(q, cfg, rank, tp, dtype, row_parallel):
    """Create the GPTQ parameters of rank ``rank`` and load them the way vLLM's Row/ColumnParallelLinear's
    weight_loader_v2 does (``load_row_parallel_weight`` / ``load_column_parallel_weight``)."""
    from vllm.model_executor.parameter import BasevLLMParameter

    k, n = q.in_features, q.out_features
    layer = _ShardLayer(rank)
    method = adapter.GPTQPluginLinearMethod(cfg, layer.prefix)
    if row_parallel:
        loader = lambda p, w: p.load_row_parallel_weight(w)  # noqa: E731
        method.create_weights(layer, k // tp, [n], k, n, dtype, weight_loader=loader)
    else:
        loader = lambda p, w: p.load_column_parallel_weight(w)  # noqa: E731
        method.create_weights(layer, k, [n // tp], k, n, dtype, weight_loader=loader)
    for p in layer.parameters():
        if isinstance(p, BasevLLMParameter):
            p.tp_rank, p.tp_size = rank, tp
    for name in ("qweight", "qzeros", "scales", "g_idx"):
        p = getattr(layer, name)
        p.weight_loader(p, getattr(q, name))
    method.process_weights_after_loading(layer)
    return layer, method


@pytest.mark.parametrize("row_parallel", [True, False], ids=["row", "column"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("bits, gs, desc_act", [
    (4, 32, True),    # act-order: every rank keeps all groups, its g_idx names global groups
    (3, 32, True),
    (4, 32, False),   # 160 = 5 x 32 channels per rank: scales split with qweight
    (2, 64, False),   # 160 = 2.5 x 64: a group straddles the cut, every rank keeps the groups it touches
    (8, -1, False),
])
def test_tensor_parallel_shards_add_up(vllm_tp1, bits, gs, desc_act, dtype, row_parallel):
    tp, k, n = 2, 320, 128
    q = _quantized_layer(k, n, bits, gs, desc_act, sym=False, bias=False, seed=bits)
    cfg = adapter.GPTQPluginConfig.from_config(QuantizeConfig(bits=bits, group_size=gs, desc_act=desc_act,
                                                              sym=False).to_dict())
    x = torch.randn(3, k, generator=torch.Generator().manual_seed(2)).to(dtype)
    parts = []
    for rank in range(tp):
        layer, method = _load_shard(q, cfg, rank, tp, dtype, row_parallel)
        xs = x[:, rank * k // tp:(rank + 1) * k // tp] if row_parallel else x
        parts.append(method.apply(layer, xs).float())
    y = sum(parts) if row_parallel else torch.cat(parts, dim=-1)
    with reference_kernel():
        q.prepare(torch.float32)
        ref = q(x.float())
    torch.testing.assert_close(y, ref, rtol=3e-2, atol=3e-2 * float(ref.abs().mean()) + 1e-3)
