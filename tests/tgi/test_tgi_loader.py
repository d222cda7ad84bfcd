"""The TGI loader on small GPTQ checkpoints, through a stand-in for TGI's ``Weights`` (no TGI needed).

Every loader method, tensor-parallel sizes 1 and 2, act-order on and off, 2/3/4/8 bits: the layers TGI would
build equal the core's :class:`QuantLinear` (whole layers exactly; shards after reassembling the ranks' outputs).
"""

from __future__ import annotations

import pytest
import torch

from gptq_plugin.adapters.tgi import GPTQPluginWeight, GPTQPluginWeightsLoader
from gptq_plugin.errors import CheckpointError, KernelError
from gptq_plugin.linear import QuantLinear

from tgi_standin import (
    ATTN, FUSED, HEAD_DIM, HEADS, HIDDEN, INTERMEDIATE, KV_HEADS, LAYERS, MLP, UNQUANTIZED, close, cols, inputs,
    loader_of, tgi_get_linear, tgi_load_col, tgi_load_multi, tgi_load_row,
)

WORLDS = [1, 2]


def test_get_weights_is_the_core_layer(checkpoint):
    loader = loader_of(checkpoint)
    weights = checkpoint.weights(loader)
    for name, (k, _, has_bias, _) in [*LAYERS.items(), *((f, (HIDDEN, 0, False, "h")) for f in FUSED)]:
        ref = checkpoint.refs[name]
        w = weights.get_weights(name)
        assert isinstance(w, GPTQPluginWeight)
        layer = tgi_get_linear(w, weights.get_tensor(f"{name}.bias") if has_bias else None)
        assert isinstance(layer, QuantLinear) and layer.kernel_name is not None
        x = inputs(k)
        assert torch.equal(layer(x), ref(x)), name
        assert layer.kernel_name == ref.kernel_name


@pytest.mark.parametrize("world", WORLDS)
def test_get_multi_weights_col_qkv(checkpoint, world):
    """``load_multi`` of q/k/v (Llama attention) and gate/up: each rank's slice of every layer, concatenated."""
    loader = loader_of(checkpoint)
    for prefixes, bias in (([f"{ATTN}.q_proj", f"{ATTN}.k_proj", f"{ATTN}.v_proj"], True),
                           ([f"{MLP}.gate_proj", f"{MLP}.up_proj"], False)):
        x = inputs(HIDDEN)
        expected = [checkpoint.refs[p](x) for p in prefixes]
        sizes = [e.shape[-1] for e in expected]
        full = torch.cat(expected, dim=-1)
        for rank in range(world):
            layer = tgi_load_multi(checkpoint.weights(loader, rank, world), prefixes, bias)
            if world == 1:
                assert torch.equal(layer(x), full)
            else:
                close(layer(x), cols(full, sizes, rank, world))


@pytest.mark.parametrize("world", WORLDS)
def test_get_weights_col(checkpoint, world):
    loader = loader_of(checkpoint)
    name = f"{ATTN}.k_proj"
    x = inputs(HIDDEN)
    full = checkpoint.refs[name](x)
    for rank in range(world):
        layer = tgi_load_col(checkpoint.weights(loader, rank, world), name, bias=True)
        close(layer(x), cols(full, [full.shape[-1]], rank, world))


@pytest.mark.parametrize("world", WORLDS)
def test_get_weights_col_packed(checkpoint, world):
    """Fused checkpoint tensors: QKV in head proportions, gate/up in two equal blocks."""
    loader = loader_of(checkpoint)
    x = inputs(HIDDEN)
    qkv = checkpoint.refs[f"{ATTN}.qkv_proj"](x)
    gate_up = checkpoint.refs[f"{MLP}.gate_up_proj"](x)
    for rank in range(world):
        weights = checkpoint.weights(loader, rank, world)
        w = weights.get_weights_col_packed_qkv(f"{ATTN}.qkv_proj", HEADS, KV_HEADS)
        close(tgi_get_linear(w, None)(x), cols(qkv, [HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM],
                                                  rank, world))
        w = weights.get_weights_col_packed_gate_up(f"{MLP}.gate_up_proj")
        close(tgi_get_linear(w, None)(x), cols(gate_up, [INTERMEDIATE, INTERMEDIATE], rank, world))


@pytest.mark.parametrize("world", WORLDS)
def test_get_weights_row(checkpoint, world):
    """Row-parallel o_proj and down_proj: the ranks' partial outputs (bias on rank 0) sum to the layer's."""
    loader = loader_of(checkpoint)
    for name, bias in ((f"{ATTN}.o_proj", False), (f"{MLP}.down_proj", True)):
        k = LAYERS[name][0]
        x = inputs(k)
        total = 0
        for rank in range(world):
            layer = tgi_load_row(checkpoint.weights(loader, rank, world), name, bias)
            total = total + layer(x[..., rank * k // world:(rank + 1) * k // world])
        if world == 1:
            assert torch.equal(total, checkpoint.refs[name](x))
        else:
            close(total, checkpoint.refs[name](x))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("world", WORLDS)
def test_half_precision_model(ckpts, dtype, world):
    """TGI runs GPTQ models in fp16 (bf16 on CPU with IPEX): scales keep the checkpoint's fp16 and the
    outputs match the core layer run in the same dtype."""
    ckpt = ckpts["3bit-g64-actorder"]
    loader = loader_of(ckpt)
    name = f"{MLP}.down_proj"
    x = inputs(INTERMEDIATE, dtype)
    total = 0
    for rank in range(world):
        weights = ckpt.weights(loader, rank, world, dtype=dtype)
        w = weights.get_weights_row(name)
        assert w.scales.dtype == torch.float16 and w.dtype == dtype
        layer = tgi_load_row(weights, name, bias=True)
        total = total + layer(x[..., rank * INTERMEDIATE // world:(rank + 1) * INTERMEDIATE // world]).float()
    ref = ckpt.refs[name](x).float()
    torch.testing.assert_close(total, ref, rtol=2e-2, atol=2e-2 * ref.abs().max().item())


def test_row_shard_sharding_choice(ckpts):
    """Groups in input order that fit whole in a shard: scales/qzeros are sharded and g_idx starts at 0 (TGI's
    layout); act-order or groups straddling shards: every rank keeps all groups and the absolute g_idx."""
    ordered = ckpts["4bit-g16"]
    w = ordered.weights(loader_of(ordered), 1, 2).get_weights_row(f"{ATTN}.o_proj")
    assert w.scales.shape[0] == HIDDEN // 16 // 2 and int(w.g_idx[0]) == 0
    straddle = ckpts["3bit-g64-asym"]  # 80 channels per shard, groups of 64
    w = straddle.weights(loader_of(straddle), 1, 2).get_weights_row(f"{ATTN}.o_proj")
    assert w.scales.shape[0] == 3 and int(w.g_idx[0]) == 1
    actorder = ckpts["4bit-g16-actorder-asym"]
    w = actorder.weights(loader_of(actorder), 1, 2).get_weights_row(f"{ATTN}.o_proj")
    assert w.scales.shape[0] == HIDDEN // 16


def test_modules_to_not_convert_load_unquantized(checkpoint):
    loader = loader_of(checkpoint)
    assert loader.modules_to_not_convert == ["skip_proj"]
    weights = checkpoint.weights(loader, 0, 2)
    full = weights.get_tensor(f"{UNQUANTIZED}.weight")
    assert torch.equal(weights.get_weights(UNQUANTIZED), full)
    assert torch.equal(weights.get_weights_col(UNQUANTIZED), full[: HIDDEN // 2])
    assert torch.equal(weights.get_weights_row(UNQUANTIZED), full[:, : HIDDEN // 2])
    assert torch.equal(weights.get_weights_col_packed(UNQUANTIZED, 2), torch.cat([full[:40], full[80:120]]))


def test_loader_exposes_tgi_attributes(checkpoint):
    loader = loader_of(checkpoint)
    c = checkpoint.config
    assert (loader.bits, loader.groupsize, loader.desc_act, loader.sym) == (c.bits, c.group_size, c.desc_act, c.sym)
    assert loader.quantize == "gptq" and loader.quant_method == "gptq"


def test_missing_qweight_names_the_layer(checkpoint):
    weights = checkpoint.weights(loader_of(checkpoint))
    with pytest.raises(CheckpointError, match=r"model\.layers\.0\.mlp\.nothing\.qweight is missing"):
        weights.get_weights_row(f"{MLP}.nothing")
    loader = GPTQPluginWeightsLoader(checkpoint.config)  # skip_proj not declared unquantized
    with pytest.raises(CheckpointError, match="modules_to_not_convert"):
        checkpoint.weights(loader).get_weights(UNQUANTIZED)


def test_uneven_tensor_parallel_split_is_an_error(checkpoint):
    weights = checkpoint.weights(loader_of(checkpoint), 0, 3)  # 160 channels over 3 shards
    with pytest.raises(CheckpointError, match="cannot be split evenly across 3"):
        weights.get_weights_row(f"{ATTN}.o_proj")
    with pytest.raises(CheckpointError, match="cannot be split evenly across 3"):
        weights.get_weights_col(f"{ATTN}.q_proj")


def test_corrupt_g_idx_is_an_error(ckpts, tmp_path):
    import dataclasses
    import shutil

    from safetensors.torch import load_file, save_file

    ckpt = dataclasses.replace(ckpts["4bit-g16"], path=tmp_path)
    name = f"{ATTN}.o_proj"
    for f in ckpts["4bit-g16"].files:
        t = load_file(str(f))
        if f"{name}.g_idx" in t:
            t[f"{name}.g_idx"][3] = 99
        save_file(t, str(tmp_path / f.name))
    shutil.copy(ckpts["4bit-g16"].path / "config.json", tmp_path / "config.json")
    with pytest.raises(CheckpointError, match=r"o_proj\.g_idx has values in \[0, 99\]"):
        ckpt.weights(loader_of(ckpt)).get_weights(name)


def test_get_linear_goes_through_the_kernel_registry(checkpoint, monkeypatch):
    w = checkpoint.weights(loader_of(checkpoint)).get_weights(f"{ATTN}.o_proj")
    monkeypatch.setenv("GPTQ_PLUGIN_KERNEL", "no-such-kernel")
    with pytest.raises(KernelError, match="no-such-kernel"):
        w.get_linear(None)
    monkeypatch.setenv("GPTQ_PLUGIN_KERNEL", "reference")
    assert w.get_linear(None).kernel_name == "reference"
