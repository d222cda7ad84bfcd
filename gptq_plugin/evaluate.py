"""WikiText-2 perplexity, the standard GPTQ quality metric.

Protocol (shared/data/README.md): read ``wiki.test.raw`` in Python text mode, tokenize the whole text once
with the model's tokenizer (no special tokens), cut it into non-overlapping windows of ``seqlen`` tokens, and
take ``exp`` of the mean negative log-likelihood over every predicted token of the first ``windows`` windows.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .calibration import default_eval_file, tokenize_text, windows as make_windows
from .errors import CalibrationError


def eval_windows(tokenizer, path: str | Path | None = None, seqlen: int = 512, n: int | None = None) -> torch.Tensor:
    """Evaluation token windows, int64 ``[n, seqlen]`` (all full windows when ``n`` is None).

    Raises:
        CalibrationError: the text file is missing (pass ``--dataset``) or shorter than one window.
    """
    if path is None:
        path = default_eval_file()
        if path is None:
            raise CalibrationError("no evaluation text given and no shared data found (set $GPTQ_PLUGIN_DATA): "
                                   "pass --dataset PATH to wiki.test.raw or another text file")
    path = Path(path)
    if not path.is_file():
        raise CalibrationError(f"evaluation file {path} does not exist: pass --dataset PATH to a text file")
    text = path.read_text(encoding="utf-8")
    return make_windows(tokenize_text(text, tokenizer), seqlen, n, f"evaluation file {path}")


@torch.no_grad()
def perplexity(model, ids: torch.Tensor, batch_size: int = 4, progress: bool = True) -> float:
    """``exp(mean NLL)`` of ``model`` over every predicted token of ``ids``.

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
        logits = model(input_ids=batch, use_cache=False).logits.float()
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum")
        nll += float(loss)
        count += batch[:, 1:].numel()
    return math.exp(nll / count)
