"""The GPTQ solver against an independent, straightforward implementation of the paper's recurrences."""

import dataclasses
import logging

import pytest
import torch

from gptq_plugin.config import QuantizeConfig
from gptq_plugin.errors import NumericalError
from gptq_plugin.solver import GRAM_TILE, HessianAccumulator, gptq_quantize, gram_matrix, rtn_quantize


def correlated_inputs(n, k, seed=0):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(k, k, generator=g) * 0.3 + torch.eye(k)
    scale = torch.rand(k, generator=g) * 3 + 0.1  # uneven channel magnitudes (act-order matters)
    return (torch.randn(n, k, generator=g) @ mix) * scale


def gar_reference_order(diag, gs):
    """Group-aware reordering written out with Python lists: rank the full groups by their largest diagonal
    entry (ties: lower group first), list each group's channels by decreasing diagonal (ties: lower channel
    first), then the partial last group's channels the same way."""
    d = diag.tolist()
    k = len(d)
    full = k // gs
    ranked = sorted(range(full), key=lambda g: (-max(d[g * gs:(g + 1) * gs]), g))
    out = []
    for g in ranked + ([full] if full * gs < k else []):
        members = range(g * gs, min((g + 1) * gs, k))
        out += sorted(members, key=lambda c: (-d[c], c))
    return torch.tensor(out)


def reference_order(diag, cfg, gs):
    """The order the columns are quantized in: act-order, group-aware reordering, or input order."""
    if cfg.desc_act:
        return torch.argsort(diag, descending=True, stable=True)
    if cfg.act_group_aware:
        return gar_reference_order(diag, gs)
    return torch.arange(diag.numel())


def minmax_grid(w, cfg):
    """The min-max grid of the rows of ``w`` ``[out, cols]`` (float64): scale (rounded to fp16) and zero point."""
    maxq = 2**cfg.bits - 1
    xmin = w.min(1).values.clamp(max=0)
    xmax = w.max(1).values.clamp(min=0)
    if cfg.sym:
        xmax = torch.maximum(xmin.abs(), xmax)
        xmin = torch.where(xmin < 0, -xmax, xmin)
    both0 = (xmin == 0) & (xmax == 0)
    xmin[both0], xmax[both0] = -1, 1
    s = ((xmax - xmin) / maxq).half().double()
    z = torch.full_like(s, (maxq + 1) / 2) if cfg.sym else torch.round(-xmin / s).clamp(0, maxq)
    return s, z


def obs_reference(W, H, cfg):
    """Optimal Brain Surgeon recurrences of GPTQ without Cholesky, blocking or lazy updates (float64):
    quantize columns in order; after each, spread its error over the remaining columns with the inverse
    Hessian and remove the column from the inverse (paper, eqs. 2-3). Group grids are taken from the updated
    weights when the group's first column is reached, or from the original weights for static groups."""
    W = W.double().clone()
    H = H.double().clone()
    k = W.shape[1]
    maxq = 2**cfg.bits - 1
    gs = k if cfg.group_size == -1 else cfg.group_size
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    order = reference_order(torch.diag(H), cfg, gs)

    static = ([minmax_grid(W[:, g * gs:(g + 1) * gs], cfg) for g in range((k + gs - 1) // gs)]
              if cfg.static_groups else None)
    Hd = H + torch.eye(k, dtype=H.dtype) * cfg.damp_percent * torch.mean(torch.diag(H))
    Hinv = torch.linalg.inv(Hd)
    Q = torch.zeros_like(W)
    remaining = list(order.tolist())
    s = z = None
    for pos, j in enumerate(order.tolist()):
        if static is not None:
            s, z = static[j // gs]
        elif pos % gs == 0:
            cols = order[pos:pos + gs]
            s, z = minmax_grid(W[:, cols], cfg)
        w = W[:, j]
        q = torch.clamp(torch.round(w / s) + z, 0, maxq)
        Q[:, j] = s * (q - z)
        remaining.remove(j)
        err = (w - Q[:, j]) / Hinv[j, j]
        if remaining:
            r = torch.tensor(remaining)
            W[:, r] -= err[:, None] * Hinv[j, r][None, :]
        Hinv = Hinv - Hinv[:, j:j + 1] @ Hinv[j:j + 1, :] / Hinv[j, j]
    return Q


CASES = [
    dict(bits=4, group_size=32),
    dict(bits=4, group_size=-1),
    dict(bits=3, group_size=24, sym=False),
    dict(bits=2, group_size=40),  # 40 does not divide 96: partial last group
    dict(bits=8, group_size=32),
    dict(bits=4, group_size=32, desc_act=True),
    dict(bits=4, group_size=32, desc_act=True, static_groups=True),
    dict(bits=3, group_size=-1, desc_act=True),
    dict(bits=4, group_size=32, act_group_aware=True),
    dict(bits=3, group_size=40, sym=False, act_group_aware=True),  # partial last group, asymmetric
    dict(bits=4, group_size=24, act_group_aware=True, static_groups=True),
]


@pytest.mark.parametrize("kw", CASES, ids=lambda kw: "-".join(f"{k}={v}" for k, v in kw.items()))
def test_matches_independent_obs_recurrences(kw):
    k, n = 96, 40
    X = correlated_inputs(2048, k)
    W = torch.randn(n, k, generator=torch.Generator().manual_seed(1)) * 0.1
    acc = HessianAccumulator(k)
    acc.add_batch(X[:1000])
    acc.add_batch(X[1000:])
    H = acc.finalize()
    assert torch.allclose(H, 2 * X.t() @ X / X.shape[0], rtol=1e-4, atol=1e-4)
    cfg = QuantizeConfig(block_size=32, **kw)  # blocks smaller than the matrix: exercises lazy updates
    res = gptq_quantize(W, H, cfg)
    ref = obs_reference(W, H, cfg).float()
    Q = res.dequantize()
    same = (Q - ref).abs() <= 1e-4 * ref.abs().max()
    assert same.float().mean() > 0.995, f"only {same.float().mean():.4f} of weights agree with the OBS recurrences"
    err_ours = ((X @ (W - Q).t()) ** 2).mean()
    err_ref = ((X @ (W - ref).t()) ** 2).mean()
    assert abs(err_ours - err_ref) / err_ref < 0.02


@pytest.mark.parametrize("kw", CASES, ids=lambda kw: "-".join(f"{k}={v}" for k, v in kw.items()))
def test_gptq_output_error_below_rtn(kw):
    k, n = 128, 64
    X = correlated_inputs(4096, k, seed=3)
    W = torch.randn(n, k, generator=torch.Generator().manual_seed(4)) * 0.1
    H = 2 * X.t() @ X / X.shape[0]
    cfg = QuantizeConfig(**kw)
    gptq = gptq_quantize(W, H, cfg).dequantize()
    rtn = rtn_quantize(W, cfg).dequantize()
    e_gptq = torch.linalg.norm(X @ (W - gptq).t())
    e_rtn = torch.linalg.norm(X @ (W - rtn).t())
    # 2-bit min-max grids are so coarse that the gain is small; elsewhere GPTQ removes >10% of the error
    assert e_gptq < (0.99 if cfg.bits == 2 else 0.9) * e_rtn


@pytest.mark.parametrize("K", [7, GRAM_TILE, GRAM_TILE + 1, 1100, 5000])  # one GEMM; 2, 5 and 16 tiles
def test_gram_matrix_is_the_full_product(K):
    x = torch.randn(24, K, generator=torch.Generator().manual_seed(K)) * 3 + 0.5
    g = gram_matrix(x)
    ref = x.double().t() @ x.double()  # independent: fp64 over the same rows
    assert g.shape == (K, K) and g.dtype == torch.float32
    assert torch.equal(g[:200, 400:], g[400:, :200].t())  # tiles below the diagonal: the computed ones, mirrored
    assert torch.allclose(g.double(), ref, rtol=1e-5, atol=1e-3)
    assert torch.allclose(gram_matrix(x.double()), ref, rtol=1e-12, atol=1e-9)


def test_result_layout_and_g_idx():
    k, n = 100, 8
    X = correlated_inputs(512, k)
    H = 2 * X.t() @ X / 512
    W = torch.randn(n, k)
    res = gptq_quantize(W, H, QuantizeConfig(bits=4, group_size=32))
    assert res.codes.shape == (n, k) and res.codes.dtype == torch.int32
    assert res.scales.shape == (4, n) and res.scales.dtype == torch.float16  # ceil(100/32) = 4, last partial
    assert torch.equal(res.g_idx, (torch.arange(k) // 32).int())
    assert int(res.codes.min()) >= 0 and int(res.codes.max()) <= 15
    act = gptq_quantize(W, H, QuantizeConfig(bits=4, group_size=32, desc_act=True))
    assert not torch.equal(act.g_idx, res.g_idx)  # groups follow the Hessian order
    assert sorted(torch.bincount(act.g_idx.long()).tolist()) == [4, 32, 32, 32]
    static = gptq_quantize(W, H, QuantizeConfig(bits=4, group_size=32, desc_act=True, static_groups=True))
    assert torch.equal(static.g_idx, res.g_idx)


def test_dead_columns_are_zero_and_finite():
    k, n = 64, 16
    X = correlated_inputs(512, k)
    X[:, [3, 17, 40]] = 0
    H = 2 * X.t() @ X / 512
    W = torch.randn(n, k)
    res = gptq_quantize(W, H, QuantizeConfig(bits=4, group_size=16))
    Q = res.dequantize()
    assert torch.isfinite(Q).all()
    assert torch.all(Q[:, [3, 17, 40]].abs() <= res.scales.float().max())  # quantized from 0


def test_non_pd_hessian_is_repaired_and_logged(caplog):
    k, n = 32, 8
    X = torch.randn(4, k)
    H = 2 * X.t() @ X / 4
    H -= 0.02 * torch.diag(H).mean() * torch.eye(k)  # indefinite; PD again from damp_percent ~0.021
    W = torch.randn(n, k)
    with caplog.at_level(logging.WARNING):
        res = gptq_quantize(W, H, QuantizeConfig(bits=4, group_size=16, damp_percent=0.01, damp_auto_increment=0.05))
    assert res.fallback is None and res.damp_percent > 0.01
    assert "not positive definite" in caplog.text


def test_hopeless_hessian_falls_back_to_rtn(caplog):
    k, n = 16, 4
    H = -torch.eye(k)
    W = torch.randn(n, k)
    with caplog.at_level(logging.WARNING):
        res = gptq_quantize(W, H, QuantizeConfig(bits=4, group_size=8, damp_auto_increment=0.2))
    assert res.fallback and "RTN" in res.fallback
    assert torch.equal(res.codes, rtn_quantize(W, QuantizeConfig(bits=4, group_size=8)).codes)


def test_nan_inputs_raise():
    with pytest.raises(NumericalError, match="NaN"):
        gptq_quantize(torch.randn(4, 8), torch.full((8, 8), float("nan")), QuantizeConfig(group_size=-1), name="L")
    with pytest.raises(NumericalError, match="no calibration tokens"):
        HessianAccumulator(8).finalize()


@pytest.mark.parametrize("group_size, mse", [(32, 0.0), (48, 2.4), (-1, 0.0), (100, 2.4)])
def test_group_params_match_per_group_grids(group_size, mse):
    """The batched static grid equals find_params group by group (112 inputs: partial last groups for 48, 100)."""
    from gptq_plugin.grid import find_params
    from gptq_plugin.solver import _group_params

    W = torch.randn(24, 112, generator=torch.Generator().manual_seed(5)) * torch.linspace(0.1, 3, 112)
    cfg = QuantizeConfig(bits=3, group_size=group_size, sym=False, mse=mse)
    scales, zeros = _group_params(W, cfg)
    gs = 112 if group_size == -1 else group_size
    for g in range(scales.shape[0]):
        s, z = find_params(W[:, g * gs:(g + 1) * gs], 3, False, mse)
        assert torch.equal(scales[g], s) and torch.equal(zeros[g], z)


@pytest.mark.parametrize("case", ["act-order", "in-order-dead-columns", "damping-retry", "rtn-fallback"])
def test_hessian_is_borrowed_and_restored_bit_for_bit(case):
    """The solver permutes and dampens the caller's Hessian in place (no Hessian-sized copy) and must hand it back
    unchanged, also when it retries damping or falls back to RTN."""
    k, n = 80, 12
    X = correlated_inputs(400, k, seed=5)
    if case == "in-order-dead-columns":
        X[:, [2, 50]] = 0
    H = 2 * X.t() @ X / 400
    if case == "damping-retry":
        H -= 0.02 * torch.diag(H).mean() * torch.eye(k)
    if case == "rtn-fallback":
        H = -torch.eye(k)
    cfg = QuantizeConfig(bits=4, group_size=16, desc_act=case != "in-order-dead-columns", damp_percent=0.01,
                         damp_auto_increment=0.05)
    before = H.clone()
    res = gptq_quantize(torch.randn(n, k), H, cfg)
    assert torch.equal(H.view(torch.int32), before.view(torch.int32))
    assert (res.fallback is not None) == (case == "rtn-fallback")
    assert (res.damp_percent > 0.01) == (case == "damping-retry")
    # a copy-based solve gives the same codes: the in-place permutation is the gather H[perm][:, perm]
    again = gptq_quantize(torch.randn(n, k, generator=torch.Generator().manual_seed(2)), before.double(), cfg)
    same = gptq_quantize(torch.randn(n, k, generator=torch.Generator().manual_seed(2)), H, cfg)
    assert torch.equal(again.codes, same.codes)


def test_in_place_permutation_is_the_gather():
    from gptq_plugin.solver_memory import permute_

    H = torch.randn(37, 37)
    perm = torch.randperm(37, generator=torch.Generator().manual_seed(0))
    P = H.clone()
    permute_(P, perm, chunk_bytes=4 * 37 * 5)  # 5 rows per column block
    assert torch.equal(P, H[perm][:, perm])
    permute_(P, torch.argsort(perm))
    assert torch.equal(P, H)


@pytest.mark.parametrize("folder_exists", [True, False])
def test_offloaded_hessian_frees_its_memory_during_the_loop_and_comes_back(tmp_path, monkeypatch, caplog, folder_exists):
    from gptq_plugin import solver

    k, n = 64, 10
    X = correlated_inputs(300, k, seed=8)
    H = 2 * X.t() @ X / 300
    W = torch.randn(n, k, generator=torch.Generator().manual_seed(9))
    cfg = QuantizeConfig(bits=4, group_size=16, desc_act=True)
    want = gptq_quantize(W, H, cfg)
    before = H.clone()
    seen = []
    loop = solver._column_loop
    monkeypatch.setattr(solver, "_column_loop", lambda *a: seen.append(H.untyped_storage().nbytes()) or loop(*a))
    monkeypatch.setattr(solver, "OFFLOAD_MIN_BYTES", 0)
    folder = tmp_path if folder_exists else tmp_path / "missing"
    with caplog.at_level(logging.WARNING):
        got = gptq_quantize(W, H, cfg, offload_dir=folder)
    assert seen == ([0] if folder_exists else [H.numel() * 4])  # parked on disk, or kept (with a warning)
    assert folder_exists or "could not offload" in caplog.text
    assert torch.equal(H.view(torch.int32), before.view(torch.int32))
    assert torch.equal(got.codes, want.codes) and torch.equal(got.scales, want.scales)
    assert not list(tmp_path.rglob("hessian-*"))


def test_inference_mode_hessian_is_copied_not_borrowed():
    k = 32
    X = correlated_inputs(200, k)
    with torch.inference_mode():
        H = 2 * X.t() @ X / 200
    cfg = QuantizeConfig(bits=4, group_size=16, desc_act=True)
    W = torch.randn(6, k)
    assert torch.equal(gptq_quantize(W, H, cfg).codes, gptq_quantize(W, H.clone(), cfg).codes)


def test_group_aware_order_keeps_groups_whole_and_g_idx_in_input_order():
    k, gs = 100, 16  # 6 full groups and a partial one of 4
    X = correlated_inputs(1024, k, seed=5)
    H = 2 * X.t() @ X / X.shape[0]
    from gptq_plugin.solver import group_aware_order

    order = group_aware_order(torch.diag(H), gs)
    assert order.tolist() == gar_reference_order(torch.diag(H), gs).tolist()
    spans = [set((order[i:i + gs] // gs).tolist()) for i in range(0, k, gs)]
    assert all(len(s) == 1 for s in spans), "a group was split across the order"
    assert order.tolist() != list(range(k)), "the order must differ from input order on uneven channels"
    W = torch.randn(32, k, generator=torch.Generator().manual_seed(6)) * 0.1
    res = gptq_quantize(W, H, QuantizeConfig(bits=4, group_size=gs, act_group_aware=True))
    assert res.g_idx.tolist() == [i // gs for i in range(k)]
    plain = gptq_quantize(W, H, QuantizeConfig(bits=4, group_size=gs))
    assert not torch.equal(res.codes, plain.codes)


@pytest.mark.parametrize("kw, fix", [(dict(desc_act=True), "exclude each other"), (dict(group_size=-1), "needs groups"),
                                     (dict(act_group_aware="yes"), "true or false")])
def test_group_aware_config_errors(kw, fix):
    from gptq_plugin.errors import ConfigError

    with pytest.raises(ConfigError, match=fix):
        QuantizeConfig(act_group_aware=kw.pop("act_group_aware", True), **kw)


def test_group_aware_is_recorded_and_read_back():
    cfg = QuantizeConfig(act_group_aware=True)
    d = cfg.to_dict()
    assert d["desc_act"] is False and d["meta"]["act_group_aware"] is True
    assert QuantizeConfig.from_dict(d).act_group_aware is True
    assert QuantizeConfig.from_dict(QuantizeConfig().to_dict()).act_group_aware is False


def refit_reference(W, H, res, damp):
    """Per row, in float64 with explicit loops: the group scales minimising (w - ŵ)ᵀ(H + λI)(w - ŵ) for the fixed
    codes, by the normal equations; a row keeps its scales unless the fp16-rounded new ones are positive and
    lower that error."""
    W, H = W.double(), H.double()
    Hd = H + damp * torch.mean(torch.diag(H)) * torch.eye(H.shape[0], dtype=H.dtype)
    g = res.g_idx.long().tolist()
    G = res.scales.shape[0]
    out = res.scales.double().clone()
    for r in range(W.shape[0]):
        C = torch.zeros(W.shape[1], G, dtype=torch.float64)
        for j, gj in enumerate(g):
            C[j, gj] = float(res.codes[r, j]) - float(res.zeros[gj, r])
        A = C.t() @ Hd @ C
        b = C.t() @ Hd @ W[r]
        s = torch.linalg.solve(A, b).half().double()

        def err(v):
            d = W[r] - C @ v
            return d @ Hd @ d

        if bool((s > 0).all()) and err(s) < err(out[:, r]):
            out[:, r] = s
    return out


@pytest.mark.parametrize("kw", [dict(bits=4, group_size=32), dict(bits=3, group_size=24, sym=False, act_group_aware=True),
                                dict(bits=4, group_size=32, desc_act=True), dict(bits=2, group_size=-1)],
                         ids=lambda kw: "-".join(f"{k}={v}" for k, v in kw.items()))
def test_refit_scales_matches_per_row_least_squares_and_lowers_the_error(kw):
    k, n = 96, 24
    X = correlated_inputs(2048, k, seed=7)
    W = torch.randn(n, k, generator=torch.Generator().manual_seed(8)) * 0.1
    H = 2 * X.t() @ X / X.shape[0]
    plain = gptq_quantize(W, H, QuantizeConfig(**kw))
    refit = gptq_quantize(W, H, QuantizeConfig(refit_scales=True, **kw))
    assert torch.equal(plain.codes, refit.codes) and torch.equal(plain.zeros, refit.zeros)
    ref = refit_reference(W, H, plain, plain.damp_percent)
    close = torch.isclose(refit.scales.double(), ref, rtol=2e-3, atol=0)
    assert close.float().mean() > 0.98, f"only {close.float().mean():.3f} of the scales match the reference"
    assert not torch.equal(refit.scales, plain.scales), "the refit changed nothing"
    e_plain = torch.linalg.norm(X @ (W - plain.dequantize()).t())
    e_refit = torch.linalg.norm(X @ (W - refit.dequantize()).t())
    assert e_refit < e_plain


def gptaq_reference(W, H, dxxt, cfg, alpha):
    """GPTAQ's column loop as its reference code writes it (GPTQv2 ``gptq.py``, GPTQModel 7.7
    ``quantization/gptaq.py``), in float64 with an explicit inverse: ``P = α triu(dXXT Uᵀ, 1) U``; inside a block
    each column's update is ``-err ⊗ U[i, i:] + w ⊗ P[i, i:]`` (``w`` before rounding), the lazy update of the later
    columns ``-Err ⊗ U + W1 ⊗ P`` (``W1``: the block after rounding). Group grids are taken at a group's first
    column from the weights as updated so far, the block's pending lazy update included for the columns after the
    block (the reference code reads those without it; the two agree when every group starts a block)."""
    W = W.double().clone()
    k = W.shape[1]
    maxq = 2**cfg.bits - 1
    gs = k if cfg.group_size == -1 else cfg.group_size
    B = cfg.block_size
    order = reference_order(torch.diag(H), cfg, gs)
    static = ([minmax_grid(W[:, g * gs:(g + 1) * gs], cfg) for g in range((k + gs - 1) // gs)]
              if cfg.static_groups else None)
    W, Hp, D = W[:, order], H.double()[order][:, order], dxxt.double()[order][:, order]
    Hd = Hp + torch.eye(k, dtype=torch.float64) * cfg.damp_percent * torch.mean(torch.diag(Hp))
    U = torch.linalg.cholesky(torch.linalg.inv(Hd), upper=True)
    P = alpha * torch.triu(D @ U.t(), diagonal=1) @ U
    Q = torch.zeros_like(W)
    s = z = None
    for i1 in range(0, k, B):
        i2 = min(i1 + B, k)
        W1 = W[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        for i in range(i2 - i1):
            pos = i1 + i
            if static is not None:
                s, z = static[int(order[pos]) // gs]
            elif pos % gs == 0:
                later = W[:, i2:] - Err1[:, :i] @ U[i1:pos, i2:] + W1[:, :i] @ P[i1:pos, i2:]
                s, z = minmax_grid(torch.cat([W1[:, i:], later], dim=1)[:, :gs], cfg)
            w = W1[:, i].clone()
            q = s * (torch.clamp(torch.round(w / s) + z, 0, maxq) - z)
            Q[:, pos] = q
            err = (w - q) / U[pos, pos]
            W1[:, i:] -= err[:, None] * U[pos, pos:i2][None] - w[:, None] * P[pos, pos:i2][None]
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ U[i1:i2, i2:] - W1 @ P[i1:i2, i2:]
    return Q[:, torch.argsort(order)]


def asymmetric_inputs(n, k, seed=0):
    """``(x, x_fp)``: inputs of a layer in a partly quantized model and the same tokens' inputs in the original model
    (``x_fp = x + Δ``, ``Δ`` correlated with ``x``, as the error of quantized earlier layers is)."""
    x = correlated_inputs(n, k, seed)
    g = torch.Generator().manual_seed(seed + 100)
    delta = x @ (torch.randn(k, k, generator=g) * 0.08 / k**0.5) + 0.05 * torch.randn(n, k, generator=g)
    return x, x + delta


GPTAQ_CASES = [dict(bits=4, group_size=32), dict(bits=3, group_size=32, sym=False), dict(bits=4, group_size=-1),
               dict(bits=4, group_size=32, act_group_aware=True),
               dict(bits=4, group_size=32, desc_act=True, static_groups=True),
               dict(bits=4, group_size=24, block_size=64)]  # groups that start inside a block and end after it


@pytest.mark.parametrize("kw", GPTAQ_CASES, ids=lambda kw: "-".join(f"{k}={v}" for k, v in kw.items()))
def test_gptaq_matches_its_reference_loop_and_targets_the_original_output(kw):
    k, n = 96, 40
    x, x_fp = asymmetric_inputs(4096, k, seed=11)
    W = torch.randn(n, k, generator=torch.Generator().manual_seed(12)) * 0.1
    H = 2 * x.t() @ x / x.shape[0]
    dxxt = 2 * (x_fp - x).t() @ x / x.shape[0]  # 2/n Σ (x_fp - x) xᵀ, scaled as H
    cfg = QuantizeConfig(**{"block_size": 32, **kw})
    ours = gptq_quantize(W, H, cfg, dxxt=dxxt, gptaq_alpha=0.25).dequantize()
    ref = gptaq_reference(W, H, dxxt, cfg, 0.25).float()
    same = (ours - ref).abs() <= 1e-4 * ref.abs().max()
    assert same.float().mean() > 0.99, f"only {same.float().mean():.4f} of weights agree with the reference loop"
    plain = gptq_quantize(W, H, cfg).dequantize()
    assert not torch.equal(ours, plain)

    def asym_err(Q):  # the original model's output against the quantized layer's on its own inputs
        return torch.linalg.norm(x @ Q.t() - x_fp @ W.t())

    assert asym_err(ours) < asym_err(plain)


def test_gptaq_with_refit_fits_the_original_output_and_alpha_0_is_plain_gptq():
    k, n = 96, 24
    x, x_fp = asymmetric_inputs(4096, k, seed=13)
    W = torch.randn(n, k, generator=torch.Generator().manual_seed(14)) * 0.1
    H = 2 * x.t() @ x / x.shape[0]
    dxxt = 2 * (x_fp - x).t() @ x / x.shape[0]
    cfg = QuantizeConfig(bits=4, group_size=32, act_group_aware=True, mse=2.4, refit_scales=True)
    # the refit fits the layer's own output W x at α = 0 (GPTQ's target), the original model's W x_fp at α = 1
    for a, target in ((0.0, x @ W.t()), (1.0, x_fp @ W.t())):
        no_refit = gptq_quantize(W, H, dataclasses.replace(cfg, refit_scales=False), dxxt=dxxt, gptaq_alpha=a)
        refit = gptq_quantize(W, H, cfg, dxxt=dxxt, gptaq_alpha=a)
        assert torch.equal(refit.codes, no_refit.codes)
        e = [torch.linalg.norm(x @ r.dequantize().t() - target) for r in (no_refit, refit)]
        assert e[1] < e[0]
    plain = gptq_quantize(W, H, cfg)
    for d, a in ((dxxt, 0.0), (torch.zeros_like(dxxt), 0.25)):  # no asymmetric term: GPTQ's bytes
        r = gptq_quantize(W, H, cfg, dxxt=d, gptaq_alpha=a)
        assert torch.equal(r.codes, plain.codes) and torch.equal(r.scales, plain.scales)


def test_gptaq_input_errors_name_the_layer():
    W = torch.randn(8, 16)
    H = torch.eye(16)
    with pytest.raises(ValueError, match="blk.q_proj: GPTAQ's dxxt has shape"):
        gptq_quantize(W, H, QuantizeConfig(group_size=-1), name="blk.q_proj", dxxt=torch.zeros(16, 8))
    bad = torch.zeros(16, 16)
    bad[3, 4] = float("nan")
    with pytest.raises(NumericalError, match="blk.q_proj: GPTAQ's dxxt contains NaN"):
        gptq_quantize(W, H, QuantizeConfig(group_size=-1), name="blk.q_proj", dxxt=bad)
