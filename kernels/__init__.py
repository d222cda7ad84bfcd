"""Fused dequantize + matmul kernels for GPTQ layers, chosen per layer through the kernel registry.

``reference`` defines the math; every other kernel is tested against it:

* ``triton`` / ``triton_gemm`` / ``triton_gemv`` (CUDA): fused dequant-GEMM and split-K GEMV in Triton;
* ``cpu_int4`` (CPU, 2/3/4-bit, bf16): PyTorch's native int4 weight-only matmul at decode, compiled bf16 tiles
  (``cpu_native``) at prefill;
* ``cpu_int8`` (CPU, 8-bit, bf16): ``cpu_native``'s compiled GEMV and tiles (without a C compiler: the int4 op on
  two 4-bit planes of each code);
* ``dequant_chunked`` (any device): chunked dequantize-and-matmul, the fallback for everything else.
"""

if __name__ != "gptq_plugin.kernels":  # found as a top-level `kernels` (the checkout root is on sys.path):
    # hand the name to the installed package `kernels`, if any (gptq_plugin/_toplevel.py)
    from os.path import abspath as _abs, dirname as _dir, join as _join
    from runpy import run_path as _run_path

    _run_path(_join(_dir(_dir(_abs(__file__))), "gptq_plugin", "_toplevel.py"))["hand_over"](__name__, __file__)
    del _abs, _dir, _join, _run_path
else:
    from .base import LayerSpec, QuantKernel
    from .cpu_int4 import CpuInt4Kernel
    from .cpu_int8 import CpuInt8Kernel
    from .dequant_chunked import DequantChunkedKernel
    from .reference import ReferenceKernel, dequantize_weight, gemm
    from .triton_kernels import TritonGemmKernel, TritonGemvKernel, TritonKernel

    __all__ = ["CpuInt4Kernel", "CpuInt8Kernel", "DequantChunkedKernel", "LayerSpec", "QuantKernel", "ReferenceKernel", "TritonGemmKernel",
               "TritonGemvKernel", "TritonKernel", "dequantize_weight", "gemm"]
