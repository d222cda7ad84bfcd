"""The TGI adapter against TGI's real server source, on CPU.

Runs when ``TGI_SERVER_SRC`` points at the ``server/`` folder of a text-generation-inference checkout whose
Python dependencies (and generated ``text_generation_server/pb``) are importable here; see docs/tgi.md. It imports
TGI's real ``Weights``, ``get_loader`` and tensor-parallel layer classes, installs the plugin's route, and checks
that the layers TGI builds through it equal the core's :class:`QuantLinear`, for TP sizes 1 and 2.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import pytest
import torch

from gptq_plugin.adapters import tgi, tgi_launcher

from tgi_standin import (
    ATTN, FUSED, HEAD_DIM, HEADS, HIDDEN, INTERMEDIATE, KV_HEADS, LAYERS, MLP, StandInProcessGroup, close, cols,
    core_layers, inputs, make_tiny_opt,
)

TGI_SRC = os.environ.get("TGI_SERVER_SRC")
pytestmark = pytest.mark.skipif(not TGI_SRC, reason="TGI_SERVER_SRC is not set: point it at a "
                                "text-generation-inference checkout's server/ folder to run these (docs/tgi.md)")


@pytest.fixture(scope="module")
def real_tgi():
    """TGI's real modules, with the plugin's route installed."""
    sys.path.insert(0, TGI_SRC)
    try:
        from text_generation_server.layers.tensor_parallel import TensorParallelColumnLinear, TensorParallelRowLinear
        from text_generation_server.utils import quantization, weights
    except ImportError as e:
        pytest.skip(f"TGI's server in {TGI_SRC} cannot be imported here ({type(e).__name__}: {e}): install its "
                    "Python dependencies and generate text_generation_server/pb (docs/tgi.md)")
    finally:
        sys.path.remove(TGI_SRC)
    tgi_launcher.install()
    yield types.SimpleNamespace(quantization=quantization, weights=weights, Column=TensorParallelColumnLinear,
                                Row=TensorParallelRowLinear, config=types.SimpleNamespace(quantize="gptq"))
    tgi_launcher.uninstall()


def real_weights(real_tgi, ckpt, rank: int, world: int, dtype=torch.float32):
    """TGI's own ``Weights`` over the checkpoint, with the loader TGI's ``get_loader`` returns."""
    loader = real_tgi.quantization.get_loader(quantize="gptq", model_id=str(ckpt.path), revision=None)
    assert isinstance(loader, tgi.GPTQPluginWeightsLoader)
    assert isinstance(loader, real_tgi.weights.WeightsLoader)
    return real_tgi.weights.Weights(ckpt.files, device=torch.device("cpu"), dtype=dtype,
                                    process_group=StandInProcessGroup(rank, world), weights_loader=loader)


@pytest.fixture(scope="session")
def ct_copies(tmp_path_factory):
    """``copy(ckpt)``: the compressed-tensors conversion of a :class:`Checkpoint` (same refs), made once."""
    import dataclasses

    from gptq_plugin.convert import convert_checkpoint

    cache = {}

    def copy(ckpt):
        if ckpt.path not in cache:
            out = tmp_path_factory.mktemp("ct") / "ct"
            convert_checkpoint(ckpt.path, out, "compressed-tensors")
            cache[ckpt.path] = dataclasses.replace(ckpt, path=out)
        return cache[ckpt.path]

    return copy


@pytest.mark.parametrize("fmt", ["gptq", "compressed-tensors"])
@pytest.mark.parametrize("world", [1, 2])
def test_tgi_layers_through_the_plugin_equal_the_core(real_tgi, checkpoint, world, fmt, ct_copies):
    """TGI's TensorParallelColumnLinear.load_multi/load_qkv/load_gate_up/load and TensorParallelRowLinear.load
    on TGI's Weights, for every rank; ranks' outputs reassembled as TGI's collectives would. The checkpoint as
    written (GPTQ) and converted to compressed-tensors (served with ``--quantize gptq`` through the same route)."""
    if fmt == "compressed-tensors":
        checkpoint = ct_copies(checkpoint)
    Column, Row, config = real_tgi.Column, real_tgi.Row, real_tgi.config
    x = inputs(HIDDEN)
    qkv_sizes = [HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM]
    q_k_v = [f"{ATTN}.q_proj", f"{ATTN}.k_proj", f"{ATTN}.v_proj"]
    expected_qkv = torch.cat([checkpoint.refs[p](x) for p in q_k_v], dim=-1)
    expected_fused_qkv = checkpoint.refs[f"{ATTN}.qkv_proj"](x)
    expected_gate_up = checkpoint.refs[f"{MLP}.gate_up_proj"](x)
    expected_k = checkpoint.refs[f"{ATTN}.k_proj"](x)
    rows = {f"{ATTN}.o_proj": False, f"{MLP}.down_proj": True}
    partial = {name: 0 for name in rows}
    for rank in range(world):
        weights = real_weights(real_tgi, checkpoint, rank, world)
        layer = Column.load_multi(config, prefixes=q_k_v, weights=weights, bias=True, dim=0)
        assert isinstance(layer.linear, tgi.QuantLinear)
        close(layer(x), cols(expected_qkv, qkv_sizes, rank, world))
        layer = Column.load_qkv(config, f"{ATTN}.qkv_proj", weights, bias=False, num_heads=HEADS,
                                num_key_value_heads=KV_HEADS)
        close(layer(x), cols(expected_fused_qkv, qkv_sizes, rank, world))
        layer = Column.load_gate_up(config, f"{MLP}.gate_up_proj", weights, bias=False)
        close(layer(x), cols(expected_gate_up, [INTERMEDIATE, INTERMEDIATE], rank, world))
        layer = Column.load(config, f"{ATTN}.k_proj", weights, bias=True)
        close(layer(x), cols(expected_k, [KV_HEADS * HEAD_DIM], rank, world))
        for name, bias in rows.items():
            k = LAYERS[name][0]
            layer = Row.load(config, name, weights, bias=bias)
            xk = inputs(k, seed=2)[..., rank * k // world:(rank + 1) * k // world]
            partial[name] = partial[name] + layer(xk, reduce=False)  # all_reduce(sum) across ranks
    for name in rows:
        close(partial[name], checkpoint.refs[name](inputs(LAYERS[name][0], seed=2)))


def test_get_weights_through_tgi_weights(real_tgi, checkpoint):
    weights = real_weights(real_tgi, checkpoint, 0, 1, dtype=torch.float16)
    for name in [*LAYERS, *FUSED]:
        w = weights.get_weights(name)
        assert isinstance(w, real_tgi.weights.Weight)
        layer = w.get_linear(weights.get_tensor(f"{name}.bias") if LAYERS.get(name, (0, 0, False))[2] else None)
        x = inputs(layer.in_features, torch.float16)
        assert torch.equal(layer(x), checkpoint.refs[name](x)), name


def _run(code: str, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter with TGI's source on the path."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [TGI_SRC, os.environ.get("PYTHONPATH")])))
    env.setdefault("ATTENTION", "paged")  # set by TGI's launcher for the shards; read when models/ is imported
    env.setdefault("PREFIX_CACHING", "0")
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=env,
                          timeout=timeout, cwd=TGI_SRC)


@pytest.mark.slow
def test_model_modules_see_the_route(real_tgi, ckpts):
    """In a fresh interpreter, as under ``gptq-plugin-tgi-server``: install, then import TGI's model modules (which
    bind ``get_loader`` by name) and ask them for a loader; and the other order (modules imported first)."""
    path = ckpts["3bit-g64-actorder"].path
    code = f"""
        from gptq_plugin.adapters import tgi_launcher
        order = "ORDER"
        if order == "install-first":
            tgi_launcher.install()
        from text_generation_server.models import causal_lm, seq2seq_lm
        if order != "install-first":
            tgi_launcher.install()
        for mod in (causal_lm, seq2seq_lm):
            loader = mod.get_loader(quantize="gptq", model_id="{path}", revision=None)
            print(mod.__name__, type(loader).__name__, loader.bits, loader.desc_act)
    """
    for order in ("install-first", "import-first"):
        proc = _run(code.replace("ORDER", order))
        assert proc.returncode == 0, proc.stderr[-3000:]
        lines = [line for line in proc.stdout.splitlines() if line.startswith("text_generation_server.models")]
        assert lines == [f"text_generation_server.models.{m} GPTQPluginWeightsLoader 3 True"
                         for m in ("causal_lm", "seq2seq_lm")], proc.stdout[-3000:]


@pytest.mark.slow
def test_wrapper_runs_tgi_cli(real_tgi):
    """``gptq-plugin-tgi-server`` is TGI's ``text-generation-server`` CLI, with the route installed first."""
    proc = _run("""
        import sys
        from gptq_plugin.adapters.tgi_launcher import main
        sys.exit(main(["serve", "--help"]))
    """)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "--quantize" in proc.stdout and "gptq" in proc.stdout


@pytest.mark.integration
@pytest.mark.parametrize("world", [1, 2])
def test_demo_model_layers_through_real_tgi(real_tgi, demo_checkpoints, world):
    """The demo model's GPTQ checkpoints (4-bit; 3-bit act-order) loaded the way TGI's Llama loads them, on TGI's
    own Weights and layer classes, equal the core's QuantLinear."""
    Column, Row, config = real_tgi.Column, real_tgi.Row, real_tgi.config
    for path in demo_checkpoints.values():
        refs = core_layers(path)
        ckpt = types.SimpleNamespace(path=path, files=sorted(path.glob("*.safetensors")))
        blocks = sorted({int(name.split(".")[2]) for name in refs})
        for i in (blocks[0], blocks[-1]):
            p = f"model.layers.{i}"
            hidden = refs[f"{p}.self_attn.q_proj"].in_features
            x = inputs(hidden)
            q_k_v = [f"{p}.self_attn.{n}_proj" for n in "qkv"]
            g_u = [f"{p}.mlp.gate_proj", f"{p}.mlp.up_proj"]
            qkv, gate_up = [refs[n](x) for n in q_k_v], [refs[n](x) for n in g_u]
            rows = {n: inputs(refs[n].in_features, seed=2) for n in (f"{p}.self_attn.o_proj", f"{p}.mlp.down_proj")}
            partial = {n: 0 for n in rows}
            for rank in range(world):
                weights = real_weights(real_tgi, ckpt, rank, world)
                layer = Column.load_multi(config, prefixes=q_k_v, weights=weights, bias=False, dim=0)
                close(layer(x), cols(torch.cat(qkv, -1), [t.shape[-1] for t in qkv], rank, world))
                layer = Column.load_multi(config, prefixes=g_u, weights=weights, bias=False, dim=0)
                close(layer(x), cols(torch.cat(gate_up, -1), [t.shape[-1] for t in gate_up], rank, world))
                for n, xr in rows.items():
                    k = xr.shape[-1] // world
                    partial[n] = partial[n] + Row.load(config, n, weights, bias=False)(xr[..., rank * k:(rank + 1) * k],
                                                                                      reduce=False)
            for n, xr in rows.items():
                close(partial[n], refs[n](xr))


@pytest.mark.slow
def test_tgi_grpc_server_generates_like_the_core(real_tgi, tmp_path):
    """TGI's gRPC server, started by ``gptq-plugin-tgi-server serve CKPT --quantize gptq`` on CPU, serves a 3-bit
    act-order GPTQ checkpoint (a tiny OPT: TGI runs OPT on CPU with its own layers, so through the loader) and
    generates the same greedy tokens as the core's QuantLinear model."""
    import tempfile
    import time

    import grpc
    from text_generation_server.pb import generate_pb2 as pb
    from text_generation_server.pb import generate_pb2_grpc

    ckpt = tmp_path / "opt-3bit-actorder"
    core = make_tiny_opt(ckpt, bits=3, group_size=32, desc_act=True)
    sock = Path(tempfile.mkdtemp(prefix="tgi")) / "sock"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [TGI_SRC, os.environ.get("PYTHONPATH")])),
               ATTENTION="paged", PREFIX_CACHING="0", HF_HUB_OFFLINE="1")
    log = tmp_path / "server.log"
    with open(log, "w") as out:
        server = subprocess.Popen([sys.executable, "-m", "gptq_plugin.adapters.tgi_launcher", "serve", str(ckpt),
                                   "--quantize", "gptq", "--uds-path", str(sock)], stdout=out, stderr=subprocess.STDOUT,
                                  env=env, cwd=TGI_SRC)
    try:
        deadline = time.time() + 600
        while not Path(f"{sock}-0").exists():
            assert server.poll() is None, f"TGI's server exited with {server.returncode}:\n{log.read_text()[-4000:]}"
            assert time.time() < deadline, f"TGI's server did not start:\n{log.read_text()[-4000:]}"
            time.sleep(1)
        stub = generate_pb2_grpc.TextGenerationServiceStub(grpc.insecure_channel(f"unix://{sock}-0"))
        assert stub.Info(pb.InfoRequest()).device_type == "cpu"

        def request(rid: int, new_tokens: int):
            text = "the capital of france is"
            return pb.Request(
                id=rid, inputs=text, input_chunks=pb.Input(chunks=[pb.InputChunk(text=text)]), truncate=64,
                parameters=pb.NextTokenChooserParameters(temperature=1.0, top_p=1.0, typical_p=1.0,
                                                         repetition_penalty=1.0),
                stopping_parameters=pb.StoppingCriteriaParameters(max_new_tokens=new_tokens, ignore_eos_token=True),
                prefill_logprobs=True)

        stub.Warmup(pb.WarmupRequest(batch=pb.Batch(id=0, requests=[request(0, 2)], size=1, max_tokens=128),
                                     max_input_tokens=64, max_prefill_tokens=128, max_total_tokens=128))
        stub.ClearCache(pb.ClearCacheRequest())
        resp = stub.Prefill(pb.PrefillRequest(batch=pb.Batch(id=1, requests=[request(1, 8)], size=1, max_tokens=128)))
        prompt = list(resp.generations[0].prefill_tokens.ids)
        ids, logprobs = list(resp.generations[0].tokens.ids), list(resp.generations[0].tokens.logprobs)
        batch = resp.batch
        while len(ids) < 8:
            resp = stub.Decode(pb.DecodeRequest(batches=[batch]))
            ids += resp.generations[0].tokens.ids
            logprobs += resp.generations[0].tokens.logprobs
            batch = resp.batch
    finally:
        server.terminate()
        server.wait(timeout=60)
    assert "gptq-plugin: loading GPTQ weights" in log.read_text()
    with torch.no_grad():
        out = core.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False, output_scores=True,
                            return_dict_in_generate=True, pad_token_id=0)
    expected = out.sequences[0, len(prompt):].tolist()
    assert ids == expected
    expected_lp = [torch.log_softmax(s.float(), -1)[0, t].item() for s, t in zip(out.scores, expected)]
    torch.testing.assert_close(torch.tensor(logprobs), torch.tensor(expected_lp), rtol=0, atol=2e-2)
