"""gptq-plugin: GPTQ post-training quantization (Frantar et al., ICLR 2023) as a pluggable backend.

``GPTQPluginConfig`` (the Transformers quantization config) is imported lazily, on first access, from
``gptq_plugin.adapters.transformers``, which registers the plugin with Transformers. Importing this package
registers it only when Transformers is already imported (it has no entry-point discovery), and never fails.
That adapter imports the core's modules, never this package's names, so these two function-level imports close no
import circle (``tests/test_import_graph.py``). ``QuantLinear`` is imported on first access too: importing the package
does not import torch, so the command line can set torch's allocator options before torch starts
(:func:`gptq_plugin.process_memory.use_huge_pages`).
"""

import logging as _logging
import sys as _sys

from .config import QuantizeConfig
from .errors import CalibrationError, CheckpointError, ConfigError, GPTQPluginError, KernelError, NumericalError

__all__ = [
    "QuantizeConfig",
    "QuantLinear",
    "GPTQPluginError",
    "ConfigError",
    "CheckpointError",
    "CalibrationError",
    "KernelError",
    "NumericalError",
    "GPTQPluginConfig",
]


def __getattr__(name: str):
    if name == "QuantLinear":
        from .linear import QuantLinear
        return QuantLinear
    if name == "GPTQPluginConfig":
        try:
            from .adapters.transformers import GPTQPluginConfig
        except ImportError as e:
            raise ImportError(f"gptq_plugin.GPTQPluginConfig needs Transformers: pip install "
                              f"'gptq-plugin[transformers]' ({e})") from e
        return GPTQPluginConfig
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | {"GPTQPluginConfig", "QuantLinear"})


def _register_with_imported_frameworks() -> None:
    """Register with Transformers when it is already imported; a failure is logged, never raised."""
    if _sys.modules.get("transformers") is None:
        return
    try:
        from .adapters import transformers as _adapter  # noqa: F401  (registers on import)
    except Exception as e:  # a broken or too old Transformers must not break `import gptq_plugin`
        _logging.getLogger(__name__).warning("gptq-plugin: not registered with Transformers (%s: %s)",
                                             type(e).__name__, e)


_register_with_imported_frameworks()
