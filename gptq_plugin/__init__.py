"""gptq-plugin: GPTQ post-training quantization (Frantar et al., ICLR 2023) as a pluggable backend."""

from .config import QuantizeConfig
from .errors import CalibrationError, CheckpointError, ConfigError, GPTQPluginError, KernelError, NumericalError
from .linear import QuantLinear

__all__ = [
    "QuantizeConfig",
    "QuantLinear",
    "GPTQPluginError",
    "ConfigError",
    "CheckpointError",
    "CalibrationError",
    "KernelError",
    "NumericalError",
]
