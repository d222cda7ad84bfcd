"""compressed-tensors ``pack-quantized`` checkpoints through the TGI loader (stand-in ``Weights``, no TGI needed).

Each checkpoint of ``CASES`` below is converted with ``gptq-plugin convert --to compressed-tensors``; every loader
method, at tensor-parallel sizes 1 and 2, must then hand TGI exactly the layer it hands for the GPTQ original (the
same GPTQ-layout tensors, hence the same kernel and outputs), and whole layers must equal the core's reference.
"""

from __future__ import annotations

import dataclasses
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from gptq_plugin.adapters.tgi import GPTQPluginWeight, GPTQPluginWeightsLoader
from gptq_plugin.errors import CheckpointError
from gptq_plugin.plugins import get_format

from test_tgi_route import fake_tgi  # noqa: F401  (the stand-in TGI modules, a fixture)
from tgi_standin import (ATTN, FUSED, HEADS, INTERMEDIATE, KV_HEADS, LAYERS, MLP, UNQUANTIZED, close, inputs, loader_of,
                         tgi_get_linear, tgi_load_row)

CASES = ["4bit-g16-actorder-asym", "3bit-g64-actorder", "3bit-g64-asym", "2bit-gall-v2", "4bit-g16"]
WORLDS = [1, 2]
QKV = [f"{ATTN}.q_proj", f"{ATTN}.k_proj", f"{ATTN}.v_proj"]
GATE_UP = [f"{MLP}.gate_proj", f"{MLP}.up_proj"]


@pytest.fixture(scope="module", params=CASES)
def pair(request, ckpts, tmp_path_factory):
    """``(gptq, compressed-tensors)`` :class:`Checkpoint` s of the same layers."""
    from gptq_plugin.convert import convert_checkpoint

    gptq = ckpts[request.param]
    out = tmp_path_factory.mktemp(f"ct-{request.param}") / "ct"
    convert_checkpoint(gptq.path, out, "compressed-tensors")
    return gptq, dataclasses.replace(gptq, path=out)


def _tensors(w: GPTQPluginWeight) -> dict[str, torch.Tensor]:
    return {"qweight": w.qweight, "qzeros": w.qzeros, "scales": w.scales, "g_idx": w.g_idx}


def _same(a: GPTQPluginWeight, b: GPTQPluginWeight, what: str) -> None:
    assert isinstance(b, GPTQPluginWeight), what
    for key, t in _tensors(a).items():
        u = _tensors(b)[key]
        assert t.dtype == u.dtype and torch.equal(t, u), f"{what}: {key}"
    assert (a.bits, a.group_size, a.sym) == (b.bits, b.group_size, b.sym)


def test_loader_reads_the_compressed_tensors_config(pair):
    gptq, ct = pair
    d = json.loads((ct.path / "config.json").read_text())["quantization_config"]
    assert d["quant_method"] == "compressed-tensors"
    loader = loader_of(ct)
    assert loader.checkpoint_format == "compressed-tensors"
    assert f"{MLP}.skip_proj" in loader.modules_to_not_convert  # the writer's ignore list
    c = gptq.config
    assert (loader.bits, loader.groupsize, loader.desc_act, loader.sym) == (c.bits, c.group_size, c.desc_act, c.sym)


@pytest.mark.parametrize("world", WORLDS)
def test_every_loader_method_gives_the_gptq_layer(pair, world):
    gptq, ct = pair
    lg, lc = loader_of(gptq), loader_of(ct)
    for rank in range(world):
        wg, wc = gptq.weights(lg, rank, world), ct.weights(lc, rank, world)
        where = f"rank {rank}/{world}"
        for name in [*LAYERS, *FUSED]:
            _same(wg.get_weights(name), wc.get_weights(name), f"get_weights({name}) {where}")
        for prefixes in (QKV, GATE_UP):
            _same(wg.get_multi_weights_col(prefixes, 0), wc.get_multi_weights_col(prefixes, 0),
                  f"get_multi_weights_col({prefixes}) {where}")
        _same(wg.get_weights_col(f"{ATTN}.k_proj"), wc.get_weights_col(f"{ATTN}.k_proj"), f"get_weights_col {where}")
        _same(wg.get_weights_col_packed_qkv(f"{ATTN}.qkv_proj", HEADS, KV_HEADS),
              wc.get_weights_col_packed_qkv(f"{ATTN}.qkv_proj", HEADS, KV_HEADS), f"col_packed qkv {where}")
        _same(wg.get_weights_col_packed_gate_up(f"{MLP}.gate_up_proj"),
              wc.get_weights_col_packed_gate_up(f"{MLP}.gate_up_proj"), f"col_packed gate_up {where}")
        for name in (f"{ATTN}.o_proj", f"{MLP}.down_proj"):
            _same(wg.get_weights_row(name), wc.get_weights_row(name), f"get_weights_row({name}) {where}")


def test_whole_layers_equal_the_core_reference(pair):
    _, ct = pair
    weights = ct.weights(loader_of(ct))
    for name, (k, _, has_bias, _) in LAYERS.items():
        layer = tgi_get_linear(weights.get_weights(name), weights.get_tensor(f"{name}.bias") if has_bias else None)
        x = inputs(k)
        assert torch.equal(layer(x), ct.refs[name](x)), name
    full = weights.get_tensor(f"{UNQUANTIZED}.weight")
    assert torch.equal(weights.get_weights_row(UNQUANTIZED), full)  # ignored: a plain tensor, as TGI expects


def _copy(ct, dst, weights: dict | None = None, drop: str | None = None):
    shutil.copytree(ct.path, dst)
    if weights:
        d = json.loads((dst / "config.json").read_text())
        d["quantization_config"]["config_groups"]["group_0"]["weights"].update(weights)
        (dst / "config.json").write_text(json.dumps(d))
    if drop:
        for f in dst.glob("*.safetensors"):
            state = load_file(str(f))
            if drop in state:
                del state[drop]
                save_file(state, str(f), metadata={"format": "pt"})
    return dataclasses.replace(ct, path=dst)


def test_mismatched_checkpoint_names_the_tensor(pair, tmp_path):
    _, ct = pair
    bits = 8 if ct.config.bits != 8 else 4
    wrong = _copy(ct, tmp_path / "bits", {"num_bits": bits})
    with pytest.raises(CheckpointError, match=rf"o_proj\.weight_packed has shape .*num_bits={bits}"):
        wrong.weights(loader_of(wrong)).get_weights_row(f"{ATTN}.o_proj")
    missing = _copy(ct, tmp_path / "missing", drop=f"{MLP}.up_proj.weight_packed")
    with pytest.raises(CheckpointError, match=r"up_proj\.weight_packed is missing"):
        missing.weights(loader_of(missing)).get_multi_weights_col(GATE_UP, 0)


def test_route_takes_compressed_tensors_checkpoints(fake_tgi, pair):
    """``--quantize gptq`` on a compressed-tensors checkpoint: the plugin's loader (``--quantize compressed-tensors``
    stays with TGI's own loader)."""
    from gptq_plugin.adapters import tgi_launcher

    _, ct = pair
    fake = fake_tgi()
    tgi_launcher.install()
    loader = fake.quantization.get_loader("gptq", str(ct.path), None)
    assert isinstance(loader, GPTQPluginWeightsLoader) and loader.checkpoint_format == "compressed-tensors"
    own = fake.quantization.get_loader("compressed-tensors", str(ct.path), None)
    assert own == ("tgi's own loader", "compressed-tensors")
    tgi_launcher.uninstall()


def test_ignore_entries_name_whole_modules():
    """The compressed-tensors handler matches ``ignore`` as compressed-tensors does: a full module name or a
    ``re:`` pattern, never a part of a name; a fused layer is ignored when every one of its modules is."""
    ct = get_format("compressed-tensors")
    ignore = ["lm_head", "model.layers.1", "model.layers.2.mlp.down_proj", r"re:.*\.mlp\.gate$"]
    assert ct.is_ignored(ignore, "lm_head") and ct.is_ignored(ignore, "model.layers.2.mlp.down_proj")
    assert ct.is_ignored(ignore, "model.layers.7.mlp.gate")
    assert not ct.is_ignored(ignore, "model.layers.10.mlp.down_proj")  # not a prefix match of "model.layers.1"
    assert not ct.is_ignored(ignore, "model.layers.1.mlp.down_proj")  # a block's name does not ignore its linears
    assert not ct.is_ignored(ignore, "model.layers.12.mlp.down_proj")  # nor does another block's linear
    assert not ct.is_ignored(ignore, "model.lm_head") and not ct.is_ignored([], "lm_head")
    qkv = [f"model.layers.2.self_attn.{p}_proj" for p in "qkv"]
    assert not ct.is_ignored(qkv[:2], "model.layers.2.self_attn.qkv_proj", qkv)
    assert ct.is_ignored(qkv, "model.layers.2.self_attn.qkv_proj", qkv)


def test_ignoring_layer_1_keeps_layer_10_quantized(ckpts, tmp_path):
    """``ignore: ["model.layers.1", "model.layers.1.mlp.down_proj"]`` names block 1 and its down_proj only: block
    10's down_proj is quantized and loads as such (a substring match took it for an ignored, unquantized layer)."""
    from gptq_plugin.convert import convert_checkpoint

    gptq = ckpts["4bit-g16"]
    src = tmp_path / "ct"
    convert_checkpoint(gptq.path, src, "compressed-tensors")
    dst = tmp_path / "layer10"
    dst.mkdir()
    for f in src.glob("*.safetensors"):  # the same tensors, as block 10
        save_file({k.replace("layers.0.", "layers.10."): v for k, v in load_file(str(f)).items()}, str(dst / f.name),
                  metadata={"format": "pt"})
    d = json.loads((src / "config.json").read_text())
    d["quantization_config"]["ignore"] = ["lm_head", "model.layers.1", "model.layers.1.mlp.down_proj"]
    (dst / "config.json").write_text(json.dumps(d))
    ct = dataclasses.replace(gptq, path=dst)
    name = "model.layers.10.mlp.down_proj"
    for world in (1, 2):
        total = 0
        for rank in range(world):
            weights = ct.weights(loader_of(ct), rank, world)
            assert isinstance(weights.get_weights_row(name), GPTQPluginWeight)
            x = inputs(INTERMEDIATE)[..., rank * INTERMEDIATE // world:(rank + 1) * INTERMEDIATE // world]
            total = total + tgi_load_row(weights, name, bias=True)(x)
        close(total, gptq.refs[f"{MLP}.down_proj"](inputs(INTERMEDIATE)))
