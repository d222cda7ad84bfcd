"""Fixtures of the TGI adapter tests (helpers live in tgi_standin.py)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tgi_standin import CASES, DEMO_BLOCKS, DEMO_KINDS, ENV_DEMO_CHECKPOINTS, Checkpoint, make_checkpoint


class Checkpoints(dict):
    """The checkpoints of ``CASES`` by name, made on first use."""

    def __init__(self, root_factory):
        super().__init__()
        self._factory = root_factory

    def __missing__(self, name: str) -> Checkpoint:
        self[name] = make_checkpoint(self._factory.mktemp(name), **CASES[name])
        return self[name]


@pytest.fixture(scope="session")
def ckpts(tmp_path_factory) -> Checkpoints:
    return Checkpoints(tmp_path_factory)


@pytest.fixture(params=list(CASES))
def checkpoint(request, ckpts) -> Checkpoint:
    """Each case of ``CASES`` as a small GPTQ checkpoint."""
    return ckpts[request.param]


# --- the demo model (SmolLM2-135M-Instruct) -------------------------------------------------------------------


@pytest.fixture(scope="session")
def demo_checkpoints(request) -> dict[str, Path]:
    """GPTQ checkpoints of the demo model (name -> folder). ``$GPTQ_PLUGIN_TGI_DEMO_CHECKPOINTS`` (folders
    separated by ``:``) names existing ones, e.g. of the whole model made by ``gptq-plugin quantize``. Otherwise
    the shared ``demo_ckpt_factory`` makes the kinds of ``DEMO_KINDS``: the demo model cut to its first
    ``DEMO_BLOCKS`` blocks, quantized by the core pipeline (a full-model GPTQ sweep takes minutes on CI)."""
    given = [p for p in os.environ.get(ENV_DEMO_CHECKPOINTS, "").split(":") if p]
    if given:
        missing = [p for p in given if not (Path(p) / "config.json").is_file()]
        if missing:
            pytest.fail(f"{ENV_DEMO_CHECKPOINTS} names {missing[0]}, which is not a checkpoint folder")
        return {p: Path(p) for p in given}
    factory = request.getfixturevalue("demo_ckpt_factory")  # tests/conftest.py; skips without the demo model
    try:
        return {kind: factory(n_blocks=DEMO_BLOCKS, **cfg) for kind, cfg in DEMO_KINDS.items()}
    except ValueError as e:  # e.g. TGI's pinned Transformers 4.51 in TGI's environment
        if "Tokenizer class" not in str(e):
            raise
        pytest.skip(f"this environment's Transformers cannot load the demo model ({e}); set {ENV_DEMO_CHECKPOINTS} "
                    "to checkpoints made in gptq-plugin's own environment")
