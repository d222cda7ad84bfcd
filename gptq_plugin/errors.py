"""The project's exception types.

Every error that a user can cause (a bad option, a missing file, a corrupt checkpoint) is raised as a
subclass of :class:`GPTQPluginError` with a message naming the object, the bad value and the fix. The CLI
turns these into one line on stderr and a non-zero exit.
"""

from __future__ import annotations


class GPTQPluginError(Exception):
    """Base class of every error the plugin raises for bad user input or an unusable environment."""


class ConfigError(GPTQPluginError, ValueError):
    """An impossible or unsupported quantization config (e.g. ``bits=5``, ``group_size=0``)."""


class CheckpointError(GPTQPluginError):
    """A checkpoint that is missing, corrupt, or does not match its declared quantization config."""


class CalibrationError(GPTQPluginError):
    """Calibration data that cannot be used (missing file, fewer tokens than one window, ...)."""


class KernelError(GPTQPluginError):
    """No registered kernel can run a layer, or a forced kernel cannot run it."""


class NumericalError(GPTQPluginError):
    """NaN/Inf in calibration activations or a Hessian that cannot be repaired."""


class OutputError(GPTQPluginError):
    """An output that cannot be written (no space left, read-only file system, no permission, a path under
    ``/proc``) or that would overwrite an input (the source model, the calibration file)."""
