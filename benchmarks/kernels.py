"""Kernel benchmark table: ``python benchmarks/kernels.py [--quick] [--json] [--shapes 4096x4096 --m 1,16 ...]``.

A thin wrapper of :func:`gptq_plugin.bench.main` (the same as ``gptq-plugin bench``); ``--help`` lists the options.
"""

import sys

from gptq_plugin.bench import main

if __name__ == "__main__":
    sys.exit(main())
