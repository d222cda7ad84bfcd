"""For the TGI adapter tests: a stand-in for TGI's ``Weights`` interface, the call patterns of TGI's
tensor-parallel layers, and small GPTQ checkpoints made with the core solver.

The stand-in is written from TGI's documented behaviour (``server/text_generation_server/utils/weights.py`` and
``layers/tensor_parallel.py`` of text-generation-inference v3.3.7): the same method names, arguments, sharding
arithmetic, dtype casts and errors, so the loader is exercised exactly as TGI's models call it, without TGI.
"""

from __future__ import annotations

import json
import os
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from gptq_plugin.config import QuantizeConfig
from gptq_plugin.linear import QuantLinear
from gptq_plugin.packing import pack_qzeros, unpack_qzeros
from gptq_plugin.solver import gptq_quantize

# dtypes that TGI's Weights never casts to the model dtype (quantized payloads)
_KEEP = (torch.float8_e4m3fn, torch.int8, torch.int16, torch.int32, torch.int64)
_KEEP_PARTIAL = (torch.float8_e4m3fn, torch.int8, torch.int16, torch.int32)  # get_partial_sharded's list


class StandInProcessGroup:
    """``torch.distributed.ProcessGroup`` as TGI's loaders use it: ``rank()`` and ``size()``."""

    def __init__(self, rank: int = 0, size: int = 1):
        self._rank, self._size = rank, size

    def rank(self) -> int:
        return self._rank

    def size(self) -> int:
        return self._size


def block_sizes_of(total: int, blocks) -> list[int]:
    """Sizes of the tensors stacked in a dim of ``total``: ``blocks`` equal ones, or proportional to a list."""
    if isinstance(blocks, list):
        assert total % sum(blocks) == 0, f"Cannot split {total} in proportional blocks: {blocks}"
        return [total // sum(blocks) * b for b in blocks]
    assert total % blocks == 0, f"Prepacked is not divisible by {blocks}"
    return [total // blocks] * blocks


class StandInWeights:
    """TGI's ``text_generation_server.utils.weights.Weights``: tensors of several safetensors files, read whole
    or sharded for this rank of ``process_group``; the ``get_weights*`` methods delegate to ``weights_loader``."""

    def __init__(self, filenames, device, dtype, process_group, weights_loader, aliases=None, prefix=None):
        self.routing: dict[str, str] = {}
        for filename in filenames:
            with safe_open(str(filename), framework="pytorch") as f:
                for key in f.keys():
                    if key in self.routing:
                        raise RuntimeError(f"Key {key} was found in multiple files: {filename} and {self.routing[key]}")
                    self.routing[key] = str(filename)
        self.aliases = aliases or {}
        self.device, self.dtype = device, dtype
        self.process_group = process_group
        self.prefix = prefix
        self.weights_loader = weights_loader
        self._handles: dict[str, object] = {}

    # --- raw access ---
    def _handle(self, filename: str):
        if filename not in self._handles:
            self._handles[filename] = safe_open(filename, framework="pytorch")
        return self._handles[filename]

    def get_filename(self, tensor_name: str) -> tuple[str, str]:
        candidates = [tensor_name] + ([f"{self.prefix}.{tensor_name}"] if self.prefix is not None else [])
        for name in candidates:
            for real in [name, *self.aliases.get(name, [])]:
                if real in self.routing:
                    return self.routing[real], real
        raise RuntimeError(f"weight {tensor_name} does not exist")

    def _get_slice(self, tensor_name: str):
        filename, name = self.get_filename(tensor_name)
        return self._handle(filename).get_slice(name)

    def has_tensor(self, tensor_name: str) -> bool:
        try:
            self.get_filename(tensor_name)
        except Exception:
            return False
        return True

    def get_shape(self, tensor_name: str):
        return self._get_slice(tensor_name).get_shape()

    def _finish(self, t: torch.Tensor, keep, to_device: bool, to_dtype: bool) -> torch.Tensor:
        if to_dtype and t.dtype not in keep:
            t = t.to(dtype=self.dtype)
        return t.to(device=self.device) if to_device else t

    def get_tensor(self, tensor_name: str, to_device: bool = True, to_dtype: bool = True) -> torch.Tensor:
        filename, name = self.get_filename(tensor_name)
        return self._finish(self._handle(filename).get_tensor(name), _KEEP, to_device, to_dtype)

    def get_partial_sharded(self, tensor_name: str, dim: int, to_device=True, to_dtype=True) -> torch.Tensor:
        sl = self._get_slice(tensor_name)
        world, rank = self.process_group.size(), self.process_group.rank()
        block = (sl.get_shape()[dim] + world - 1) // world
        if dim == 0:
            t = sl[rank * block:(rank + 1) * block]
        elif dim == 1:
            t = sl[:, rank * block:(rank + 1) * block]
        else:
            raise NotImplementedError("Let's make that generic when needed")
        return self._finish(t, _KEEP_PARTIAL, to_device, to_dtype)

    def get_sharded(self, tensor_name: str, dim: int, to_device=True, to_dtype=True) -> torch.Tensor:
        size, world = self._get_slice(tensor_name).get_shape()[dim], self.process_group.size()
        assert size % world == 0, f"The choosen size {size} is not compatible with sharding on {world} shards"
        return self.get_partial_sharded(tensor_name, dim, to_device=to_device, to_dtype=to_dtype)

    def get_packed_sharded(self, tensor_name: str, dim: int, block_sizes, to_dtype=True) -> torch.Tensor:
        sl = self._get_slice(tensor_name)
        world, rank = self.process_group.size(), self.process_group.rank()
        pieces, offset = [], 0
        for size in block_sizes_of(sl.get_shape()[dim], block_sizes):
            assert size % world == 0, f"Prepacked tensor cannot be sharded across {world} shards"
            lo, hi = offset + rank * (size // world), offset + (rank + 1) * (size // world)
            if dim == 0:
                pieces.append(sl[lo:hi])
            elif dim == 1:
                pieces.append(sl[:, lo:hi])
            else:
                raise NotImplementedError("Currently only dim=0 or dim=1 is supported")
            offset += size
        t = torch.cat(pieces, dim=dim).to(device=self.device)
        return t.to(dtype=self.dtype) if to_dtype and t.dtype not in _KEEP else t

    # --- delegation to the loader ---
    def get_weights(self, prefix: str):
        return self.weights_loader.get_weights(self, prefix)

    def get_weights_col_packed_qkv(self, prefix: str, num_heads: int, num_key_value_heads: int):
        return self.get_weights_col_packed(prefix, [num_heads, num_key_value_heads, num_key_value_heads])

    def get_weights_col_packed_gate_up(self, prefix: str):
        return self.get_weights_col_packed(prefix, 2)

    def get_weights_col_packed(self, prefix: str, block_sizes):
        return self.weights_loader.get_weights_col_packed(self, prefix, block_sizes)

    def get_weights_col(self, prefix: str):
        return self.weights_loader.get_weights_col(self, prefix)

    def get_multi_weights_col(self, prefixes, dim: int):
        return self.weights_loader.get_multi_weights_col(self, prefixes, dim)

    def get_weights_row(self, prefix: str):
        return self.weights_loader.get_weights_row(self, prefix)

    @contextmanager
    def use_loader(self, weights_loader):
        old, self.weights_loader = self.weights_loader, weights_loader
        try:
            yield
        finally:
            self.weights_loader = old

    @property
    def loader(self):
        return self.weights_loader


# --- how TGI's layers (layers/tensor_parallel.py, layers/linear.py) call the loader ---------------------------
def tgi_get_linear(weight, bias):
    """``layers.linear.get_linear``: plain tensors become an unquantized linear, anything else ``get_linear``."""
    if isinstance(weight, torch.Tensor):
        w = weight
        return lambda x: torch.nn.functional.linear(x, w.to(x.dtype), None if bias is None else bias.to(x.dtype))
    return weight.get_linear(bias)


def tgi_load_multi(weights, prefixes, bias: bool):
    """``TensorParallelColumnLinear.load_multi`` (non-exl2)."""
    weight = weights.get_multi_weights_col(prefixes, dim=0)
    b = torch.cat([weights.get_sharded(f"{p}.bias", dim=0) for p in prefixes], dim=0) if bias else None
    return tgi_get_linear(weight, b)


def tgi_load_col(weights, prefix, bias: bool):
    """``TensorParallelColumnLinear.load``."""
    weight = weights.get_weights_col(prefix)
    return tgi_get_linear(weight, weights.get_sharded(f"{prefix}.bias", dim=0) if bias else None)


def tgi_load_row(weights, prefix, bias: bool):
    """``TensorParallelRowLinear.load`` (the bias is added on rank 0 only); the caller all-reduces."""
    weight = weights.get_weights_row(prefix)
    b = weights.get_tensor(f"{prefix}.bias") if bias and weights.process_group.rank() == 0 else None
    return tgi_get_linear(weight, b)


# --- small GPTQ checkpoints made with the core ---------------------------------------------------------------
HIDDEN, HEADS, KV_HEADS, INTERMEDIATE = 160, 4, 2, 224
HEAD_DIM = HIDDEN // HEADS
ATTN = "model.layers.0.self_attn"
MLP = "model.layers.0.mlp"
#: name -> (in_features, out_features, has_bias, input name (layers sharing an input share a Hessian))
LAYERS = {
    f"{ATTN}.q_proj": (HIDDEN, HEADS * HEAD_DIM, True, "h"),
    f"{ATTN}.k_proj": (HIDDEN, KV_HEADS * HEAD_DIM, True, "h"),
    f"{ATTN}.v_proj": (HIDDEN, KV_HEADS * HEAD_DIM, True, "h"),
    f"{ATTN}.o_proj": (HEADS * HEAD_DIM, HIDDEN, False, "a"),
    f"{MLP}.gate_proj": (HIDDEN, INTERMEDIATE, False, "h"),
    f"{MLP}.up_proj": (HIDDEN, INTERMEDIATE, False, "h"),
    f"{MLP}.down_proj": (INTERMEDIATE, HIDDEN, True, "m"),
}
#: fused checkpoint tensors (as Phi-3's qkv_proj, gate_up_proj): layers sharing an input stacked along outputs
FUSED = {f"{ATTN}.qkv_proj": [f"{ATTN}.q_proj", f"{ATTN}.k_proj", f"{ATTN}.v_proj"],
         f"{MLP}.gate_up_proj": [f"{MLP}.gate_proj", f"{MLP}.up_proj"]}
UNQUANTIZED = f"{MLP}.skip_proj"  # listed in modules_to_not_convert


@dataclass
class Checkpoint:
    """A GPTQ checkpoint folder and the core :class:`QuantLinear` of each of its layers (the reference)."""

    path: Path
    config: QuantizeConfig
    refs: dict[str, QuantLinear] = field(default_factory=dict)

    @property
    def files(self) -> list[Path]:
        return sorted(self.path.glob("*.safetensors"))

    def weights(self, loader, rank: int = 0, world: int = 1, dtype=torch.float32) -> StandInWeights:
        return StandInWeights(self.files, torch.device("cpu"), dtype, StandInProcessGroup(rank, world), loader)


# the demo model (SmolLM2-135M-Instruct): checkpoints quantized by the tests, see conftest.demo_checkpoints
DEMO_BLOCKS = 1  # decoder blocks kept: every test below builds each layer 1-3 times and kernels repack on build
#: checkpoint kind -> QuantizeConfig fields
DEMO_KINDS = {
    "4bit-g128": dict(bits=4, group_size=128),
    "3bit-g128-actorder": dict(bits=3, group_size=128, desc_act=True),
}
ENV_DEMO_CHECKPOINTS = "GPTQ_PLUGIN_TGI_DEMO_CHECKPOINTS"


def demo_checkpoint_names() -> list[str]:
    """The keys of :func:`demo_checkpoints`: the folders in ``$GPTQ_PLUGIN_TGI_DEMO_CHECKPOINTS`` when set, else
    the kinds the tests quantize."""
    given = [p for p in os.environ.get(ENV_DEMO_CHECKPOINTS, "").split(":") if p]
    return given or list(DEMO_KINDS)


CASES = {
    "4bit-g16": dict(bits=4, group_size=16, desc_act=False, sym=True),
    "4bit-g16-actorder-asym": dict(bits=4, group_size=16, desc_act=True, sym=False),
    "3bit-g64-actorder": dict(bits=3, group_size=64, desc_act=True, sym=True),
    "3bit-g64-asym": dict(bits=3, group_size=64, desc_act=False, sym=False),
    "2bit-gall-v2": dict(bits=2, group_size=-1, desc_act=False, sym=False, checkpoint_format="gptq_v2"),
    "8bit-g32-actorder-static": dict(bits=8, group_size=32, desc_act=True, sym=True, static_groups=True),
}


def make_checkpoint(path: Path, seed: int = 0, **cfg) -> Checkpoint:
    """Quantize random layers (``LAYERS``) with GPTQ on random inputs whose channels differ in scale (so
    act-order permutes), and save them as a two-file GPTQ checkpoint with ``config.json``."""
    config = QuantizeConfig(**cfg)
    gen = torch.Generator().manual_seed(seed)
    hessians = {}
    for key, k in (("h", HIDDEN), ("a", HEADS * HEAD_DIM), ("m", INTERMEDIATE)):
        x = torch.randn(4 * k, k, generator=gen) * torch.exp(torch.randn(k, generator=gen))
        hessians[key] = 2 * x.t() @ x / x.shape[0]
    ckpt = Checkpoint(path, config)
    tensors: dict[str, torch.Tensor] = {}
    for name, (k, n, has_bias, inp) in LAYERS.items():
        W = torch.randn(n, k, generator=gen) / k**0.5
        bias = torch.randn(n, generator=gen).half() if has_bias else None
        result = gptq_quantize(W, hessians[inp], config, name)
        ref = QuantLinear.from_result(result, config.group_size, bias, config.sym)
        ckpt.refs[name] = ref
    for name, parts in FUSED.items():  # same input, so same act-order permutation and g_idx
        refs = [ckpt.refs[p] for p in parts]
        fused = QuantLinear(HIDDEN, sum(r.out_features for r in refs), config.bits, config.group_size, sym=config.sym)
        fused.qweight.copy_(torch.cat([r.qweight for r in refs], dim=1))
        fused.scales.copy_(torch.cat([r.scales for r in refs], dim=1))
        fused.g_idx.copy_(refs[0].g_idx)
        zeros = torch.cat([unpack_qzeros(r.qzeros, config.bits, r.out_features) for r in refs], dim=1)
        fused.qzeros.copy_(pack_qzeros(zeros, config.bits))
        ckpt.refs[name] = fused
    for name, ref in ckpt.refs.items():
        for key, t in ref.state_dict().items():
            if key == "qzeros" and config.checkpoint_format == "gptq_v2":
                t = pack_qzeros(unpack_qzeros(t, config.bits, ref.out_features, "gptq"), config.bits, "gptq_v2")
            tensors[f"{name}.{key}"] = t.contiguous()
    tensors[f"{UNQUANTIZED}.weight"] = (torch.randn(HIDDEN, HIDDEN, generator=gen) / HIDDEN**0.5).half()
    names = sorted(tensors)
    path.mkdir(parents=True, exist_ok=True)
    index = {}
    for i, part in enumerate((names[: len(names) // 2], names[len(names) // 2:])):
        fname = f"model-{i + 1:05d}-of-00002.safetensors"
        save_file({k: tensors[k] for k in part}, str(path / fname), metadata={"format": "pt"})
        index.update({k: fname for k in part})
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": index}))
    qc = config.to_dict()
    qc["modules_to_not_convert"] = ["skip_proj"]
    (path / "config.json").write_text(json.dumps({"model_type": "llama", "quantization_config": qc}))
    return ckpt


# --- comparing outputs ---------------------------------------------------------------------------------------
def loader_of(ckpt):
    """The plugin's TGI loader for the ``quantization_config`` of a :class:`Checkpoint` or checkpoint folder."""
    from gptq_plugin.adapters.tgi import GPTQPluginWeightsLoader

    path = ckpt.path if isinstance(ckpt, Checkpoint) else Path(ckpt)
    d = json.loads((path / "config.json").read_text())["quantization_config"]
    return GPTQPluginWeightsLoader.from_quantization_config(d)


def inputs(k: int, dtype=torch.float32, seed: int = 1) -> torch.Tensor:
    return torch.randn(3, 5, k, generator=torch.Generator().manual_seed(seed)).to(dtype)


def cols(y: torch.Tensor, sizes: list[int], rank: int, world: int) -> torch.Tensor:
    """The output columns rank ``rank`` holds of a column-parallel layer stacking blocks of ``sizes``."""
    parts, start = [], 0
    for s in sizes:
        parts.append(y[..., start + rank * s // world:start + (rank + 1) * s // world])
        start += s
    return torch.cat(parts, dim=-1)


def close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    scale = expected.abs().max().item()
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5 * scale)


def core_layers(path) -> dict[str, QuantLinear]:
    """The core :class:`QuantLinear` of every quantized layer of a checkpoint folder, read straight from its
    tensors (v2 zeros converted to the core's v1), without Transformers."""
    from safetensors.torch import load_file

    cfg = QuantizeConfig.from_pretrained(path)
    tensors: dict[str, torch.Tensor] = {}
    for f in sorted(Path(path).glob("*.safetensors")):
        tensors.update(load_file(str(f)))
    layers = {}
    for name in sorted(k[: -len(".qweight")] for k in tensors if k.endswith(".qweight")):
        k, n = tensors[f"{name}.g_idx"].numel(), tensors[f"{name}.scales"].shape[1]
        layer = QuantLinear(k, n, cfg.bits, cfg.group_size, f"{name}.bias" in tensors, cfg.sym)
        state = {key: tensors[f"{name}.{key}"] for key in layer.state_dict()}
        if cfg.checkpoint_format == "gptq_v2":
            state["qzeros"] = pack_qzeros(unpack_qzeros(state["qzeros"], cfg.bits, n, "gptq_v2"), cfg.bits)
        layer.load_state_dict(state)
        layer.validate(name)
        layers[name] = layer
    return layers


# --- a tiny OPT for TGI's gRPC server (TGI serves OPT on a plain CPU through its own modelling code) ----------
def make_tiny_opt(path: Path, seed: int = 0, **cfg):
    """A 2-layer random OPT with a word-level tokenizer, GPTQ-quantized layer by layer with the core solver on
    random calibration tokens, saved as a GPTQ checkpoint at ``path``.

    Returns:
        The model in memory with :class:`QuantLinear` layers (the core's reference), in fp16.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import OPTConfig, OPTForCausalLM, PreTrainedTokenizerFast

    from gptq_plugin.solver import HessianAccumulator

    words = ["<pad>", "<s>", "</s>", "<unk>"] + [f"w{i}" for i in range(250)] + \
        "the capital of france is paris and a city in europe".split()
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                        unk_token="<unk>")
    torch.manual_seed(seed)
    model = OPTForCausalLM(OPTConfig(
        vocab_size=len(words), hidden_size=64, num_hidden_layers=2, ffn_dim=256, num_attention_heads=4,
        max_position_embeddings=128, word_embed_proj_dim=64, init_std=0.2, pad_token_id=0, bos_token_id=1,
        eos_token_id=2)).float().eval()
    config = QuantizeConfig(**cfg)
    accs, hooks = {}, []
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and ".layers." in name:
            accs[name] = HessianAccumulator(mod.in_features)
            hooks.append(mod.register_forward_pre_hook(lambda m, a, acc=accs[name]: acc.add_batch(a[0])))
    with torch.no_grad():
        model(torch.randint(4, len(words), (8, 32), generator=torch.Generator().manual_seed(seed)))
    for h in hooks:
        h.remove()
    for name, acc in accs.items():
        mod = model.get_submodule(name)
        result = gptq_quantize(mod.weight.data, acc.finalize(), config, name)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child,
                QuantLinear.from_result(result, config.group_size, mod.bias.data, config.sym))
    model = model.half()
    path.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}  # tied
    save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})
    hf_config = model.config.to_dict()
    hf_config["quantization_config"] = config.to_dict()
    hf_config["torch_dtype"] = "float16"
    (path / "config.json").write_text(json.dumps(hf_config, indent=2))
    tokenizer.save_pretrained(str(path))
    return model
