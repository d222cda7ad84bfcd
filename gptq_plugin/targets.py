"""Does a checkpoint meet another runtime's GPTQ import preconditions? (``gptq-plugin check-target``)

TensorRT-LLM (``--weight_only_precision int4_gptq``; its Llama ``load_weights_from_gptq`` in
``tensorrt_llm/models/llama/convert.py``, read Dec 2026) opens ONE safetensors file (``--quant_ckpt_path``) and reads,
per decoder block ``model.layers.N.``, ``self_attn.{q,k,v,o}_proj`` and ``mlp.{gate,up,down}_proj`` as
``qweight``/``qzeros``/``scales`` only: ``qweight`` nibbles become signed int4 (``code - 8``), the zero term is
``(7 - stored_zero) * scale`` (the v1 convention, "GPTQ-for-LLaMa added 1 to zeros"), the scales are taken as fp16,
and ``g_idx`` is never read (so groups must be in input order). It also reads ``model.embed_tokens.weight``,
``lm_head.weight`` (unquantized, even for tied embeddings), ``model.norm.weight`` and both layer norms. Its group-wise
int4 GEMM takes groups of 64 or 128. The PyTorch backend's HF GPTQ W4A16 path has the same limits (4-bit,
group 64/128, no act-order).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .errors import GPTQPluginError
from .packing import unpack_qzeros
from .reader import open_checkpoint
from .safetensors_io import checkpoint_files

TARGETS = ("tensorrt-llm",)
TRT_GROUP_SIZES = (64, 128)
TRT_PROJECTIONS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                   "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


@dataclass
class Check:
    """One precondition: ``name``, whether it holds (``ok``) and ``detail`` (what was seen, and the fix if not)."""

    name: str
    ok: bool
    detail: str


@dataclass
class TargetReport:
    """The verdict of :func:`check_target`: ``ok`` when every check holds; ``commands`` to run for a passing one."""

    target: str
    path: str
    checks: list[Check] = field(default_factory=list)
    commands: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)

    def to_dict(self) -> dict:
        return {"target": self.target, "path": self.path, "ok": self.ok, "checks": [asdict(c) for c in self.checks],
                "commands": self.commands}

    def describe(self) -> str:
        head = f"{self.path}: {'meets' if self.ok else 'does NOT meet'} {self.target}'s GPTQ import preconditions"
        lines = [head] + [f"  [{'ok' if c.ok else 'FAIL'}] {c.name}: {c.detail}" for c in self.checks]
        if self.ok and self.commands:
            lines += ["then:"] + [f"  {c}" for c in self.commands]
        return "\n".join(lines)


def check_target(path: str | Path, target: str = "tensorrt-llm") -> TargetReport:
    """Check the checkpoint folder ``path`` against ``target``'s GPTQ import (see the module docstring).

    Returns:
        A :class:`TargetReport` with one :class:`Check` per precondition.

    Raises:
        GPTQPluginError: an unknown ``target``. CheckpointError: the folder is not a readable quantized checkpoint.
    """
    if target not in TARGETS:
        raise GPTQPluginError(f"--target {target}: known targets {', '.join(TARGETS)}")
    return _check_tensorrt_llm(Path(path))


def _check_tensorrt_llm(path: Path) -> TargetReport:
    ck = open_checkpoint(path)
    cfg, fmt = ck.config, ck.format.name
    rep = TargetReport("tensorrt-llm", str(path))
    add = lambda name, ok, detail: rep.checks.append(Check(name, bool(ok), detail))  # noqa: E731

    config = json.loads((path / "config.json").read_text()) if (path / "config.json").is_file() else {}
    arch = (config.get("architectures") or [{"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM"}.get(
        config.get("model_type"), config.get("model_type", "?"))])[0]
    add("architecture", arch in ("LlamaForCausalLM", "MistralForCausalLM"),
        f"{arch} (checked against TensorRT-LLM's Llama GPTQ loader; other families have their own loaders)")
    add("bits", cfg.bits == 4, f"{cfg.bits}-bit" + ("" if cfg.bits == 4 else ": int4_gptq reads 4-bit codes only; "
                                                    "re-quantize with --bits 4"))
    add("group size", cfg.group_size in TRT_GROUP_SIZES,
        f"{cfg.group_size}" + ("" if cfg.group_size in TRT_GROUP_SIZES else
                               f": the group-wise int4 GEMM takes {' or '.join(map(str, TRT_GROUP_SIZES))}; "
                               "re-quantize with --group-size 128 (or 64)"))
    add("zero-point convention", fmt == "gptq",
        "v1 ('gptq': qzeros store zero - 1)" if fmt == "gptq" else
        f"{fmt}: TensorRT-LLM adds 1 to stored zeros (v1); convert with `gptq-plugin convert {path} OUT --to gptq`")
    files = checkpoint_files(path)
    add("one safetensors file", len(files) == 1 and files[0].suffix == ".safetensors",
        f"{len(files)} weight file(s)" + ("" if len(files) == 1 else ": --quant_ckpt_path takes one file; merge the "
                                          "shards into one model.safetensors"))

    bad_order, partial, zero0, not_fp16, missing = [], [], [], [], []
    for p in ck.layers:
        t = ck.layer(p)
        k, n = int(t["g_idx"].numel()), int(t["scales"].shape[1])
        if cfg.group_size > 0:
            if not torch.equal(t["g_idx"].long(), torch.arange(k) // cfg.group_size):
                bad_order.append(p)
            if k % cfg.group_size:
                partial.append(f"{p} (in_features {k})")
        if bool((unpack_qzeros(t["qzeros"], cfg.bits, n, "gptq") == 0).any()):
            zero0.append(p)
        if t["scales"].dtype != torch.float16:
            not_fp16.append(f"{p} ({t['scales'].dtype})")
    first = lambda xs: f"{len(xs)} layers, e.g. {xs[0]}"  # noqa: E731
    add("groups in input order", not bad_order,
        "g_idx = i // group_size in every layer (act-order with static groups qualifies)" if not bad_order else
        f"{first(bad_order)}: TensorRT-LLM ignores g_idx, so act-order with dynamic groups is read wrongly; "
        "re-quantize with --static-groups or --no-act-order")
    add("whole groups", not partial, "every in_features is a multiple of the group size" if not partial else
        f"{first(partial)} ends in a partial group, which the group-wise kernel does not take")
    add("zero points 1..15", not zero0, "no zero point of 0" if not zero0 else
        f"{first(zero0)} has a zero point of 0, stored as 15 in v1, which TensorRT-LLM reads as 16 (no wrap-around); "
        "use a symmetric recipe (--sym)")
    add("fp16 scales", not not_fp16, "float16" if not not_fp16 else f"{first(not_fp16)}: the loader takes fp16 scales")

    have = set(ck.layers)
    blocks = sorted({int(p.split(".")[2]) for p in have if p.startswith("model.layers.")})
    for b in blocks:
        missing += [f"model.layers.{b}.{s}" for s in TRT_PROJECTIONS if f"model.layers.{b}.{s}" not in have]
    extra = sorted(have - {f"model.layers.{b}.{s}" for b in blocks for s in TRT_PROJECTIONS})
    add("quantized layer names", not missing and not extra,
        "q/k/v/o_proj and gate/up/down_proj in every block" if not missing and not extra else
        (f"missing {first(missing)}" if missing else f"unexpected quantized {first(extra)}")
        + ": the loader reads exactly the seven Llama projections per block")
    need = ["model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"]
    absent = [n for n in need if n not in ck.state]
    add("unquantized tensors", not absent, "embed_tokens, norm and lm_head present" if not absent else
        f"missing {', '.join(absent)}" + (" (tied embeddings: the loader still reads lm_head.weight; save the "
                                          "checkpoint with an untied copy)" if "lm_head.weight" in absent else ""))
    rep.commands = [
        f"python examples/llama/convert_checkpoint.py --model_dir ORIGINAL_HF_MODEL --output_dir ./tllm_ckpt "
        f"--dtype float16 --use_weight_only --weight_only_precision int4_gptq --per_group --group_size {cfg.group_size} "
        f"--quant_ckpt_path {files[0] if files else path / 'model.safetensors'}",
        "trtllm-build --checkpoint_dir ./tllm_ckpt --output_dir ./engine --gemm_plugin float16",
    ]
    return rep
