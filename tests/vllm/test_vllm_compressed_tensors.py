"""compressed-tensors ``pack-quantized`` checkpoints through ``--quantization gptq-plugin``, without a server: the
config, the load-time checks, and vLLM's own linear layers (q/k/v, gate/up, row-parallel) loaded from the same
layers written in both formats, at tensor-parallel sizes 1 and 2 (each rank built in this process with vLLM's
weight loaders): every rank's output from the compressed-tensors tensors equals its output from the GPTQ ones,
and the ranks together give the core's reference layer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from vllm_helpers import reference_kernel, require_vllm

require_vllm()

from gptq_plugin.adapters import vllm as adapter  # noqa: E402
from gptq_plugin.config import QuantizeConfig  # noqa: E402
from gptq_plugin.errors import CheckpointError  # noqa: E402
from gptq_plugin.plugins import get_format  # noqa: E402
from test_vllm_adapter import vllm_tp1  # noqa: E402,F401  (vLLM's single-process parallel state, a fixture)

CT = "compressed-tensors"
GPTQ_LEAVES = ("qweight", "qzeros", "scales", "g_idx")


def _as_ct(layers: dict, cfg: QuantizeConfig) -> tuple[dict, dict]:
    """The compressed-tensors ``quantization_config`` and tensors of in-memory v1 ``layers`` (name -> QuantLinear),
    written by the core's handler as ``gptq-plugin convert --to compressed-tensors`` writes them."""
    fmt = get_format(CT)
    v1 = {n: {leaf: getattr(q, leaf) for leaf in GPTQ_LEAVES} for n, q in layers.items()}
    ct_cfg = fmt.prepare(cfg, v1)
    tensors = {n: fmt.from_internal(t, ct_cfg, n) for n, t in v1.items()}
    keys = [f"{n}.{leaf}" for n, t in tensors.items() for leaf in t]
    return fmt.config_dict(ct_cfg, v1, keys), tensors


def test_config_and_method_override():
    qcfg, _ = _as_ct({}, QuantizeConfig(bits=3, group_size=64, desc_act=True, sym=False))
    cfg = adapter.GPTQPluginConfig.from_config(qcfg)
    assert cfg.checkpoint_format == CT
    assert (cfg.quant.bits, cfg.quant.group_size, cfg.quant.desc_act, cfg.quant.sym) == (3, 64, True, False)
    assert cfg.has_g_idx  # actorder "group" stores weight_g_idx
    over = adapter.GPTQPluginConfig.override_quantization_method
    assert over(qcfg, "gptq-plugin") == "gptq-plugin" and over(qcfg, None) is None  # plain serve: vLLM's own
    for bad, match in (({"format": "float-quantized"}, "only 'pack-quantized'"),
                       ({"config_groups": {"g": dict(qcfg["config_groups"]["group_0"],
                                                      input_activations={"num_bits": 8})}}, "weight-only")):
        with pytest.raises(CheckpointError, match=match):
            adapter.GPTQPluginConfig.from_config({**qcfg, **bad})


def _meta(k=96, n=64, bits=3, gs=32, sym=False, g_idx=True, **over):
    from gptq_plugin.packing import num_groups, packed_rows

    g, p = num_groups(k, gs), "model.layers.0.mlp.up_proj"
    m = {f"{p}.weight_packed": {"dtype": "I32", "shape": [n, packed_rows(k, bits)]},
         f"{p}.weight_scale": {"dtype": "F16", "shape": [n, g]},
         f"{p}.weight_shape": {"dtype": "I64", "shape": [2], "value": [n, k]}}
    if not sym:
        m[f"{p}.weight_zero_point"] = {"dtype": "I32", "shape": [packed_rows(n, bits), g]}
    if g_idx:
        m[f"{p}.weight_g_idx"] = {"dtype": "I32", "shape": [k]}
    m.update({f"{p}.{leaf}": v for leaf, v in over.items()})
    return {key: v for key, v in m.items() if v is not None}


def test_check_checkpoint_accepts_and_names_the_tensor():
    cfg = QuantizeConfig(bits=3, group_size=32, sym=False)
    info = adapter.check_checkpoint(_meta(), cfg, CT)
    assert info["modules"] == ["model.layers.0.mlp.up_proj"] and info["has_g_idx"]
    assert not adapter.check_checkpoint(_meta(g_idx=False), cfg, CT)["has_g_idx"]
    cases = [
        (_meta(), QuantizeConfig(bits=4, group_size=32, sym=False), r"up_proj\.weight_packed has shape \[64, 9\], "
                                                                    r"expected \[64, 12\].*num_bits=4"),
        (_meta(), QuantizeConfig(bits=3, group_size=64, sym=False), r"up_proj\.weight_scale has shape \[64, 3\], "
                                                                    r"expected \[64, 2\]"),
        (_meta(weight_scale=None), cfg, r"up_proj\.weight_scale is missing"),
        (_meta(), QuantizeConfig(bits=3, group_size=32, sym=True), r"weight_zero_point is stored .*symmetric: true"),
        (_meta(weight_zero_point=None), cfg, r"weight_zero_point is missing"),
        (_meta(weight_packed={"dtype": "I32", "shape": [64, 10]}), cfg, r"older packing.*--to compressed-tensors"),
        (_meta(weight_shape={"dtype": "I64", "shape": [2], "value": [63, 96]}), cfg, r"weight_shape holds \[63, 96\]"),
        ({**_meta(), "lm_head.weight_packed": {"dtype": "I32", "shape": [8, 9]}}, cfg, r"lm_head.*quantized lm_head"),
    ]
    for meta, c, match in cases:
        with pytest.raises(CheckpointError, match=match):
            adapter.check_checkpoint(meta, c, CT)


def test_maybe_update_config_reads_the_folder(tmp_path: Path):
    """Tensor headers and weight_shape values of a real folder; its modules decide which layers are quantized."""
    from safetensors.torch import save_file

    from gptq_plugin.linear import QuantLinear
    from gptq_plugin.packing import default_g_idx

    layer = QuantLinear(96, 64, 4, 32, sym=False)
    layer.g_idx.copy_(default_g_idx(96, 32))  # no act-order: no weight_g_idx
    qcfg, tensors = _as_ct({"model.layers.0.mlp.up_proj": layer}, QuantizeConfig(bits=4, group_size=32, sym=False))
    save_file({f"{n}.{leaf}": t.contiguous() for n, ts in tensors.items() for leaf, t in ts.items()},
              str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps({"quantization_config": qcfg}))
    cfg = adapter.GPTQPluginConfig.from_config(qcfg)
    cfg.maybe_update_config(str(tmp_path))
    assert cfg.quantized_modules == ["model.layers.0.mlp.up_proj"] and not cfg.has_g_idx
    assert adapter._safetensors_metadata(str(tmp_path))["model.layers.0.mlp.up_proj.weight_shape"]["value"] == [64, 96]


def test_ignore_list_without_tensor_metadata():
    qcfg, _ = _as_ct({}, QuantizeConfig())
    qcfg["ignore"] = ["lm_head", "re:.*mlp\\.gate$"]
    cfg = adapter.GPTQPluginConfig.from_config(qcfg)
    cfg.packed_modules_mapping = {"gate_up_proj": ["gate_proj", "up_proj"]}
    assert cfg._is_quantized("model.layers.0.mlp.gate_up_proj")
    assert not cfg._is_quantized("model.layers.0.mlp.gate")
    assert not cfg._is_quantized("lm_head")


def test_ignore_list_names_whole_modules():
    """``ignore`` entries are full module names (compressed-tensors' matching, through the core's handler): block 1
    and block 2's down_proj are ignored, block 10 and block 1's own linears are not; a fused layer is ignored only
    when all its projections are."""
    qcfg, _ = _as_ct({}, QuantizeConfig())
    qcfg["ignore"] = ["model.layers.1", "model.layers.2.mlp.down_proj", "model.layers.3.mlp.gate_proj",
                      "model.layers.3.mlp.up_proj"]
    cfg = adapter.GPTQPluginConfig.from_config(qcfg)
    cfg.packed_modules_mapping = {"gate_up_proj": ["gate_proj", "up_proj"]}
    assert cfg._is_quantized("model.layers.10.mlp.down_proj") and cfg._is_quantized("model.layers.1.mlp.down_proj")
    assert not cfg._is_quantized("model.layers.2.mlp.down_proj")
    assert not cfg._is_quantized("model.layers.3.mlp.gate_up_proj") and cfg._is_quantized("model.layers.2.mlp.gate_up_proj")


# --- vLLM's linear layers, GPTQ vs compressed-tensors tensors --------------------------------------------------
K, HEAD, HEADS, KV_HEADS, INTER, N_ROW = 320, 32, 4, 2, 192, 96


def _quantize(shapes: dict[str, tuple[int, int]], cfg: QuantizeConfig, seed: int) -> dict:
    """GPTQ layers ``name -> QuantLinear`` (``(in, out)`` each) on random inputs whose channels differ in scale;
    layers with the same ``in`` share the Hessian (as fused q/k/v and gate/up do), hence their act-order."""
    from gptq_plugin.linear import QuantLinear
    from gptq_plugin.solver import HessianAccumulator, gptq_quantize

    g = torch.Generator().manual_seed(seed)
    hessians, out = {}, {}
    for name, (k, n) in shapes.items():
        if k not in hessians:
            acc = HessianAccumulator(k)
            acc.add_batch(torch.randn(4 * k, k, generator=g) * torch.exp(torch.randn(k, generator=g)))
            hessians[k] = acc.finalize()
        res = gptq_quantize(torch.randn(n, k, generator=g) / k**0.5, hessians[k], cfg, name)
        out[name] = QuantLinear.from_result(res, cfg.group_size, None, cfg.sym)
    return out


def _build(kind: str, cfg, tensors: dict, names: list[str], rank: int, tp: int, monkeypatch):
    """A vLLM layer of ``kind`` for rank ``rank`` of ``tp``, loaded through its weight loaders the way a model's
    ``load_weights`` does (one call per checkpoint tensor, with the shard id of fused layers)."""
    import vllm.model_executor.layers.linear as linear

    monkeypatch.setattr(linear, "get_tensor_model_parallel_rank", lambda: rank)
    monkeypatch.setattr(linear, "get_tensor_model_parallel_world_size", lambda: tp)
    dtype = torch.float32
    if kind == "qkv":
        layer = linear.QKVParallelLinear(K, HEAD, HEADS, KV_HEADS, bias=False, params_dtype=dtype, quant_config=cfg,
                                         prefix="probe.qkv_proj")
        shard_ids = ["q", "k", "v"]
    elif kind == "gate_up":
        layer = linear.MergedColumnParallelLinear(K, [INTER, INTER], bias=False, params_dtype=dtype,
                                                  quant_config=cfg, prefix="probe.gate_up_proj")
        shard_ids = [0, 1]
    else:
        layer = linear.RowParallelLinear(K, N_ROW, bias=False, params_dtype=dtype, quant_config=cfg,
                                         prefix="probe.down_proj")
        shard_ids = [None]
    assert isinstance(layer.quant_method, adapter.GPTQPluginLinearMethod)
    for name, shard_id in zip(names, shard_ids):
        for leaf, t in tensors[name].items():
            param = getattr(layer, leaf)
            if shard_id is None:
                param.weight_loader(param, t)
            else:
                param.weight_loader(param, t, shard_id)
    layer.quant_method.process_weights_after_loading(layer)
    return layer


@pytest.mark.parametrize("tp", [1, 2])
@pytest.mark.parametrize("bits, gs, desc_act, sym", [
    (4, 32, True, False),   # act-order, asymmetric: weight_g_idx and weight_zero_point; row shards keep all groups
    (3, 64, False, False),  # 3-bit codes straddle words; 160 inputs per row shard cut a group of 64
    (3, 32, True, True),
    (8, -1, False, True),
])
def test_vllm_layers_load_compressed_tensors_like_gptq(vllm_tp1, monkeypatch, tp, bits, gs, desc_act, sym):
    cfg = QuantizeConfig(bits=bits, group_size=gs, desc_act=desc_act, sym=sym)
    groups = {"qkv": [("q", HEADS * HEAD), ("k", KV_HEADS * HEAD), ("v", KV_HEADS * HEAD)],
              "gate_up": [("gate", INTER), ("up", INTER)], "row": [("down", N_ROW)]}
    shapes = {name: (K, n) for parts in groups.values() for name, n in parts}
    layers = _quantize(shapes, cfg, seed=bits)
    gptq_cfg = adapter.GPTQPluginConfig.from_config(cfg.to_dict())
    ct_qcfg, ct_tensors = _as_ct(layers, cfg)
    ct_cfg = adapter.GPTQPluginConfig.from_config(ct_qcfg)
    assert ct_cfg.checkpoint_format == CT
    assert ("weight_zero_point" in ct_tensors["q"]) == (not sym)
    assert ("weight_g_idx" in ct_tensors["q"]) == desc_act
    gptq_tensors = {n: {leaf: getattr(q, leaf) for leaf in GPTQ_LEAVES} for n, q in layers.items()}
    x = torch.randn(3, K, generator=torch.Generator().manual_seed(5))
    for kind, parts in groups.items():
        names = [name for name, _ in parts]
        outs = []
        for rank in range(tp):
            xs = x[:, rank * K // tp:(rank + 1) * K // tp] if kind == "row" else x
            ys = []
            for qc, tensors in ((gptq_cfg, gptq_tensors), (ct_cfg, ct_tensors)):
                layer = _build(kind, qc, tensors, names, rank, tp, monkeypatch)
                ys.append(layer.quant_method.apply(layer, xs))
            assert not hasattr(layer, "weight_packed")  # converted: the checkpoint's parameters are released
            assert torch.equal(ys[0], ys[1]), f"{kind} rank {rank}/{tp}: compressed-tensors != gptq"
            outs.append(ys[1])
        with reference_kernel():
            refs = []
            for name in names:
                layers[name].prepare(torch.float32)
                refs.append(layers[name](x))
        if kind == "row":
            y, ref = sum(outs), refs[0]
        else:  # each rank holds its slice of every fused projection
            y = torch.cat(outs, dim=-1)
            ref = torch.cat([r[..., rank * r.shape[-1] // tp:(rank + 1) * r.shape[-1] // tp]
                             for rank in range(tp) for r in refs], dim=-1)
        torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()))


def test_three_bit_row_shard_off_word_boundary_is_refused(vllm_tp1, monkeypatch):
    """3-bit codes of 96 input channels over 4 ranks: 24 channels (72 bits) per rank do not end on a word: refused
    at start-up, naming the layer and the fix."""
    import vllm.model_executor.layers.linear as linear

    qcfg, _ = _as_ct({}, QuantizeConfig(bits=3, group_size=-1))
    monkeypatch.setattr(linear, "get_tensor_model_parallel_rank", lambda: 0)
    monkeypatch.setattr(linear, "get_tensor_model_parallel_world_size", lambda: 4)
    with pytest.raises(CheckpointError, match=r"probe\.down_proj\.weight_packed: 3-bit .*tensor-parallel size"):
        linear.RowParallelLinear(96, 64, bias=False, params_dtype=torch.float32,
                                 quant_config=adapter.GPTQPluginConfig.from_config(qcfg), prefix="probe.down_proj")
