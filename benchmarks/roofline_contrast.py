"""Roofline of pixel_contrast_loss fwd+bwd (``python -m benchmarks.roofline --contrast``).

At the docs/spec.md §7 pixel-contrast presets (per-GPU sizes, constant bank; dense also at
A = 32,768, the GPU bar), for the fused kernels and the naive formula:

* executed FLOPs: 2·A·M·D per GEMM pass. Fused ContrastiveSeg: the GEMM passes of
  :func:`benchmarks.contrast_cases.floor_gemms` ((2 + 1/C) forward products and a
  dx, a bank stored by class). Naive: the logits and dx (2 passes; in-batch
  + the column role).
* HBM bytes. Fused: each pass reads both operands once (A·D + M·D elements) and the
  labels; the outputs are per-anchor scalars and d anchors. Naive: every A×M tensor it
  writes and reads, pass by pass, as PyTorch runs :mod:`benchmarks.contrast_baseline`
  (NAIVE_A_BY_M_PASSES below, fp32 elements whatever the input dtype for the masks).
* bound: max(FLOPs / tensor-core peak, bytes / bandwidth) per side; the fused side's
  bound is the GEMM time of its passes when, as here, it is compute-bound.
"""

from __future__ import annotations

from .contrast_cases import PRESETS, floor_gemms
from .problems import Problem
from .roofline import H100_SXM, Gpu, bound_ms

# Reads + writes of A×M tensors by the naive formula, forward and backward, in units of
# one A×M tensor pass: forward about 17 element-wise passes (the logits, eq/float masks,
# the max shift, exp, the negatives' product and sum, log, log-probabilities, the masked
# mean) each reading one or two A×M operands and writing one; backward about as many.
NAIVE_A_BY_M_PASSES = 60


def _problems() -> list[Problem]:
    dense = PRESETS["dense"]
    return [PRESETS["in_batch"], PRESETS["bank"], dense, dense.with_n(32_768)]


def _gemm_passes(p: Problem) -> float:
    return sum(floor_gemms(p.c, p.contrast).values())


def fused_flops(p: Problem) -> float:
    return _gemm_passes(p) * 2 * p.n * p.m * p.d


def naive_flops(p: Problem) -> float:
    return (3 if p.contrast == "in_batch" else 2) * 2 * p.n * p.m * p.d


def fused_bytes(p: Problem, element: int) -> float:
    per_pass = (p.n + p.m) * p.d * element + (p.n + p.m) * 8  # operands and int64 labels
    return _gemm_passes(p) * per_pass + p.n * p.d * element  # + d anchors


def naive_bytes(p: Problem, element: int) -> float:
    operands = 2 * (p.n + p.m) * p.d * element
    return NAIVE_A_BY_M_PASSES * p.n * p.m * 4 + operands


def table(gpu: Gpu = H100_SXM) -> str:
    lines = [f"| preset | A | M | GEMM passes fused / naive | GB naive / fused (bf16) "
             f"| {gpu.name} bound, ms: naive / fused (bf16) | fused (TF32, fp32 data) |", "|" + "---|" * 7]
    for p in _problems():
        passes_naive = naive_flops(p) / (2 * p.n * p.m * p.d)
        lines.append(
            f"| {p.name} | {p.n} | {p.m} | {_gemm_passes(p):.2f} / {passes_naive:.0f} "
            f"| {naive_bytes(p, 2) / 1e9:.2f} / {fused_bytes(p, 2) / 1e9:.3f} "
            f"| {bound_ms(naive_flops(p), naive_bytes(p, 2), gpu.bf16_tflops, gpu):.2f} / "
            f"{bound_ms(fused_flops(p), fused_bytes(p, 2), gpu.bf16_tflops, gpu):.2f} "
            f"| {bound_ms(fused_flops(p), fused_bytes(p, 4), gpu.tf32_tflops, gpu):.2f} |"
        )
    lines.append("")
    lines.append("The GPU bar (docs/spec.md §7): dense at A = 32,768 fwd+bwd in bf16 within 2x of the fused "
                 "bound of its row.")
    return "\n".join(lines)
