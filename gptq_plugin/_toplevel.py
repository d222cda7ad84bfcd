"""Keep this checkout's ``kernels/`` and ``adapters/`` folders from shadowing other packages.

The project's fixed top level holds ``kernels/`` and ``adapters/``, installed as ``gptq_plugin.kernels`` and
``gptq_plugin.adapters`` (``package-dir`` in pyproject.toml). Whenever Python runs from the checkout root
(``python -m pytest``, ``python -c``, a benchmark script), the root is on ``sys.path`` and ``import kernels`` /
``import adapters`` would find these folders instead of the packages of those names (Hugging Face's ``kernels``,
which Transformers and TGI import; AdapterHub's ``adapters``). Their ``__init__`` calls :func:`hand_over` when it
runs under the top-level name. This module imports nothing of gptq_plugin: it is loaded by file path.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import sys
from pathlib import Path


def hand_over(name: str, init_file: str) -> None:
    """Replace the module being imported as ``name`` (this checkout's folder) by the package of that name found on
    ``sys.path`` outside the checkout root, executed under ``name``; the import statement then returns it.

    When no such package is installed, the module stays an empty one (its ``__init__`` skips its own imports): no
    attributes, no ``__version__``, so availability checks such as Transformers' ``is_kernels_available()`` say
    no, as without the checkout. (Raising ``ModuleNotFoundError`` instead would break those checks, which import
    a package that ``importlib.util.find_spec`` found.)
    """
    root = Path(init_file).resolve().parents[1]
    others = [p for p in sys.path if isinstance(p, str) and Path(p or ".").resolve() != root]
    spec = importlib.machinery.PathFinder.find_spec(name, others)
    if spec is None or spec.loader is None:
        return
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)

