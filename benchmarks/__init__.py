"""Speed and memory benchmarks of the ProtoSeg head (``python -m benchmarks``).

* :mod:`benchmarks.baseline` — the naive head step of the original code (docs/spec.md §8).
* :mod:`benchmarks.head_step` — the same step on the fused ops of ``protoseg_kernels``.
* :mod:`benchmarks.op_cases` — per-op cases (class scores, PPC/PPD, Sinkhorn, update).
* :mod:`benchmarks.worker` — measures one implementation in its own process.
* :mod:`benchmarks.cli` — runs a suite and writes the table, JSON, CSV and plots.
"""
