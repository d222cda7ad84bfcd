"""The model-level driver's two true-sequential passes (one pass in turn-taking threads; low memory, group by group)
must give identical quantized tensors, in fp32 and under bf16 autocast (autocast state is per thread: the one-pass
driver's batch threads must each enter it)."""

from __future__ import annotations

import pytest
import torch

from gptq_plugin.config import QuantizeConfig
from gptq_plugin.pipeline import quantize_model
from tests.tiny import tiny_llama

CALIB = torch.randint(0, 128, (6, 32), generator=torch.Generator().manual_seed(1))
CFG = QuantizeConfig(bits=4, group_size=32, desc_act=True, sym=False)


def _quantized(low_memory: bool, forward_dtype) -> dict[str, torch.Tensor]:
    model = tiny_llama(seed=3)
    quantize_model(model, CALIB, CFG, batch_size=2, progress=False, low_memory=low_memory,
                   forward_dtype=forward_dtype)
    return {k: v for k, v in model.state_dict().items() if k.endswith(("qweight", "qzeros", "scales", "g_idx"))}


@pytest.mark.parametrize("forward_dtype", [None, torch.bfloat16])
def test_one_pass_and_low_memory_drivers_agree(forward_dtype):
    a, b = _quantized(False, forward_dtype), _quantized(True, forward_dtype)
    assert a.keys() == b.keys() and len(a) == 2 * 7 * 4
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_parked_one_pass_gives_the_same_tensors_and_parks_the_waiting_batches_of_single_layer_groups(tmp_path,
                                                                                                 monkeypatch):
    """With ``park_dir``, every batch waiting at a one-layer group (o_proj, down_proj) has its input to the group in
    a file there (its memory freed) while the group is quantized; the normed inputs shared by q/k/v and gate/up stay
    in memory. The tensors are those of the pass without parking, and no file is left afterwards."""
    import gptq_plugin.blockquant as bq
    import gptq_plugin.passes as passes

    monkeypatch.setattr(passes, "PARK_MIN_BYTES", 1)  # the tiny model's activations are a few KB
    seen = []
    real = passes.sequential_pass

    def spy(block, groups, inputs, kwargs_list, quantize_group, *a, **k):
        def quantize(group, H, routed=None, halves=None):
            seen.append(len(list(tmp_path.glob("paused-activation-*.bin"))))
            return quantize_group(group, H, routed, halves=halves)
        return real(block, groups, inputs, kwargs_list, quantize, *a, **k)

    monkeypatch.setattr(bq, "sequential_pass", spy)
    model = tiny_llama(seed=3)
    quantize_model(model, CALIB, CFG, batch_size=2, progress=False, low_memory=False, park_dir=tmp_path)
    parked = {k: v for k, v in model.state_dict().items() if k.endswith(("qweight", "qzeros", "scales", "g_idx"))}
    # 2 blocks x groups q/k/v, o, gate/up, down; 6 sequences in 3 batches, each parked while it waits at o and down
    assert seen == [0, 3, 0, 3] * 2
    assert list(tmp_path.iterdir()) == []
    plain = _quantized(False, None)
    assert parked.keys() == plain.keys()
    assert all(torch.equal(parked[k], plain[k]) for k in plain)


def test_blocks_wait_in_the_source_folder_and_come_back(tmp_path):
    """With ``source`` (the folder the model was loaded from), blocks whose weights equal the folder's wait on
    ``meta`` until their turn and are read back; a block changed in memory stays in memory; every block has its
    fp32 weights back afterwards (``max_blocks`` leaves the last one unquantized), and the result is the same."""
    model = tiny_llama(seed=3, layers=3)
    model.save_pretrained(tmp_path / "src")
    with torch.no_grad():
        model.model.layers[2].mlp.up_proj.weight[0, 0] += 1  # no longer the file's
    originals = {k: v.clone() for k, v in model.model.layers[2].state_dict().items()}
    reference = tiny_llama(seed=3, layers=3)
    reference.load_state_dict(model.state_dict())
    devices = []

    def record(module, args, kwargs):
        if not devices and next(model.model.layers[0].parameters()).device.type == "cpu":  # its turn
            devices.extend(str(next(layer.parameters()).device) for layer in model.model.layers)
    handle = model.model.layers[0].register_forward_pre_hook(record, with_kwargs=True)
    quantize_model(model, CALIB, CFG, batch_size=2, progress=False, max_blocks=2, source=tmp_path / "src")
    handle.remove()
    quantize_model(reference, CALIB, CFG, batch_size=2, progress=False, max_blocks=2)
    assert devices == ["cpu", "meta", "cpu"]  # block 0 at its turn, block 1 waits on disk, block 2 differs
    mine, ref = model.state_dict(), reference.state_dict()
    assert mine.keys() == ref.keys()
    assert all(torch.equal(mine[k], ref[k]) and mine[k].dtype == ref[k].dtype for k in ref)
    assert all(torch.equal(model.model.layers[2].state_dict()[k], v) for k, v in originals.items())


def test_a_source_changed_during_the_run_is_one_clear_error(tmp_path):
    """A block waiting in the source folder is not read back from a file that changed since the run started."""
    import os

    from gptq_plugin.errors import CheckpointError

    model = tiny_llama(seed=3)
    model.save_pretrained(tmp_path / "src")
    weights = tmp_path / "src" / "model.safetensors"

    def touch(module, args, kwargs):
        os.utime(weights, ns=(0, 1))  # as a copy over it would
    model.model.layers[0].register_forward_pre_hook(touch, with_kwargs=True)
    with pytest.raises(CheckpointError, match="model.safetensors: the source model changed during the run"):
        quantize_model(model, CALIB, CFG, batch_size=2, progress=False, source=tmp_path / "src")


def test_bf16_forwards_are_applied():
    a, b = _quantized(False, None), _quantized(False, torch.bfloat16)
    assert any(not torch.equal(a[k], b[k]) for k in a)  # bf16 activations change some Hessians, so some codes


@pytest.mark.parametrize("bits,k,group_size,desc_act", [(2, 300, 64, False), (3, 1000, 128, True), (4, 96, 32, False),
                                                          (8, 4100, -1, True)])
def test_stand_in_forwards_with_the_solvers_dequantized_weight(bits, k, group_size, desc_act):
    """Low-memory passes drop a quantized layer's fp32 weight and forward through its packed form: the weight it
    rebuilds (in chunks of input channels) must be the solver's dequantized weight bit for bit, layout included,
    or the next layers' Hessians (and the one-pass / low-memory equality) would change."""
    from gptq_plugin.linear import QuantLinear
    from gptq_plugin.blockquant import _DequantizedLinear
    from gptq_plugin.solver import gptq_quantize

    g = torch.Generator().manual_seed(bits)
    W, X = torch.randn(40, k, generator=g), torch.randn(300, k, generator=g)
    cfg = QuantizeConfig(bits=bits, group_size=group_size, desc_act=desc_act, sym=False)
    res = gptq_quantize(W, 2 * X.t() @ X / 300, cfg)
    bias = torch.randn(40, generator=g)
    layer = _DequantizedLinear(QuantLinear.from_result(res, group_size, bias, sym=False), bias, torch.float32)
    Q = res.dequantize()
    assert torch.equal(layer.weight, Q) and layer.weight.stride() == Q.stride()
    assert torch.equal(layer(X[:5]), torch.nn.functional.linear(X[:5], Q, bias))


def test_low_memory_pass_drops_the_fp32_weights_of_quantized_layers(monkeypatch):
    """While a layer group is quantized in a low-memory pass, the groups before it hold no fp32 weight."""
    from gptq_plugin import blockquant

    held = {}
    real = blockquant._solve_layer

    def spy(name, mod, H, cfg, block_name, compare_rtn, *rest):
        if block_name.endswith(".0"):
            block = model.model.layers[0]
            held[name] = sorted(n for n, m in block.named_modules() if isinstance(m, torch.nn.Linear)
                                and m.weight is not None)
        return real(name, mod, H, cfg, block_name, compare_rtn, *rest)

    monkeypatch.setattr(blockquant, "_solve_layer", spy)
    model = tiny_llama(seed=3)
    quantize_model(model, CALIB, CFG, batch_size=2, progress=False, low_memory=True, max_blocks=1)
    assert held["mlp.down_proj"] == ["mlp.down_proj"]
    assert held["self_attn.o_proj"] == ["mlp.down_proj", "mlp.gate_proj", "mlp.up_proj", "self_attn.o_proj"]


@pytest.mark.parametrize("static_groups", [False, True])
def test_error_report_by_row_blocks_matches_the_whole_matrix_formula(static_groups):
    from gptq_plugin.blockquant import _rel_errs
    from gptq_plugin.solver import gptq_quantize, rtn_quantize

    g = torch.Generator().manual_seed(7)
    W, X = torch.randn(50, 64, generator=g), torch.randn(200, 64, generator=g)
    H = 2 * X.t() @ X / 200
    cfg = QuantizeConfig(bits=3, group_size=16, desc_act=True, static_groups=static_groups, mse=2.4)
    res = gptq_quantize(W, H, cfg)
    grid = (res.scales, res.zeros) if static_groups else None

    def rel(Q):
        D = W - Q
        return float(torch.einsum("ij,jk,ik->", D, H, D) / torch.einsum("ij,jk,ik->", W, H, W))

    want = rel(res.dequantize()), rel(rtn_quantize(W, cfg, grid).dequantize())
    got = _rel_errs(W, H, res, cfg, grid, chunk_bytes=4 * 64 * 7)  # 7 rows per block
    assert got == pytest.approx(want, rel=1e-4)
    assert want[0] < want[1]


class _AliasedBlock(torch.nn.Module):
    """One nn.Linear registered under two names, and a forward that reads ``.weight.dtype`` (as DeepSeek-V3.2's
    and GLM-5's indexers do)."""

    def __init__(self):
        super().__init__()
        self.a, self.c = torch.nn.Linear(32, 32), torch.nn.Linear(32, 32)
        self.b = self.a

    def forward(self, x):
        return self.b(self.c(self.a(x.to(self.c.weight.dtype))))


@pytest.mark.parametrize("true_sequential", [True, False])
def test_stand_ins_replace_every_alias_and_read_like_linear(true_sequential):
    from gptq_plugin.blockquant import QuantizeReport, quantize_block

    def run(low_memory):
        torch.manual_seed(0)
        block = _AliasedBlock()
        g = torch.Generator().manual_seed(1)
        inputs = [torch.randn(2, 8, 32, generator=g) for _ in range(3)]
        cfg = QuantizeConfig(bits=3, group_size=16, desc_act=True, sym=False, true_sequential=true_sequential)
        packed = quantize_block(block, "blk", inputs, [{}] * 3, cfg, QuantizeReport(), low_memory)
        assert block.a is block.b is packed["a"]  # both names end on the packed layer
        return packed, inputs

    (p1, y1), (p2, y2) = run(False), run(True)
    for name in p1:
        for t in ("qweight", "qzeros", "scales", "g_idx"):
            assert torch.equal(getattr(p1[name], t), getattr(p2[name], t)), (name, t)
    assert all(torch.equal(a, b) for a, b in zip(y1, y2))


def test_resumed_blocks_without_the_rtn_comparison_are_reported(tmp_path, caplog):
    """A run interrupted without the RTN comparison and resumed with it (``--report``) says which rows lack it."""
    from gptq_plugin.resume import ResumeState

    cfg = QuantizeConfig(bits=4, group_size=32)
    calib = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(0))
    fp = {"config": cfg.to_dict(), "test": "rtn-comparison"}
    first = quantize_model(tiny_llama(seed=3), calib, cfg, batch_size=2, progress=False, max_blocks=1,
                           resume=ResumeState.open(tmp_path / "q", fp))
    assert all(l.rtn_rel_err is None for l in first.layers)
    with caplog.at_level("WARNING", logger="gptq_plugin.driver"):
        report = quantize_model(tiny_llama(seed=3), calib, cfg, batch_size=2, progress=False,
                                resume=ResumeState.open(tmp_path / "q", fp), compare_rtn=True)
    restored = len(first.layers)
    assert all(l.rtn_rel_err is None for l in report.layers[:restored])
    assert all(l.rtn_rel_err is not None for l in report.layers[restored:])
    assert f"{restored} layers of the 1 blocks restored" in caplog.text and "--restart" in caplog.text
