"""The command line's process settings: transparent huge pages for torch's CPU buffers
(:func:`gptq_plugin.process_memory.use_huge_pages`), checked in fresh interpreters through the kernel's own record of
each mapping (``/proc/self/smaps``: ``hg`` in ``VmFlags`` marks a range advised ``MADV_HUGEPAGE``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(not Path("/sys/kernel/mm/transparent_hugepage").is_dir()
                                or not Path("/proc/self/smaps").is_file(),
                                reason="needs Linux with transparent huge pages (/proc/self/smaps)")

# Allocates a 16 MB tensor (a mapping of its own) after the given imports and prints whether its range is advised
# for huge pages and whether THP_MEM_ALLOC_ENABLE is left in the environment.
PROBE = """
import json, os, sys
{imports}
import torch
x = torch.empty(4 << 20)
x.fill_(1.0)
ptr, flags = x.data_ptr(), None
with open("/proc/self/smaps") as f:
    lines = f.read().splitlines()
for i, line in enumerate(lines):
    head = line.split()[0]
    if "-" in head and not head.endswith(":"):
        lo, hi = (int(v, 16) for v in head.split("-"))
        if lo <= ptr < hi:
            flags = next(l for l in lines[i + 1:] if l.startswith("VmFlags:")).split()[1:]
            break
print(json.dumps({{"hg": "hg" in flags, "env": os.environ.get("THP_MEM_ALLOC_ENABLE")}}))
"""


def probe(imports: str, env: dict | None = None) -> dict:
    code = PROBE.format(imports=imports)
    full_env = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
    full_env.update(env or {})
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=full_env, timeout=300)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_importing_the_package_does_not_start_torch():
    out = subprocess.run([sys.executable, "-c", "import sys, gptq_plugin; print('torch' in sys.modules); "
                          "from gptq_plugin import QuantLinear; print(QuantLinear.__name__, 'torch' in sys.modules)"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["False", "QuantLinear", "True"]


def test_command_line_backs_large_buffers_with_huge_pages():
    r = probe("import gptq_plugin.cli")
    assert r["hg"] is True
    assert r["env"] is None  # removed again: child processes keep their own default


def test_without_the_command_line_torch_keeps_its_default():
    assert probe("")["hg"] is False


def test_the_users_setting_wins():
    r = probe("import gptq_plugin.cli", env={"THP_MEM_ALLOC_ENABLE": "0"})
    assert r["hg"] is False and r["env"] == "0"


def test_torch_imported_first_is_left_alone():
    r = probe("import torch\nimport gptq_plugin.cli")
    assert r["hg"] is False and r["env"] is None
