"""The built-in parts, registered through the same hooks a third-party package would implement."""

from __future__ import annotations

from gptq_plugin.kernels.cpu_int4 import CpuInt4Kernel
from gptq_plugin.kernels.cpu_int8 import CpuInt8Kernel
from gptq_plugin.kernels.dequant_chunked import DequantChunkedKernel
from gptq_plugin.kernels.reference import ReferenceKernel
from gptq_plugin.kernels.triton_kernels import TritonGemmKernel, TritonGemvKernel, TritonKernel

from .calibration_data import HFDatasetSource
from .format_compressed_tensors import CompressedTensorsFormat
from .format_gptq import GPTQv1Format, GPTQv2Format
from .hookspecs import hookimpl
from .layouts import GenericCausalLMLayout


@hookimpl
def gptq_plugin_kernels():
    return [TritonKernel, TritonGemmKernel, TritonGemvKernel, CpuInt4Kernel, CpuInt8Kernel, DequantChunkedKernel,
            ReferenceKernel]


@hookimpl
def gptq_plugin_calibration_sources():
    return [
        HFDatasetSource("wikitext2", "wikitext", "wikitext-2-raw-v1", "train", "text"),
        HFDatasetSource("c4", "allenai/c4", None, "train", "text",
                        data_files={"train": "en/c4-train.00000-of-01024.json.gz"}),
    ]


@hookimpl
def gptq_plugin_model_layouts():
    return [GenericCausalLMLayout()]


@hookimpl
def gptq_plugin_checkpoint_formats():
    return [GPTQv1Format(), GPTQv2Format(), CompressedTensorsFormat()]
