"""Export a GPTQ checkpoint to one GGUF file for llama.cpp and Ollama, keeping the solved weights exactly.

``export_gguf(CKPT, OUT.gguf)`` reads the checkpoint through the core reader (GPTQ v1/v2 or compressed-tensors ->
the in-memory v1 layout), writes every quantized layer as the GGML block type that holds it bit for bit
(:mod:`gptq_plugin.gguf_blocks`: symmetric 2/3/4-bit -> Q4_0, asymmetric 4-bit -> Q5_0, 8-bit -> Q8_0), the other
tensors (embeddings, norms, ``lm_head``) as F16/BF16/F32 or Q8_0, and the architecture's metadata, tensor names
and tokenizer under llama.cpp's keys, all through gguf-py (``GGUFWriter``, ``get_tensor_name_map``,
``SpecialVocab``). Next to it goes an Ollama ``Modelfile``.

Llama's attention: llama.cpp's rotary embedding pairs dimensions ``(i, i + d/2)`` of a head the way Meta's
original weights did, so a Hugging Face Llama's ``q_proj``/``k_proj`` rows are permuted within each head on the
way to GGUF (llama.cpp's converter does the same; Transformers' GGUF loader undoes it). Rows are output
channels and GGML blocks run along the inputs, so permuting a quantized layer's rows (codes, scales, zeros) is exact.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .config import _version
from .gguf_blocks import BLOCK_TYPES, QK, EncodedLayer, GGUFExportError, GPTQLayer, encode_layer, ggml_type
from .reader import read_checkpoint

log = logging.getLogger(__name__)

#: Hugging Face architectures -> GGUF architecture (both use Llama's attention permutation)
ARCHITECTURES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "llama"}
_MODEL_TYPES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM"}  # config.json without architectures
OUTTYPES = ("f16", "bf16", "f32", "q8_0")
#: Hugging Face pre-tokenizers (tokenizer.json) -> llama.cpp's ``tokenizer.ggml.pre``
_DIGITS = {"type": "Digits", "individual_digits": True}


def _byte_level(p: dict) -> bool:
    return p.get("type") == "ByteLevel" and p.get("use_regex", True) and not p.get("add_prefix_space", False)


@dataclass
class LayerReport:
    """How one quantized layer was written: ``name`` (checkpoint), ``gguf_name``, ``qtype``, ``exact``,
    ``max_abs_err`` and ``rel_err`` (0 when exact), ``note`` (why approximate)."""

    name: str
    gguf_name: str
    qtype: str
    exact: bool
    max_abs_err: float = 0.0
    rel_err: float = 0.0
    note: str = ""


@dataclass
class ExportReport:
    """What :func:`export_gguf` wrote: ``path`` (the .gguf), ``modelfile`` (or None), per-layer ``layers``,
    ``other`` (GGUF name -> type of every other tensor), ``nbytes`` (file size)."""

    path: Path
    modelfile: Path | None
    layers: list[LayerReport] = field(default_factory=list)
    other: dict[str, str] = field(default_factory=dict)
    nbytes: int = 0

    @property
    def exact(self) -> bool:
        return all(l.exact for l in self.layers)

    def summary(self) -> str:
        """A few lines for the CLI: types used, exactness, approximate layers with their errors."""
        counts: dict[str, int] = {}
        for l in self.layers:
            counts[l.qtype] = counts.get(l.qtype, 0) + 1
        kinds = ", ".join(f"{n} {t.upper()}" for t, n in sorted(counts.items()))
        lines = [f"wrote {self.path} ({self.nbytes / 1e6:.1f} MB): {len(self.layers)} quantized layers ({kinds}), "
                 f"{'all exact' if self.exact else 'some approximate'}; {len(self.other)} other tensors"]
        for l in self.layers:
            if not l.exact:
                lines.append(f"  approximate {l.name} -> {l.qtype.upper()}: max abs error {l.max_abs_err:.3g}, "
                             f"relative {l.rel_err:.3g}")
        if self.modelfile:
            lines.append(f"Ollama: ollama create NAME -f {self.modelfile}")
        return "\n".join(lines)


# --- checks -------------------------------------------------------------------------------------------------
def _check_paths(ckpt: Path, out: Path, overwrite: bool, modelfile: bool) -> None:
    if out.suffix != ".gguf":
        raise GGUFExportError(f"output {out}: name the file NAME.gguf (llama.cpp and Ollama look for .gguf)")
    if ckpt == out or ckpt in out.parents:
        raise GGUFExportError(f"output {out} is inside the checkpoint folder {ckpt}: write it outside (the checkpoint "
                              "is never modified)")
    targets = [out] + ([out.parent / "Modelfile"] if modelfile else [])
    for t in targets:
        if t.exists() and not overwrite:
            extra = " or --no-modelfile" if t.name == "Modelfile" else ""
            raise GGUFExportError(f"output {t} already exists: pass --overwrite{extra} to replace it, or choose "
                                  "another path")
        if t.exists() and not t.is_file():
            raise GGUFExportError(f"output {t} exists and is not a file: remove it or choose another path")


def _model_config(ckpt: Path) -> tuple[dict, str]:
    try:
        config = json.loads((ckpt / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise GGUFExportError(f"{ckpt}/config.json cannot be read ({e}): not a Hugging Face checkpoint folder") from None
    archs = config.get("architectures") or [_MODEL_TYPES.get(config.get("model_type"), config.get("model_type", "?"))]
    arch = ARCHITECTURES.get(archs[0])
    if arch is None:
        raise GGUFExportError(f"{ckpt}: architecture {archs[0]} is not supported by the GGUF exporter yet (supported: "
                              f"{', '.join(ARCHITECTURES)}); serve this checkpoint with vLLM, TGI or Transformers")
    return config, arch


def _rope(config: dict) -> tuple[float, dict | None]:
    params = config.get("rope_parameters") or config.get("rope_scaling") or {}
    theta = float(config.get("rope_theta") or params.get("rope_theta") or 10000.0)
    kind = params.get("rope_type") or params.get("type") or "default"
    if kind not in ("default", "linear"):
        raise GGUFExportError(f"rope scaling {kind!r} is not supported by the GGUF exporter yet (default and linear are)")
    return theta, (params if kind == "linear" else None)


# --- tensors ------------------------------------------------------------------------------------------------
def _head_permutation(n_rows: int, n_head: int) -> torch.Tensor:
    """Row order that takes a Hugging Face Llama ``q_proj``/``k_proj`` (``[n_head * d, K]``) to llama.cpp's:
    within each head, the rows ``[0, d/2, 1, d/2 + 1, ...]`` (HF's rotate-half pairs become adjacent pairs)."""
    d = n_rows // n_head
    idx = torch.arange(n_rows).view(n_head, 2, d // 2).transpose(1, 2)
    return idx.reshape(n_rows)


def _permutation_for(prefix: str, n_rows: int, config: dict) -> torch.Tensor | None:
    heads, kv = config["num_attention_heads"], config.get("num_key_value_heads") or config["num_attention_heads"]
    if prefix.endswith("self_attn.q_proj"):
        return _head_permutation(n_rows, heads)
    if prefix.endswith("self_attn.k_proj"):
        return _head_permutation(n_rows, kv)
    return None


def _plain_tensor(t: torch.Tensor, outtype: str) -> tuple[np.ndarray, str]:
    """A non-quantized tensor as (uint8/float array, GGML type): 1-D (norms, biases) in F32, matrices in ``outtype``
    (Q8_0 only when the rows are a multiple of 32 long, else F16)."""
    import gguf

    if t.dim() < 2 or outtype == "f32":
        return t.float().numpy(), "f32"
    if outtype == "f16":
        return t.half().numpy(), "f16"
    if outtype == "bf16":
        return t.bfloat16().view(torch.int16).numpy().view(np.uint8).reshape(t.shape[0], -1), "bf16"
    if t.shape[-1] % QK:
        return t.half().numpy(), "f16"
    return gguf.quants.quantize(t.float().numpy(), ggml_type("q8_0")), "q8_0"


def _add(writer, name: str, arr: np.ndarray, qtype: str) -> None:
    if qtype in ("f32", "f16"):
        writer.add_tensor(name, arr)
    else:
        writer.add_tensor(name, arr, raw_dtype=ggml_type(qtype))


# --- tokenizer ----------------------------------------------------------------------------------------------
def _pre_tokenizer(tok: dict) -> str:
    """llama.cpp's name for a byte-level BPE pre-tokenizer, read from tokenizer.json's structure: GPT-2's regex
    (``"gpt-2"``), or single digits then GPT-2's regex (``"smollm"``); ``"default"`` otherwise (with a warning)."""
    pre = tok.get("pre_tokenizer") or {}
    seq = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    if len(seq) == 1 and _byte_level(seq[0]):
        return "gpt-2"
    if len(seq) == 2 and all(seq[0].get(k) == v for k, v in _DIGITS.items()) and _byte_level(seq[1]):
        return "smollm"
    log.warning("pre-tokenizer %s has no known llama.cpp name: writing tokenizer.ggml.pre 'default' (pass "
                "--tokenizer-pre NAME to set it)", json.dumps(pre)[:200])
    return "default"


def add_tokenizer(writer, ckpt: Path, vocab_size: int, pre: str | None = None) -> str:
    """Write ``tokenizer.ggml.*`` (model, pre, tokens, token types, merges or scores, special ids, add_bos/eos) and
    ``tokenizer.chat_template`` from the checkpoint's tokenizer files; returns the tokenizer model written.

    Byte-level BPE (tokenizer.json, GPT-2/Llama-3/SmolLM style) is written as ``"gpt2"`` with the vocabulary in
    id order, added special tokens as CONTROL and other added tokens as USER_DEFINED, padded to the model's
    ``vocab_size`` with UNUSED ``[PAD<i>]`` tokens; SentencePiece-style vocabularies go through gguf-py's
    ``LlamaHfVocab``/``SentencePieceVocab`` as ``"llama"``.

    Raises:
        GGUFExportError: no tokenizer files, or a tokenizer kind the exporter does not write.
    """
    import gguf

    tj = ckpt / "tokenizer.json"
    tok = json.loads(tj.read_text()) if tj.is_file() else None
    model = (tok or {}).get("model", {})
    if model.get("type") == "BPE" and not model.get("byte_fallback") and (tok.get("decoder") or {}).get("type") == "ByteLevel":
        vocab: dict[str, int] = dict(model["vocab"])
        kinds = {}
        for a in tok.get("added_tokens", []):
            vocab.setdefault(a["content"], a["id"])
            kinds[a["id"]] = gguf.TokenType.CONTROL if a.get("special") else gguf.TokenType.USER_DEFINED
        n = max(vocab_size, len(vocab))
        tokens: list[str | None] = [None] * n
        for text, i in vocab.items():
            if i >= n or tokens[i] is not None:
                raise GGUFExportError(f"{tj}: token id {i} ({text!r}) is duplicated or beyond vocab_size {vocab_size}")
            tokens[i] = text
        types = [kinds.get(i, gguf.TokenType.NORMAL) for i in range(n)]
        for i, t in enumerate(tokens):
            if t is None:
                tokens[i], types[i] = f"[PAD{i}]", gguf.TokenType.UNUSED
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(pre or _pre_tokenizer(tok))
        writer.add_token_list(tokens)
        writer.add_token_types(types)
        kind = "gpt2"
    else:
        vocab_obj = None
        for cls in (gguf.vocab.LlamaHfVocab, gguf.vocab.SentencePieceVocab):
            try:
                vocab_obj = cls(ckpt)
                break
            except Exception:  # noqa: BLE001 - gguf-py signals "not this kind" with several exception types
                continue
        if vocab_obj is None:
            raise GGUFExportError(f"{ckpt}: no tokenizer the GGUF exporter can write (a byte-level BPE tokenizer.json, "
                                  "or a SentencePiece tokenizer.model/tokenizer.json): copy the model's tokenizer "
                                  "files into the checkpoint")
        texts, scores, types = zip(*vocab_obj.all_tokens())
        writer.add_tokenizer_model("llama")
        writer.add_tokenizer_pre(pre or "default")
        writer.add_token_list(list(texts))
        writer.add_token_scores(list(scores))
        writer.add_token_types(list(types))
        kind = "llama"
    gguf.SpecialVocab(ckpt, load_merges=kind == "gpt2", n_vocab=vocab_size).add_to_gguf(writer, quiet=True)
    return kind


# --- metadata -----------------------------------------------------------------------------------------------
def add_metadata(writer, config: dict, ckpt: Path, qcfg, file_type) -> None:
    """``general.*`` and ``llama.*`` keys from the Hugging Face ``config.json`` (names as gguf-py's writer spells
    them; Transformers' GGUF loader maps them back, see its ``GGUF_CONFIG_MAPPING``); ``qcfg`` (a
    :class:`~gptq_plugin.config.QuantizeConfig`, or None) goes into ``general.description``."""
    import gguf

    hidden, heads = config["hidden_size"], config["num_attention_heads"]
    head_dim = config.get("head_dim") or hidden // heads
    theta, linear = _rope(config)
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(str(config.get("_model_name_or_path") or ckpt.name))
    writer.add_quantized_by(f"gptq-plugin {_version()}")
    if qcfg is not None:
        writer.add_description(f"GPTQ {qcfg.bits}-bit, group size {qcfg.group_size}, desc_act {qcfg.desc_act}, "
                               f"static_groups {qcfg.static_groups}, sym {qcfg.sym}; exported by gptq-plugin")
    writer.add_context_length(config.get("max_position_embeddings", 2048))
    writer.add_embedding_length(hidden)
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(config.get("num_key_value_heads") or heads)
    writer.add_rope_dimension_count(head_dim)
    if head_dim != hidden // heads:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_rope_freq_base(theta)
    if linear:
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(linear["factor"]))
    writer.add_layer_norm_rms_eps(float(config.get("rms_norm_eps", 1e-6)))
    writer.add_vocab_size(config["vocab_size"])
    writer.add_file_type(file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


# --- the export ---------------------------------------------------------------------------------------------
def write_modelfile(gguf_path: Path, path: Path | None = None) -> Path:
    """Write Ollama's ``Modelfile`` (``FROM ./NAME.gguf``) next to the GGUF; returns its path.

    Only ``FROM`` (Ollama's docs: "FROM <model name>:<tag>" or a path to a GGUF file): Ollama reads the chat template
    from the GGUF's ``tokenizer.chat_template`` itself, so no Go-template ``TEMPLATE`` is guessed here."""
    path = path or gguf_path.parent / "Modelfile"
    text = (f"# Ollama Modelfile for {gguf_path.name}, written by gptq-plugin\n"
            f"# create the model with: ollama create NAME -f {path.name}\n"
            f"FROM ./{gguf_path.name}\n")
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)
    return path


def export_gguf(ckpt: str | Path, out: str | Path, qtype: str = "auto", outtype: str = "f16",
                allow_approximate: bool = False, overwrite: bool = False, modelfile: bool = True,
                tokenizer_pre: str | None = None, allow_pickle: bool = False) -> ExportReport:
    """Export the GPTQ checkpoint ``ckpt`` to the GGUF file ``out`` (atomically: a temporary file, then a rename).

    Args:
        ckpt: a quantized checkpoint folder (GPTQ v1/v2 or compressed-tensors) of a Llama-family model.
        out: the ``.gguf`` file to create (not inside ``ckpt``).
        qtype: ``"auto"`` (per layer, the smallest exact type of Q4_0, Q5_0, Q8_0) or one of ``q4_0``, ``q4_1``,
            ``q5_0``, ``q8_0`` for every quantized layer.
        outtype: the other matrices (embeddings, ``lm_head``): ``f16`` (default), ``bf16``, ``f32`` or ``q8_0``;
            1-D tensors (norms) are always F32.
        allow_approximate: write layers that no exact type holds approximately (errors in the report) instead
            of refusing the export.
        overwrite: replace an existing ``out`` (and ``Modelfile``).
        modelfile: also write Ollama's ``Modelfile`` next to ``out``.
        tokenizer_pre: override ``tokenizer.ggml.pre`` (llama.cpp's pre-tokenizer name).

    Returns:
        An :class:`ExportReport`.

    Raises:
        GGUFExportError: unsupported architecture/tokenizer, an output path that is refused, or a layer with no
            exact encoding (without ``allow_approximate``). CheckpointError/ConfigError: see
            :func:`gptq_plugin.reader.read_checkpoint`.
    """
    import gguf

    ckpt, out = Path(ckpt).resolve(), Path(out).resolve()
    if qtype != "auto" and qtype not in BLOCK_TYPES:
        raise GGUFExportError(f"--type {qtype}: use auto or one of {', '.join(BLOCK_TYPES)}")
    if outtype not in OUTTYPES:
        raise GGUFExportError(f"--outtype {outtype}: use one of {', '.join(OUTTYPES)}")
    if not ckpt.is_dir():
        raise GGUFExportError(f"checkpoint folder {ckpt} does not exist")
    _check_paths(ckpt, out, overwrite, modelfile)
    config, arch = _model_config(ckpt)
    _rope(config)  # refuse unsupported rope scaling before reading the weights
    cfg, state = read_checkpoint(ckpt, allow_pickle)
    tmap = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], config["num_hidden_layers"])
    prefixes = sorted({k[: -len(".qweight")] for k in state if k.endswith(".qweight")})
    tied = bool(config.get("tie_word_embeddings"))
    report = ExportReport(out, None)
    tensors: list[tuple[str, np.ndarray, str]] = []

    def gguf_name(key: str) -> str:
        name = tmap.get_name(key, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise GGUFExportError(f"tensor {key} has no GGUF name in llama.cpp's {arch} layout: the checkpoint holds "
                                  "tensors this architecture does not have")
        return name

    owned, refused = set(), []
    for p in prefixes:
        name = gguf_name(f"{p}.weight")
        leaves = {leaf: state[f"{p}.{leaf}"] for leaf in ("qweight", "qzeros", "scales", "g_idx")}
        layer = GPTQLayer.from_v1(p, leaves, cfg.bits)
        perm = _permutation_for(p, layer.shape[0], config)
        if perm is not None:
            layer = layer.permute_rows(perm)
        try:
            enc: EncodedLayer = encode_layer(layer, qtype, allow_approximate, cfg.sym, name)
        except GGUFExportError as e:
            refused.append(str(e))
            continue
        tensors.append((name, enc.data, enc.qtype))
        report.layers.append(LayerReport(p, name, enc.qtype, enc.exact, enc.max_abs_err, enc.rel_err, enc.note))
        owned.update(f"{p}.{leaf}" for leaf in leaves)
        if f"{p}.bias" in state:
            b = state[f"{p}.bias"]
            tensors.append((gguf_name(f"{p}.bias"), (b[perm] if perm is not None else b).float().numpy(), "f32"))
            owned.add(f"{p}.bias")
    if refused:
        more = f" ({len(refused) - 1} more layers likewise)" if len(refused) > 1 else ""
        raise GGUFExportError(refused[0] + more)
    for key in sorted(state):
        if key in owned or key.endswith("rotary_emb.inv_freq") or (tied and key == "lm_head.weight"):
            continue
        t = state[key]
        perm = _permutation_for(key.rsplit(".", 1)[0], t.shape[0], config) if t.dim() else None  # weight or bias
        arr, t_type = _plain_tensor(t[perm] if perm is not None else t, outtype)
        tensors.append((gguf_name(key), arr, t_type))
        report.other[tensors[-1][0]] = t_type
    if not any(n == "token_embd.weight" for n, _, _ in tensors):
        raise GGUFExportError(f"{ckpt}: no model.embed_tokens.weight: the checkpoint is incomplete")

    counts: dict[str, int] = {}
    for l in report.layers:
        counts[l.qtype] = counts.get(l.qtype, 0) + 1
    main = max(counts, key=counts.get) if counts else "f16"
    file_type = getattr(gguf.LlamaFileType, f"MOSTLY_{main.upper()}", gguf.LlamaFileType.GUESSED)

    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.tmp-")
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        writer = gguf.GGUFWriter(tmp, arch)
        add_metadata(writer, config, ckpt, cfg, file_type)
        add_tokenizer(writer, ckpt, config["vocab_size"], tokenizer_pre)
        for name, arr, t_type in tensors:
            _add(writer, name, arr, t_type)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.chmod(tmp, 0o644)
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    report.nbytes = out.stat().st_size
    if modelfile:
        report.modelfile = write_modelfile(out)
    return report
