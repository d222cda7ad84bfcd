"""The built-in parts, registered through the same hooks a third-party package would implement."""

from __future__ import annotations

from .hookspecs import hookimpl


@hookimpl
def gptq_plugin_kernels():
    from gptq_plugin.kernels.cpu_int4 import CpuInt4Kernel
    from gptq_plugin.kernels.dequant_chunked import DequantChunkedKernel
    from gptq_plugin.kernels.reference import ReferenceKernel
    from gptq_plugin.kernels.triton_kernels import TritonGemmKernel, TritonGemvKernel, TritonKernel

    return [TritonKernel, TritonGemmKernel, TritonGemvKernel, CpuInt4Kernel, DequantChunkedKernel, ReferenceKernel]


@hookimpl
def gptq_plugin_calibration_sources():
    from .calibration import builtin_sources

    return builtin_sources()


@hookimpl
def gptq_plugin_model_layouts():
    from .layouts import GenericCausalLMLayout

    return [GenericCausalLMLayout()]


@hookimpl
def gptq_plugin_checkpoint_formats():
    from .formats import builtin_formats

    return builtin_formats()
