"""The checkout's kernels/ and adapters/ folders (gptq_plugin.kernels / gptq_plugin.adapters) never shadow the
top-level packages of those names when Python runs from the checkout root."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _run_from_root(code: str, pythonpath: Path | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    if pythonpath is not None:
        env["PYTHONPATH"] = str(pythonpath)
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("name", ["kernels", "adapters"])
def test_top_level_name_goes_to_the_installed_package(name, tmp_path):
    """An installed package of the same name (Hugging Face's `kernels`, AdapterHub's `adapters`) is what
    `import NAME` gives from the checkout root, and its submodules import; gptq_plugin's own still import."""
    pkg = tmp_path / name
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("WHO = 'the installed one'\n")
    (pkg / "sub" / "__init__.py").write_text("from .. import WHO\n")
    r = _run_from_root(f"import {name}, {name}.sub, gptq_plugin.{name}\n"
                       f"print({name}.WHO, {name}.__file__, {name}.sub.WHO, gptq_plugin.{name}.__name__)", tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["the", "installed", "one", str(pkg / "__init__.py"), "the", "installed", "one",
                                f"gptq_plugin.{name}"]


@pytest.mark.parametrize("name", ["kernels", "adapters"])
def test_top_level_name_without_a_package_is_not_found(name):
    """Without such a package, `import NAME` from the checkout root gives an empty module (no attribute of
    gptq_plugin's, no version: availability checks such as Transformers' say no)."""
    r = _run_from_root(f"import sys\n"
                       f"saved = list(sys.path)\n"  # hide site-packages, where such a package may be installed
                       f"sys.path[:] = [p for p in sys.path if 'site-packages' not in p]\n"
                       f"import {name}\n"
                       f"print('absent' if not [a for a in vars({name}) if not a.startswith('__')] "
                       f"and not hasattr({name}, '__version__') else sorted(vars({name})), {name}.__name__)\n"
                       f"sys.path[:] = saved\n"
                       f"import gptq_plugin.{name}\nprint(gptq_plugin.{name}.__name__)")
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["absent", name, f"gptq_plugin.{name}"]
