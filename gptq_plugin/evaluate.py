"""WikiText-2 perplexity, the standard GPTQ quality metric, and the KL divergence / top-1 agreement of a model
against its original (llama.cpp's ``perplexity --kl-divergence`` figures).

Protocol (``gptq_plugin/data/wikitext-2/README.md``): read ``wiki.test.raw`` in Python text mode, tokenize the
whole text once with the model's tokenizer (no special tokens), cut it into non-overlapping windows of ``seqlen``
tokens, and take ``exp`` of the mean negative log-likelihood over every predicted token of the first ``windows``
windows.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .calibration_data import default_eval_file, read_text, tokenize_text, windows as make_windows
from .errors import GPTQPluginError


def eval_windows(tokenizer, path: str | Path | None = None, seqlen: int = 512, n: int | None = None) -> torch.Tensor:
    """Evaluation token windows, int64 ``[n, seqlen]`` (all full windows when ``n`` is None).

    Args:
        path: a UTF-8 text file (``.gz`` is decompressed); None for WikiText-2's ``wiki.test.raw`` shipped with
            the package (``$GPTQ_PLUGIN_DATA/wikitext-2/wiki.test.raw`` when that is set).

    Raises:
        CalibrationError: the text file is missing, a folder, or shorter than one window.
    """
    if path is None:
        path = default_eval_file()
    text = read_text(path, "evaluation file")
    return make_windows(tokenize_text(text, tokenizer), seqlen, n, f"evaluation file {path}")


def position_chunk(vocab: int, budget: int = 1 << 24) -> int:
    """Positions per chunk so that one ``[chunk, vocab]`` fp32 temporary holds about ``budget`` elements (64 MB)."""
    return max(1, budget // max(1, vocab))


def _nll_sum(logits: torch.Tensor, targets: torch.Tensor) -> float:
    """Sum of ``-log softmax(logits)[target]`` over positions; ``logits`` ``[n, vocab]``, ``targets`` int64 ``[n]``,
    one chunk of positions at a time (one fp32 ``[chunk, vocab]`` temporary instead of the whole window's)."""
    total = 0.0
    step = position_chunk(logits.shape[-1])
    for p0 in range(0, logits.shape[0], step):
        total += float(F.cross_entropy(logits[p0:p0 + step].float(), targets[p0:p0 + step], reduction="sum"))
    return total


@torch.no_grad()
def perplexity(model, ids: torch.Tensor, batch_size: int = 1, progress: bool = True) -> float:
    """``exp(mean NLL)`` of ``model`` over every predicted token of ``ids``.

    The loss is computed window by window in chunks of positions (:func:`position_chunk`), so memory holds the
    batch's logits plus one ``[chunk, vocab]`` fp32 temporary, not fp32 copies of every logit. On the demo model
    (vocabulary 49,152), 4 windows of 512 tokens: the evaluation added 939 MB to the loaded model's peak RSS when
    one fp32 ``cross_entropy`` took the whole batch of 4; 254 MB chunked with batches of 4; nothing with
    ``batch_size=1`` (the default), at the same speed and the same perplexity to 6 decimals.

    Args:
        model: a causal LM returning ``logits`` ``[b, seqlen, vocab]``.
        ids: int64 ``[n, seqlen]`` windows; the first token of each window is context only.

    Returns:
        Perplexity (a float >= 1).
    """
    model.eval()
    device = next(model.parameters()).device
    nll = 0.0
    count = 0
    for i in tqdm(range(0, ids.shape[0], batch_size), desc="perplexity", disable=not progress, leave=False):
        batch = ids[i:i + batch_size].to(device)
        logits = model(input_ids=batch, use_cache=False).logits
        for j in range(batch.shape[0]):
            nll += _nll_sum(logits[j, :-1], batch[j, 1:])
        count += batch[:, 1:].numel()
        del logits
    return math.exp(nll / count)


@dataclass
class Agreement:
    """How far ``model``'s next-token distributions are from ``reference``'s on the same windows: the figures of
    llama.cpp's ``perplexity --kl-divergence``.

    Attributes:
        positions: predicted positions compared (``n * (seqlen - 1)``: every position with a next token in its
            window, the perplexity's positions; llama.cpp scores only the second half of each context).
        perplexity, reference_perplexity: ``exp(mean NLL)`` of each model on those positions.
        kld_mean, kld_median, kld_p99, kld_max: ``KL(P_reference || P_model) = sum_v p_ref (log p_ref - log p)``
            per position, in nats: mean, median, 99th percentile, maximum.
        top1_agreement: fraction of positions where both models' most likely next token is the same (llama.cpp's
            "Same top p"), in [0, 1].
    """

    positions: int
    perplexity: float
    reference_perplexity: float
    kld_mean: float
    kld_median: float
    kld_p99: float
    kld_max: float
    top1_agreement: float

    def to_dict(self) -> dict:
        return asdict(self)


@torch.no_grad()
def compare(model, reference, ids: torch.Tensor, batch_size: int = 1, progress: bool = True) -> Agreement:
    """KL divergence and top-1 agreement of ``model`` against ``reference`` (e.g. a quantized model against its
    original) on windows ``ids``, with both perplexities.

    Window by window, in chunks of positions (:func:`position_chunk`): memory holds both models, one batch of
    logits of each and a few ``[chunk, vocab]`` fp32 temporaries; per position only its KL value is kept.

    Args:
        model, reference: causal LMs over the same vocabulary, returning ``logits`` ``[b, seqlen, vocab]``.
        ids: int64 ``[n, seqlen]`` windows (:func:`eval_windows`).
        batch_size: windows per forward.

    Raises:
        GPTQPluginError: the two models' vocabularies differ.
    """
    model.eval()
    reference.eval()
    device = next(model.parameters()).device
    ref_device = next(reference.parameters()).device
    nll = ref_nll = 0.0
    same = 0
    klds = []
    for i in tqdm(range(0, ids.shape[0], batch_size), desc="KL divergence", disable=not progress, leave=False):
        batch = ids[i:i + batch_size]
        logits = model(input_ids=batch.to(device), use_cache=False).logits
        ref_logits = reference(input_ids=batch.to(ref_device), use_cache=False).logits
        if logits.shape[-1] != ref_logits.shape[-1]:
            raise GPTQPluginError(f"the model's vocabulary ({logits.shape[-1]} logits) differs from the reference's "
                                  f"({ref_logits.shape[-1]}): compare a quantized model with its own original")
        step = position_chunk(logits.shape[-1])
        for j in range(batch.shape[0]):
            targets = batch[j, 1:]
            for p0 in range(0, targets.numel(), step):
                p1 = min(p0 + step, targets.numel())
                logq = F.log_softmax(logits[j, p0:p1].float().cpu(), dim=-1)  # [chunk, vocab]
                logp = F.log_softmax(ref_logits[j, p0:p1].float().cpu(), dim=-1)
                t = targets[p0:p1, None]
                nll -= float(logq.gather(1, t).sum())
                ref_nll -= float(logp.gather(1, t).sum())
                klds.append(F.kl_div(logq, logp, reduction="none", log_target=True).sum(-1).clamp_min_(0))
                same += int((logq.argmax(-1) == logp.argmax(-1)).sum())
                del logq, logp
        del logits, ref_logits
    kld = torch.cat(klds).double().numpy()
    n = kld.size
    return Agreement(positions=n, perplexity=math.exp(nll / n), reference_perplexity=math.exp(ref_nll / n),
                     kld_mean=float(kld.mean()), kld_median=float(np.median(kld)),
                     kld_p99=float(np.percentile(kld, 99)), kld_max=float(kld.max()), top1_agreement=same / n)
