#!/usr/bin/env python3
"""Layers of a checkpoint built by *real* TGI through the plugin's route (``--quantize gptq``), inside TGI's venv.

TGI's server source comes from ``$TGI_SERVER_SRC`` (a text-generation-inference checkout's ``server/`` folder,
see docs/tgi.md). The worker installs the plugin's route (what ``gptq-plugin-tgi-server`` does), asks TGI's own
``get_loader`` for the checkpoint's loader, reads the checkpoint with TGI's own ``Weights`` and builds every
decoder block's linears the way TGI's Llama does (``TensorParallelColumnLinear.load_multi`` of q/k/v and of
gate/up, ``TensorParallelRowLinear.load`` of o_proj and down_proj) for each rank of each tensor-parallel size. It
runs them on the inputs it is given and writes every rank's output (row-parallel: before the all-reduce) to a
safetensors file; the caller compares them with the core's layers. Prints one JSON object as the last line of
stdout; ``{"skip": reason}`` when TGI cannot be imported here.

    python tgi_worker.py layers CKPT_DIR --inputs in.safetensors --out out.safetensors [--worlds 1 2]

Inputs: ``model.layers.{i}.hidden`` (q/k/v and gate/up), ``model.layers.{i}.self_attn.o_proj`` and
``model.layers.{i}.mlp.down_proj`` (the row layers' whole inputs). Outputs: ``{block}.qkv/{world}/{rank}``,
``{block}.gate_up/{world}/{rank}``, ``{row layer}/{world}/{rank}``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import types
from pathlib import Path


class ProcessGroup:
    """``torch.distributed.ProcessGroup`` as TGI's loaders use it: ``rank()`` and ``size()``."""

    def __init__(self, rank: int, size: int):
        self._rank, self._size = rank, size

    def rank(self) -> int:
        return self._rank

    def size(self) -> int:
        return self._size


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("layers")
    e.add_argument("ckpt_dir")
    e.add_argument("--inputs", required=True)
    e.add_argument("--out", required=True)
    e.add_argument("--worlds", type=int, nargs="+", default=[1, 2])
    return p.parse_args(argv)


def main(args) -> dict:
    import torch
    from safetensors.torch import load_file, save_file

    src = os.environ.get("TGI_SERVER_SRC")
    if not src or not Path(src).is_dir():
        return {"skip": f"TGI_SERVER_SRC={src!r} is not a folder"}
    sys.path.insert(0, src)
    try:
        from text_generation_server.layers.tensor_parallel import TensorParallelColumnLinear, TensorParallelRowLinear
        from text_generation_server.utils import quantization, weights
    except ImportError as e:
        return {"skip": f"TGI's server in {src} cannot be imported ({type(e).__name__}: {e})"}
    from gptq_plugin.adapters import tgi, tgi_launcher

    tgi_launcher.install()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    ckpt = Path(args.ckpt_dir)
    files = sorted(ckpt.glob("*.safetensors"))
    loader = quantization.get_loader(quantize="gptq", model_id=str(ckpt), revision=None)
    if not isinstance(loader, tgi.GPTQPluginWeightsLoader):
        raise SystemExit(f"TGI's get_loader returned {type(loader).__name__}, not the plugin's loader")
    config = types.SimpleNamespace(quantize="gptq")
    xs = load_file(args.inputs)
    blocks = sorted(k[: -len(".hidden")] for k in xs if k.endswith(".hidden"))
    out = {}
    with torch.no_grad():
        for world in args.worlds:
            for rank in range(world):
                w = weights.Weights(files, device=torch.device("cpu"), dtype=torch.float32,
                                    process_group=ProcessGroup(rank, world), weights_loader=loader)
                for p in blocks:
                    x = xs[f"{p}.hidden"]
                    for key, parts in (("qkv", [f"{p}.self_attn.{n}_proj" for n in "qkv"]),
                                       ("gate_up", [f"{p}.mlp.gate_proj", f"{p}.mlp.up_proj"])):
                        layer = TensorParallelColumnLinear.load_multi(config, prefixes=parts, weights=w, bias=False,
                                                                      dim=0)
                        out[f"{p}.{key}/{world}/{rank}"] = layer(x).contiguous()
                    for name in (f"{p}.self_attn.o_proj", f"{p}.mlp.down_proj"):
                        xr = xs[name]
                        k = xr.shape[-1] // world
                        layer = TensorParallelRowLinear.load(config, name, w, bias=False)
                        y = layer(xr[..., rank * k:(rank + 1) * k], reduce=False)
                        out[f"{name}/{world}/{rank}"] = y.contiguous()
    save_file(out, args.out)
    tgi_launcher.uninstall()
    return {"tool": "tgi", "server_src": src, "loader": type(loader).__name__,
            "checkpoint_format": getattr(loader, "checkpoint_format", None), "outputs": len(out)}


if __name__ == "__main__":
    ARGS = parse_args()
    stdout = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    result = main(ARGS)
    print(json.dumps(result), file=stdout, flush=True)
    sys.exit(0)
