"""The TGI loader on GPTQ checkpoints of the demo model (SmolLM2-135M-Instruct), through the stand-in for TGI's
``Weights``: 4-bit, and 3-bit act-order; tensor-parallel sizes 1 and 2.

Layers are loaded the way TGI's Llama model loads them (``load_multi`` of q/k/v and of gate/up, row-parallel
o_proj and down_proj; ``get_weights``; ``load_qkv``/``load_gate_up`` on fused copies of q/k/v and gate/up) and
compared with the core's ``QuantLinear`` from ``load_quantized``; then every linear of the core model is replaced
by the layers TGI would build, and the logits compared.

By default the checkpoints are the demo model cut to its first decoder block, quantized by the core pipeline
(what ``gptq-plugin quantize`` runs) through the shared ``demo_ckpt_factory``; set
``GPTQ_PLUGIN_TGI_DEMO_CHECKPOINTS=dir1:dir2`` to run the same tests on existing checkpoints (the whole model).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from gptq_plugin.config import QuantizeConfig
from gptq_plugin.linear import QuantLinear

from tgi_standin import (
    StandInProcessGroup, demo_checkpoint_names, StandInWeights, close, cols, loader_of, tgi_load_col,
    tgi_load_multi, tgi_load_row,
)

pytestmark = pytest.mark.integration

COLUMN = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")
ROW = ("o_proj", "down_proj")


def pytest_generate_tests(metafunc):
    if "demo" in metafunc.fixturenames:
        metafunc.parametrize("demo", demo_checkpoint_names(), indirect=True, scope="module")


@pytest.fixture(scope="module")
def demo(request, demo_checkpoints):
    """(checkpoint folder, the core model loaded from it)."""
    from gptq_plugin.checkpoint import load_quantized

    path = demo_checkpoints[request.param]
    return path, load_quantized(path)


def weights_for(path, rank: int, world: int) -> StandInWeights:
    return StandInWeights(sorted(path.glob("*.safetensors")), torch.device("cpu"), torch.float32,
                          StandInProcessGroup(rank, world), loader_of(path))


def test_checkpoint_is_what_the_test_expects(demo):
    path, model = demo
    layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
    cfg = QuantizeConfig.from_pretrained(path)
    assert layers and {m.bits for m in layers} == {cfg.bits}
    if cfg.desc_act and not cfg.static_groups:  # act-order permutes every layer's groups
        assert all(m.desc_act for m in layers)


@pytest.mark.parametrize("world", [1, 2])
def test_llama_layers_equal_the_core(demo, world):
    path, model = demo
    x = torch.randn(2, 7, model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    last = len(model.model.layers) - 1
    for i, block in [(0, model.model.layers[0]), (last, model.model.layers[last])][: 1 if last == 0 else 2]:
        prefix = f"model.layers.{i}"
        attn, mlp = block.self_attn, block.mlp
        qkv = [attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)]
        gate_up = [mlp.gate_proj(x), mlp.up_proj(x)]
        xo = torch.randn(2, 7, attn.o_proj.in_features, generator=torch.Generator().manual_seed(1))
        xd = torch.randn(2, 7, mlp.down_proj.in_features, generator=torch.Generator().manual_seed(2))
        o = d = 0
        for rank in range(world):
            w = weights_for(path, rank, world)
            layer = tgi_load_multi(w, [f"{prefix}.self_attn.{p}_proj" for p in "qkv"], bias=False)
            close(layer(x), cols(torch.cat(qkv, -1), [t.shape[-1] for t in qkv], rank, world))
            layer = tgi_load_multi(w, [f"{prefix}.mlp.gate_proj", f"{prefix}.mlp.up_proj"], bias=False)
            close(layer(x), cols(torch.cat(gate_up, -1), [t.shape[-1] for t in gate_up], rank, world))
            ko, kd = xo.shape[-1] // world, xd.shape[-1] // world
            o = o + tgi_load_row(w, f"{prefix}.self_attn.o_proj", bias=False)(xo[..., rank * ko:(rank + 1) * ko])
            d = d + tgi_load_row(w, f"{prefix}.mlp.down_proj", bias=False)(xd[..., rank * kd:(rank + 1) * kd])
        close(o, attn.o_proj(xo))
        close(d, mlp.down_proj(xd))


def test_get_weights_is_the_core_layer(demo):
    path, model = demo
    w = weights_for(path, 0, 1)
    last = f"model.layers.{len(model.model.layers) - 1}."
    for name, ref in model.named_modules():
        if isinstance(ref, QuantLinear) and name.startswith(last):
            layer = w.get_weights(name).get_linear(None)
            x = torch.randn(3, ref.in_features, generator=torch.Generator().manual_seed(3))
            assert torch.equal(layer(x), ref(x)), name
            assert layer.kernel_name == ref.kernel_name


class _Column(nn.Module):
    """A column-parallel layer's ranks, their outputs gathered (TGI gathers or keeps them sharded)."""

    def __init__(self, ranks):
        super().__init__()
        self.ranks = nn.ModuleList(ranks)

    def forward(self, x):
        return torch.cat([r(x) for r in self.ranks], dim=-1)


class _Row(nn.Module):
    """A row-parallel layer's ranks, each on its slice of the input, their outputs summed (TGI's all-reduce)."""

    def __init__(self, ranks):
        super().__init__()
        self.ranks = nn.ModuleList(ranks)

    def forward(self, x):
        k = x.shape[-1] // len(self.ranks)
        return sum(r(x[..., i * k:(i + 1) * k]) for i, r in enumerate(self.ranks))


def test_model_through_the_tgi_route_equals_the_core(demo):
    """Every quantized linear of the core model replaced by the layers TGI's loader builds for 1 and 2 ranks:
    the same logits (exactly for one rank)."""
    import copy

    path, core = demo
    ids = torch.tensor([[1, 504, 3458, 282, 4649, 314]])  # any ids; the tokenizer is not needed
    with torch.no_grad():
        expected = core(ids).logits
    for world in (1, 2):
        routed = copy.deepcopy(core)
        ranks = [weights_for(path, r, world) for r in range(world)]
        for name in [n for n, m in routed.named_modules() if isinstance(m, QuantLinear)]:
            parent, _, child = name.rpartition(".")
            if child in ROW:
                new = _Row([tgi_load_row(w, name, bias=False) for w in ranks])
            else:
                assert child in COLUMN, name
                new = _Column([tgi_load_col(w, name, bias=False) for w in ranks])
            setattr(routed.get_submodule(parent), child, new)
        with torch.no_grad():
            actual = routed(ids).logits
        if world == 1:
            assert torch.equal(actual, expected)
        else:
            torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())


@pytest.mark.parametrize("world", [1, 2])
def test_fused_qkv_and_gate_up_equal_the_core(demo, world, tmp_path):
    """``get_weights_col_packed`` (TGI's ``load_qkv`` / ``load_gate_up``) on fused tensors made from the demo
    checkpoint's q/k/v and gate/up as Phi-3-style checkpoints store them (layers sharing an input, stacked along
    outputs; their g_idx are equal), in head proportions 9:3:3 and in two equal blocks."""
    from safetensors.torch import save_file

    from gptq_plugin.packing import pack_qzeros, unpack_qzeros

    path, model = demo
    cfg = QuantizeConfig.from_pretrained(path)
    i = len(model.model.layers) - 1
    attn, mlp = model.model.layers[i].self_attn, model.model.layers[i].mlp
    fused = {}
    for name, parts in ((f"model.layers.{i}.self_attn.qkv_proj", [attn.q_proj, attn.k_proj, attn.v_proj]),
                        (f"model.layers.{i}.mlp.gate_up_proj", [mlp.gate_proj, mlp.up_proj])):
        assert all(torch.equal(p.g_idx, parts[0].g_idx) for p in parts)
        fused[f"{name}.qweight"] = torch.cat([p.qweight for p in parts], dim=1)
        fused[f"{name}.scales"] = torch.cat([p.scales for p in parts], dim=1)
        zeros = torch.cat([unpack_qzeros(p.qzeros, cfg.bits, p.out_features) for p in parts], dim=1)  # core: v1
        fused[f"{name}.qzeros"] = pack_qzeros(zeros, cfg.bits, cfg.checkpoint_format)
        fused[f"{name}.g_idx"] = parts[0].g_idx.clone()
    save_file(fused, str(tmp_path / "fused.safetensors"))
    heads, kv_heads = model.config.num_attention_heads, model.config.num_key_value_heads
    x = torch.randn(2, 5, model.config.hidden_size, generator=torch.Generator().manual_seed(4))
    qkv = [attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)]
    gate_up = [mlp.gate_proj(x), mlp.up_proj(x)]
    for rank in range(world):
        w = StandInWeights([tmp_path / "fused.safetensors"], torch.device("cpu"), torch.float32,
                           StandInProcessGroup(rank, world), loader_of(path))
        layer = w.get_weights_col_packed_qkv(f"model.layers.{i}.self_attn.qkv_proj", heads, kv_heads).get_linear(None)
        close(layer(x), cols(torch.cat(qkv, -1), [t.shape[-1] for t in qkv], rank, world))
        layer = w.get_weights_col_packed_gate_up(f"model.layers.{i}.mlp.gate_up_proj").get_linear(None)
        close(layer(x), cols(torch.cat(gate_up, -1), [t.shape[-1] for t in gate_up], rank, world))
