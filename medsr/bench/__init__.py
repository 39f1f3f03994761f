"""Benchmarks: every inference path on the same inputs, scaling with image size, runtime overhead.

``medsr-bench`` (medsr.cli.bench) is the front-end; the pieces are importable for scripts and tests:

- :mod:`medsr.bench.paths`: which paths exist (torch fp32/bf16/fp16/compile, ONNX Runtime, TensorRT)
  and why one is skipped here;
- :mod:`medsr.bench.measure`: timing, memory high-water, GEMM peak, analytic FLOPs, error vs fp32;
- :mod:`medsr.bench.scaling`: time and memory against image size, linear fit, runtime overhead;
- :mod:`medsr.bench.report`: JSON, markdown and PNG output;
- :mod:`medsr.bench.runner`: one run of all of it (``BenchConfig``, ``run_bench``).

Heavy modules (torch, onnxruntime, matplotlib) are imported inside functions.
"""

from __future__ import annotations
