"""Checkpoint formats on a tiny random Llama: GPTQ v1, GPTQ v2 and compressed-tensors pack-quantized.

* every format is read against an independent, bit-by-bit dequantization written here from the format specs;
* ``convert`` there and back gives identical tensors (every bit width, sym/asym, act-order, partial groups);
* mislabelled v1/v2 checkpoints are detected (the regression test of issue 8);
* the CLI's ``convert`` and ``inspect``.
"""

import json
import logging
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from gptq_plugin.checkpoint import load_quantized, save_quantized
from gptq_plugin.config import QuantizeConfig
from gptq_plugin.convert import convert_checkpoint
from gptq_plugin.errors import CheckpointError, GPTQPluginError, OutputError
from gptq_plugin.format_gptq import diagnose_zero_points
from gptq_plugin.plugins import detect_format
from gptq_plugin.reader import open_checkpoint, read_checkpoint, read_quantization_config
from gptq_plugin.pipeline import quantize_model
from tests.tiny import tiny_llama

FORMATS = ("gptq", "gptq_v2", "compressed-tensors")
LAYER = "model.layers.0.mlp.down_proj"  # in 96, out 64


# --- an independent reading of the specs -------------------------------------------------------------------
def bitstream_unpack(words: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Codes packed low bits first into int32 words along dim 0, as one bit stream: bit ``i * bits + b`` of the
    stream is bit ``b`` of code ``i`` (GPTQ qweight/qzeros and compressed-tensors >= 0.1x dense packing)."""
    w = words.to(torch.int64) & 0xFFFFFFFF  # [rows, m]
    bit = (w.unsqueeze(1) >> torch.arange(32).view(1, 32, 1)) & 1  # [rows, 32, m]
    stream = bit.reshape(-1, w.shape[1])[: n * bits].reshape(n, bits, w.shape[1])
    return (stream << torch.arange(bits).view(1, bits, 1)).sum(1)  # [n, m]


def dequant_gptq(t: dict, prefix: str, bits: int, version: int) -> torch.Tensor:
    """``W [out, in]`` from a GPTQ layer: v1 stores ``zero - 1`` (mod ``2**bits``), v2 stores ``zero``."""
    g = t[f"{prefix}.g_idx"].long()
    scales = t[f"{prefix}.scales"].float()
    q = bitstream_unpack(t[f"{prefix}.qweight"], bits, g.numel())  # [in, out]
    z = bitstream_unpack(t[f"{prefix}.qzeros"].t(), bits, scales.shape[1]).t()  # [G, out]
    if version == 1:
        z = (z + 1) % 2**bits
    return (scales[g] * (q - z[g]).float()).t()


def dequant_ct(t: dict, prefix: str, bits: int, symmetric: bool, group_size: int) -> torch.Tensor:
    """``W [out, in]`` from a compressed-tensors pack-quantized layer: signed codes and zero points stored with
    an offset of ``2**(bits-1)``, ``W = (q - zp) * scale``."""
    out_f, in_f = t[f"{prefix}.weight_shape"].tolist()
    off = 2 ** (bits - 1)
    q = bitstream_unpack(t[f"{prefix}.weight_packed"].t(), bits, in_f).t() - off  # [out, in] signed
    scale = t[f"{prefix}.weight_scale"].float()  # [out, G]
    g = t.get(f"{prefix}.weight_g_idx")
    g = g.long() if g is not None else (torch.arange(in_f) // (in_f if group_size == -1 else group_size))
    if symmetric:
        zp = torch.zeros_like(scale, dtype=torch.int64)
    else:
        zp = bitstream_unpack(t[f"{prefix}.weight_zero_point"], bits, out_f) - off  # [out, G] signed
    return (q - zp[:, g]).float() * scale[:, g]


def tensors(path) -> dict:
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def qconfig(path) -> dict:
    return json.loads((path / "config.json").read_text())["quantization_config"]


# --- checkpoints -------------------------------------------------------------------------------------------


CONFIGS = {
    "4bit-sym-g32": dict(bits=4, group_size=32, method="rtn"),
    "4bit-asym-act-g24": dict(bits=4, group_size=24, sym=False, desc_act=True),
    "3bit-sym-act-g24": dict(bits=3, group_size=24, desc_act=True),
    "3bit-asym-gall": dict(bits=3, group_size=-1, sym=False, method="rtn"),
    "2bit-asym-g16": dict(bits=2, group_size=16, sym=False, method="rtn"),
    "8bit-sym-static-act": dict(bits=8, group_size=32, desc_act=True, static_groups=True),
}


@pytest.fixture(scope="module")
def quantized(tmp_path_factory):
    """``factory(name, fmt) -> checkpoint dir``: the tiny model quantized with ``CONFIGS[name]``, saved in ``fmt``
    (GPTQ formats by ``save_quantized``, compressed-tensors by ``convert`` from v1), cached per module."""
    cache, models = {}, {}

    def factory(name: str, fmt: str = "gptq"):
        if (name, fmt) in cache:
            return cache[name, fmt]
        kw = CONFIGS[name]
        if name not in models:
            model = tiny_llama()
            calib = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(0))
            quantize_model(model, calib, QuantizeConfig(**kw), batch_size=2, progress=False)
            models[name] = model
        root = tmp_path_factory.mktemp(name)
        if fmt == "compressed-tensors":
            convert_checkpoint(factory(name, "gptq"), root / "ct", "compressed-tensors")
            cache[name, fmt] = root / "ct"
        else:
            cache[name, fmt] = save_quantized(models[name], QuantizeConfig(**kw, checkpoint_format=fmt), root / fmt)
        return cache[name, fmt]

    return factory


# --- readers against the independent dequantization -------------------------------------------------------
@pytest.mark.parametrize("name", list(CONFIGS))
def test_every_format_dequantizes_like_the_spec(quantized, name):
    kw = CONFIGS[name]
    bits, gs, sym = kw["bits"], kw["group_size"], kw.get("sym", True)
    ref = None
    for fmt in FORMATS:
        path = quantized(name, fmt)
        t = tensors(path)
        if fmt == "compressed-tensors":
            w = dequant_ct(t, LAYER, bits, qconfig(path)["config_groups"]["group_0"]["weights"]["symmetric"], gs)
        else:
            w = dequant_gptq(t, LAYER, bits, 1 if fmt == "gptq" else 2)
        ref = w if ref is None else ref
        torch.testing.assert_close(w, ref, rtol=0, atol=0, msg=f"{fmt} differs from v1")
        # the core's reader gives the same weights through the in-memory v1 layout
        from gptq_plugin.kernels.reference import dequantize_weight

        cfg, state = read_checkpoint(path)
        assert cfg.checkpoint_format == "gptq" and cfg.meta["source_format"] == fmt
        got = dequantize_weight(state[f"{LAYER}.qweight"], state[f"{LAYER}.qzeros"], state[f"{LAYER}.scales"],
                                state[f"{LAYER}.g_idx"], bits, 96)
        torch.testing.assert_close(got, ref, rtol=0, atol=0)
    assert sym == (qconfig(quantized(name, "compressed-tensors"))["config_groups"]["group_0"]["weights"]["symmetric"])


@pytest.mark.parametrize("name", ["4bit-asym-act-g24", "3bit-sym-act-g24"])
def test_load_quantized_reads_every_format_identically(quantized, name):
    sds = {fmt: load_quantized(quantized(name, fmt)).state_dict() for fmt in FORMATS}
    for fmt in FORMATS[1:]:
        assert sds[fmt].keys() == sds["gptq"].keys()
        for k, v in sds["gptq"].items():
            assert torch.equal(sds[fmt][k], v), (fmt, k)


# --- exact round trips --------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("via", ["gptq_v2", "compressed-tensors"])
def test_convert_there_and_back_is_identical(quantized, tmp_path, name, via):
    src = quantized(name, "gptq")
    there = convert_checkpoint(src, tmp_path / "there", via)
    assert there.source_format == "gptq" and there.target_format == via
    back = convert_checkpoint(tmp_path / "there", tmp_path / "back", "gptq")
    a, b = tensors(src), tensors(tmp_path / "back")
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    ca, cb = qconfig(src), qconfig(tmp_path / "back")
    for key in ("bits", "group_size", "desc_act", "sym", "checkpoint_format"):
        assert ca[key] == cb[key], key
    if via == "gptq_v2":
        assert ca["static_groups"] == cb["static_groups"]
    assert back.n_layers == 14
    assert (tmp_path / "back" / "quantize_config.json").is_file()
    assert not (tmp_path / "there" / "quantize_config.json").is_file() or via != "compressed-tensors"


@pytest.mark.parametrize("name", ["3bit-sym-act-g24", "3bit-asym-gall"])
def test_compressed_tensors_round_trip_from_its_side(quantized, tmp_path, name):
    """compressed-tensors -> v1 -> v2 -> compressed-tensors is identical, bf16 scales included (3 bits)."""
    ct = quantized(name, "compressed-tensors")
    t = tensors(ct)
    src = tmp_path / "ct_bf16"
    src.mkdir()
    for f in ct.iterdir():
        if f.suffix != ".safetensors":
            (src / f.name).write_bytes(f.read_bytes())
    t = {k: (v.to(torch.bfloat16) if k.endswith("weight_scale") else v) for k, v in t.items()}
    save_file(t, str(src / "model.safetensors"), metadata={"format": "pt"})
    convert_checkpoint(src, tmp_path / "v1", "gptq")
    convert_checkpoint(tmp_path / "v1", tmp_path / "v2", "gptq_v2")
    convert_checkpoint(tmp_path / "v2", tmp_path / "back", "compressed-tensors")
    b = tensors(tmp_path / "back")
    assert t.keys() == b.keys()
    for k in t:
        assert t[k].dtype == b[k].dtype and torch.equal(t[k], b[k]), k
    assert qconfig(tmp_path / "back")["config_groups"] == qconfig(src)["config_groups"]
    assert qconfig(tmp_path / "back")["ignore"] == qconfig(src)["ignore"] == ["lm_head"]


def test_compressed_tensors_config_and_tensors(quantized):
    ct = quantized("4bit-asym-act-g24", "compressed-tensors")
    q = qconfig(ct)
    assert q["quant_method"] == "compressed-tensors" and q["format"] == "pack-quantized"
    w = q["config_groups"]["group_0"]["weights"]
    assert (w["num_bits"], w["group_size"], w["symmetric"], w["strategy"], w["actorder"]) == (4, 24, False, "group", "group")
    t = tensors(ct)
    assert t[f"{LAYER}.weight_packed"].shape == (64, 12) and t[f"{LAYER}.weight_packed"].dtype == torch.int32
    assert t[f"{LAYER}.weight_scale"].shape == (64, 4)
    assert t[f"{LAYER}.weight_zero_point"].shape == (8, 4)
    assert t[f"{LAYER}.weight_shape"].tolist() == [64, 96]
    assert t[f"{LAYER}.weight_g_idx"].shape == (96,)
    assert not any(k.endswith((".qweight", ".qzeros", ".scales", ".g_idx")) for k in t)
    assert not (ct / "quantize_config.json").exists()
    sym = qconfig(quantized("4bit-sym-g32", "compressed-tensors"))["config_groups"]["group_0"]["weights"]
    assert sym["symmetric"] and sym["actorder"] is None
    assert f"{LAYER}.weight_zero_point" not in tensors(quantized("4bit-sym-g32", "compressed-tensors"))
    w8 = qconfig(quantized("8bit-sym-static-act", "compressed-tensors"))["config_groups"]["group_0"]["weights"]
    assert w8["actorder"] == "weight"


def test_legacy_3bit_and_unpacked_zero_points_are_read(quantized, tmp_path):
    """compressed-tensors releases before the dense packing put 10 3-bit codes in a word (2 bits unused), and
    some stored zero points unpacked as int8; both read to the same weights."""
    ct = quantized("3bit-asym-gall", "compressed-tensors")
    t = tensors(ct)
    out_f, in_f = t[f"{LAYER}.weight_shape"].tolist()

    def legacy_pack(codes):  # [n, m] unsigned 3-bit codes along dim 0, 10 per word
        n, m = codes.shape
        rows = (n + 9) // 10
        words = torch.zeros(rows, m, dtype=torch.int64)
        for i in range(n):
            words[i // 10] |= codes[i].long() << (3 * (i % 10))
        return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)

    codes = bitstream_unpack(t[f"{LAYER}.weight_packed"].t(), 3, in_f)  # [in, out]
    zeros = bitstream_unpack(t[f"{LAYER}.weight_zero_point"], 3, out_f)  # [out, G]
    legacy = dict(t)
    legacy[f"{LAYER}.weight_packed"] = legacy_pack(codes).t().contiguous()
    legacy[f"{LAYER}.weight_zero_point"] = (zeros - 4).to(torch.int8)
    src = tmp_path / "legacy"
    src.mkdir()
    (src / "config.json").write_text((ct / "config.json").read_text())
    save_file(legacy, str(src / "model.safetensors"))
    _, a = read_checkpoint(ct)
    _, b = read_checkpoint(src)
    for k in a:
        assert torch.equal(a[k], b[k]), k


# --- mislabelled checkpoints (the regression test) ----------------------------------------------------------
def _relabel(src, dst, fmt):
    dst.mkdir()
    for f in src.iterdir():
        dst.joinpath(f.name).write_bytes(f.read_bytes())
    for name in ("config.json", "quantize_config.json"):
        d = json.loads((dst / name).read_text())
        q = d.get("quantization_config", d)
        q["checkpoint_format"] = fmt
        (dst / name).write_text(json.dumps(d))
    return dst


@pytest.mark.parametrize("name", ["4bit-sym-g32", "3bit-sym-act-g24", "8bit-sym-static-act"])
@pytest.mark.parametrize("real, says", [("gptq_v2", "gptq"), ("gptq", "gptq_v2")])
def test_mislabelled_symmetric_checkpoint_is_refused(quantized, tmp_path, name, real, says):
    bad = _relabel(quantized(name, real), tmp_path / "bad", says)
    stored = {"gptq": 2 ** (CONFIGS[name]["bits"] - 1) - 1, "gptq_v2": 2 ** (CONFIGS[name]["bits"] - 1)}[real]
    with pytest.raises(CheckpointError, match=rf"says checkpoint_format '{says}' but its tensors look like '{real}'"
                                              rf".*every stored zero point is {stored}.*--source-format {real}"):
        load_quantized(bad)
    with pytest.raises(CheckpointError, match="look like"):
        convert_checkpoint(bad, tmp_path / "out", "compressed-tensors")
    assert not (tmp_path / "out").exists()
    # the fix the message names: relabel while converting; the result loads like the original
    convert_checkpoint(bad, tmp_path / "fixed", says, source_format=real)
    a = load_quantized(quantized(name, "gptq")).state_dict()
    b = load_quantized(tmp_path / "fixed").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("real, says", [("gptq_v2", "gptq"), ("gptq", "gptq_v2")])
def test_mislabelled_asymmetric_checkpoint_is_reported(quantized, tmp_path, caplog, real, says):
    bad = _relabel(quantized("4bit-asym-act-g24", real), tmp_path / "bad", says)
    with caplog.at_level(logging.WARNING, logger="gptq_plugin"):
        load_quantized(bad)
    assert any(f"look like '{real}'" in r.getMessage() and "statistical" in r.getMessage() for r in caplog.records)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="gptq_plugin"):
        load_quantized(quantized("4bit-asym-act-g24", real))
    assert not [r for r in caplog.records if "look like" in r.getMessage()]


def test_diagnosis_on_correct_labels(quantized):
    for name in CONFIGS:
        for fmt in ("gptq", "gptq_v2"):
            ck = open_checkpoint(quantized(name, fmt))
            d = diagnose_zero_points(((p, ck.layer_tensors(p)) for p in ck.layers), ck.config.bits, ck.config.sym, fmt)
            assert not d.mislabelled, (name, fmt, d)
            if ck.config.sym:
                assert d.exact and d.likely == fmt


def test_gptqmodel_whole_word_v1_zeros(quantized, tmp_path):
    """GPTQModel writes v1 qzeros as ``v2_word - 0x11111111`` (2/4/8 bits): a zero point of 0 borrows from its
    neighbour. Files that name GPTQModel as quantizer are read its way, exactly."""
    src = quantized("4bit-asym-act-g24", "gptq_v2")
    t = tensors(src)
    key = f"{LAYER}.qzeros"
    z = bitstream_unpack(t[key].t(), 4, 64).t().clone()  # [G, out] true zeros
    z[0, 0], z[1, 8] = 0, 0  # force zero points of 0
    words = torch.zeros(z.shape[0], 8, dtype=torch.int64)
    for j in range(64):
        words[:, j // 8] |= z[:, j].long() << (4 * (j % 8))
    v2 = dict(t)
    v2[key] = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)
    v1_words = (words - 0x11111111) % 2**32
    v1 = dict(t)
    v1[key] = torch.where(v1_words >= 2**31, v1_words - 2**32, v1_words).to(torch.int32)
    dirs = {}
    for fmt, state in (("gptq_v2", v2), ("gptq", v1)):
        d = tmp_path / fmt
        d.mkdir()
        cfg = json.loads((src / "config.json").read_text())
        cfg["quantization_config"].update(checkpoint_format=fmt, format=fmt, meta={"quantizer": ["gptqmodel:7.7.0"]})
        (d / "config.json").write_text(json.dumps(cfg))
        save_file(state, str(d / "model.safetensors"))
        dirs[fmt] = d
    _, a = read_checkpoint(dirs["gptq_v2"])
    _, b = read_checkpoint(dirs["gptq"])
    assert torch.equal(a[key], b[key])
    from gptq_plugin.packing import unpack_qzeros

    assert torch.equal(unpack_qzeros(b[key], 4, 64, "gptq"), z.to(torch.int32))


# --- detection and errors -----------------------------------------------------------------------------------
@pytest.mark.parametrize("qcfg, name", [
    ({"bits": 4, "group_size": 128, "desc_act": False, "sym": True}, "gptq"),  # AutoGPTQ, no quant_method
    ({"quant_method": "gptq", "bits": 4, "checkpoint_format": "gptq"}, "gptq"),
    ({"quant_method": "gptq", "bits": 4, "format": "gptq_v2"}, "gptq_v2"),  # GPTQModel's older key
    ({"quant_method": "gptq", "bits": 4, "format": "gptq", "checkpoint_format": "gptq_v2"}, "gptq_v2"),
    ({"quant_method": "compressed-tensors", "format": "pack-quantized", "config_groups": {}}, "compressed-tensors"),
])
def test_detect_format(qcfg, name):
    assert detect_format(qcfg).name == name


@pytest.mark.parametrize("qcfg, needle", [
    ({"quant_method": "awq", "bits": 4}, "quant_method='awq'"),
    ({"quant_method": "gptq", "checkpoint_format": "marlin"}, "checkpoint_format='marlin'"),
])
def test_unknown_formats_are_named(qcfg, needle):
    with pytest.raises(CheckpointError, match=needle):
        detect_format(qcfg)


def _ct_config(path, **weights):
    d = json.loads((path / "config.json").read_text())
    d["quantization_config"]["config_groups"]["group_0"]["weights"].update(weights)
    return d


@pytest.mark.parametrize("edit, needle", [
    (lambda q: q["config_groups"]["group_0"].update(input_activations={"num_bits": 8}), "input_activations"),
    (lambda q: q["config_groups"]["group_0"]["weights"].update(strategy="tensor"), "strategy='tensor'"),
    (lambda q: q["config_groups"]["group_0"]["weights"].update(type="float"), "type='float'"),
    (lambda q: q.update(format="int-quantized") or q["config_groups"]["group_0"].update(format="int-quantized"),
     "int-quantized"),
    (lambda q: q["config_groups"]["group_0"]["weights"].update(symmetric=False), "weight_zero_point is missing"),
])
def test_unsupported_compressed_tensors_are_named(quantized, tmp_path, edit, needle):
    src = quantized("4bit-sym-g32", "compressed-tensors")
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in src.iterdir():
        bad.joinpath(f.name).write_bytes(f.read_bytes())
    d = json.loads((bad / "config.json").read_text())
    edit(d["quantization_config"])
    (bad / "config.json").write_text(json.dumps(d))
    with pytest.raises(GPTQPluginError, match=needle):
        load_quantized(bad)


def test_compressed_tensors_shape_mismatch_names_the_tensor(quantized, tmp_path):
    src = quantized("4bit-sym-g32", "compressed-tensors")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text((src / "config.json").read_text())
    t = tensors(src)
    t[f"{LAYER}.weight_scale"] = t[f"{LAYER}.weight_scale"][:, :2].contiguous()
    save_file(t, str(bad / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"down_proj\.weight_scale has shape \(64, 2\), expected \[64, 3\]"):
        load_quantized(bad)


def test_config_files_that_disagree_warn(quantized, tmp_path, caplog):
    src = quantized("4bit-sym-g32", "gptq")
    d = tmp_path / "d"
    d.mkdir()
    for f in src.iterdir():
        d.joinpath(f.name).write_bytes(f.read_bytes())
    q = json.loads((d / "quantize_config.json").read_text())
    q["checkpoint_format"] = "gptq_v2"
    (d / "quantize_config.json").write_text(json.dumps(q))
    with caplog.at_level(logging.WARNING, logger="gptq_plugin"):
        qcfg, source = read_quantization_config(d)
    assert source.name == "config.json" and qcfg["checkpoint_format"] == "gptq"
    assert any("quantize_config.json" in r.getMessage() for r in caplog.records)


def test_convert_is_atomic_and_refuses_existing_output(quantized, tmp_path, monkeypatch):
    src = quantized("4bit-sym-g32", "gptq")
    (tmp_path / "out").mkdir()
    with pytest.raises(GPTQPluginError, match="--overwrite"):
        convert_checkpoint(src, tmp_path / "out", "gptq_v2")
    with pytest.raises(GPTQPluginError, match="inside the source model folder"):
        convert_checkpoint(src, src / "sub", "gptq_v2")

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr("safetensors.torch.save_file", boom)
    with pytest.raises(OutputError, match="cannot write .*disk full"):  # one clear error, not the OSError
        convert_checkpoint(src, tmp_path / "fail", "compressed-tensors")
    assert not (tmp_path / "fail").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".fail")]


# --- command line -----------------------------------------------------------------------------------------
def run_cli(*args):
    p = subprocess.run([sys.executable, "-m", "gptq_plugin.cli", *map(str, args)], capture_output=True, text=True,
                       env={**os.environ, "HF_HUB_OFFLINE": "1"})
    return p.returncode, p.stdout, p.stderr


def test_cli_convert_and_inspect(quantized, tmp_path):
    src = quantized("3bit-sym-act-g24", "gptq")
    rc, out, err = run_cli("convert", src, tmp_path / "ct", "--to", "compressed-tensors")
    assert rc == 0, err
    assert "converted 14 layers: gptq -> compressed-tensors" in out
    rc, out, err = run_cli("inspect", tmp_path / "ct", "--json")
    assert rc == 0, err
    info = json.loads(out)
    assert info["format"] == "compressed-tensors" and info["bits"] == 3 and info["n_quantized_layers"] == 14
    assert {"name": LAYER, "in_features": 96, "out_features": 64} in info["layers"]
    rc, out, err = run_cli("inspect", src)
    assert rc == 0 and "format: gptq" in out and "format_check: ok" in out, out + err
    bad = _relabel(quantized("3bit-sym-act-g24", "gptq_v2"), tmp_path / "bad", "gptq")
    rc, out, err = run_cli("inspect", bad)
    assert rc == 0 and "MISLABELLED? looks like 'gptq_v2'" in out, out + err
    rc, out, err = run_cli("convert", bad, tmp_path / "x", "--to", "gptq")
    assert rc == 2 and err.count("error:") == 1 and "--source-format gptq_v2" in err and "Traceback" not in err, err
    rc, out, err = run_cli("convert", src, tmp_path / "y", "--to", "awq")
    assert rc == 2 and "checkpoint format 'awq' is not supported" in err and "Traceback" not in err, err
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
