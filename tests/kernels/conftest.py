"""Kernel tests: ``case`` is parametrised from each test class's ``cases()`` (see kernel_harness.py)."""

from __future__ import annotations

import importlib
import importlib.util
import os

import pytest
import torch


def pytest_generate_tests(metafunc):
    if "case" in metafunc.fixturenames and metafunc.cls is not None:
        cases = metafunc.cls.cases()
        metafunc.parametrize("case", cases, ids=[str(c) for c in cases])


@pytest.fixture(scope="session")
def triton_device() -> str:
    """"cuda" when a GPU is present, else "cpu" with the Triton kernels imported under ``TRITON_INTERPRET=1``
    (the variable is read when ``@triton.jit`` runs, so it is set only around that import)."""
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed (pip install 'gptq-plugin[triton]')")
    if torch.cuda.is_available():
        importlib.import_module("gptq_plugin.kernels.triton_jit")
        return "cuda"
    old = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        mod = importlib.import_module("gptq_plugin.kernels.triton_jit")
    finally:
        if old is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = old
    if not mod.INTERPRET:
        pytest.skip("gptq_plugin.kernels.triton_jit was imported before without TRITON_INTERPRET=1 and no GPU")
    return "cpu"
