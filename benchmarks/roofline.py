"""The roofline argument for a GPU: FLOPs and bytes moved per head step, and per op.

``python -m benchmarks.roofline`` prints, for each docs/spec.md §7 preset at its per-GPU
N, the GEMM FLOPs and a byte count of the naive step and of the fused step, and
the lower bounds they give on an H100 (SXM, dense peaks). It is a model, not a
measurement: every tensor pass is listed below, so it can be checked and
changed. The benchmark's measured ``allocated_bytes`` (bytes allocated per step,
each written at least once) is a lower bound to compare it with.
``python -m benchmarks.roofline --ops [--preset ade20k] [--passes]`` prints the
per-op roofline of the Triton backend (:mod:`benchmarks.roofline_ops`; ``--passes``
lists every pass of every row with its bytes).

Per step, with e the element size of x and of the similarity tensors:

* [N, C·K] passes (e bytes an element): the naive step writes S twice (einsum,
  matmul), reads it for amax, Sinkhorn gathers, the cross-entropy (log-softmax
  write and read) and the PPD boolean indexing (copy), then in backward builds
  and combines three [N, C·K] gradients (nll, PPD gather, amax) and reads them
  for the two dx GEMMs. The fused step has none.
* [N, D] passes: l2 normalisation, the GEMM operands, the Sinkhorn and update
  reads, the gathered target similarity of the fused step, and the backward
  passes (dx, normalisation backward) — about the same count on both sides.
* [N, C] passes (scores, LayerNorm, cross-entropy, argmax, int64 index of the
  max) and the naive loop's per-class label scans (C passes over N labels).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass

from .flops import similarity_flops, sinkhorn_flops
from .problems import PRESETS, Problem

# Passes over [N, C·K] similarity-shaped tensors (read or write), naive step.
NAIVE_NCK_PASSES = {
    "einsum S (write), amax (read)": 2,
    "matmul S (write)": 1,
    "per-class Sinkhorn gathers from S (read)": 1,
    "cross-entropy: log-softmax (read S, write, read)": 3,
    "PPD: boolean-indexed copy (read, write), gather": 2,
    "backward: nll grad (write), log-softmax backward (read 2, write)": 4,
    "backward: PPD gather and index grads (write 2, add: read 2, write)": 5,
    "backward: amax grad (compare, count, scale: read 2, write 2)": 4,
    "backward: einsum and matmul dx GEMM operands (read 2)": 2,
}
# Passes over [N, D] tensors.
NAIVE_ND_PASSES = {
    "l2 normalise (read, write)": 2,
    "GEMM operands (einsum, matmul)": 2,
    "per-class gathers of x (read, write, mask)": 3,
    "backward: dx of both GEMMs (write 2), sum (read 2, write)": 5,
    "backward: normalisation (read 2, write)": 3,
}
FUSED_ND_PASSES = {
    "class_scores GEMM operand (normalised on the fly)": 1,
    "Sinkhorn logits operand": 1,
    "target cosine: norms, gathered block (write, read), x": 4,
    "update sums": 1,
    "backward: class_scores recompute + dx (read, write)": 2,
    "backward: target cosine (gather write, read; read x; write dx, scale)": 6,
    "backward: sum of the two dx (read 2, write)": 3,
}
# [N, C] passes (4-byte elements): scores, LayerNorm, cross-entropy, argmax, and
# in the fused step the int64 argmax index (2 passes' worth) saved for backward.
NAIVE_NC_PASSES = 10
FUSED_NC_PASSES = 12
NAIVE_LABEL_SCANS_PER_CLASS = 5  # `labels == c` per present class, 4-byte float labels


@dataclass(frozen=True)
class Gpu:
    name: str
    tf32_tflops: float
    bf16_tflops: float
    bandwidth_tbs: float
    fp32_tflops: float = 0.0  # CUDA cores (FMA), no tensor cores


H100_SXM = Gpu("H100 SXM", tf32_tflops=494.7, bf16_tflops=989.4, bandwidth_tbs=3.35, fp32_tflops=66.9)


def naive_bytes(p: Problem, element: int) -> int:
    nck = p.n * p.c * p.k * element * sum(NAIVE_NCK_PASSES.values())
    nd = p.n * p.d * element * sum(NAIVE_ND_PASSES.values())
    nc = p.n * p.c * 4 * (NAIVE_NC_PASSES + NAIVE_LABEL_SCANS_PER_CLASS)
    return nck + nd + nc


def fused_bytes(p: Problem, element: int) -> int:
    nd = p.n * p.d * element * sum(FUSED_ND_PASSES.values())
    return nd + p.n * p.c * 4 * FUSED_NC_PASSES


def naive_flops(p: Problem) -> int:
    return 4 * similarity_flops(p) + sinkhorn_flops(p)  # 2 forward GEMMs, 2 dx GEMMs


def fused_flops(p: Problem) -> int:
    return 3 * similarity_flops(p) + sinkhorn_flops(p)  # forward, recompute, dx


def bound_ms(flop: int, nbytes: int, tflops: float, gpu: Gpu) -> float:
    return max(flop / (tflops * 1e12), nbytes / (gpu.bandwidth_tbs * 1e12)) * 1e3


def table(gpu: Gpu = H100_SXM) -> str:
    header = ("| preset | N | C·K | GFLOP naive / fused | GB naive / fused (fp32) | FLOP/B fused fp32 / bf16 "
              f"| {gpu.name} bound, ms: naive / fused (TF32, fp32 data) | naive / fused (bf16) |")
    lines = [header, "|" + "---|" * 8]
    for preset in PRESETS.values():
        p = preset.problem(preset.n_gpu)
        fl_naive, fl_fused = naive_flops(p), fused_flops(p)
        b32_naive, b32_fused = naive_bytes(p, 4), fused_bytes(p, 4)
        b16_naive, b16_fused = naive_bytes(p, 2), fused_bytes(p, 2)
        lines.append(
            f"| {p.name} | {p.n} | {p.c * p.k} | {fl_naive / 1e9:.0f} / {fl_fused / 1e9:.0f} "
            f"| {b32_naive / 1e9:.2f} / {b32_fused / 1e9:.2f} "
            f"| {fl_fused / b32_fused:.0f} / {fl_fused / b16_fused:.0f} "
            f"| {bound_ms(fl_naive, b32_naive, gpu.tf32_tflops, gpu):.2f} / "
            f"{bound_ms(fl_fused, b32_fused, gpu.tf32_tflops, gpu):.2f} "
            f"| {bound_ms(fl_naive, b16_naive, gpu.bf16_tflops, gpu):.2f} / "
            f"{bound_ms(fl_fused, b16_fused, gpu.bf16_tflops, gpu):.2f} |"
        )
    ridge = (gpu.tf32_tflops / gpu.bandwidth_tbs, gpu.bf16_tflops / gpu.bandwidth_tbs)
    lines.append("")
    lines.append(f"{gpu.name}: {gpu.tf32_tflops:g} TFLOP/s TF32, {gpu.bf16_tflops:g} TFLOP/s bf16 (dense), "
                 f"{gpu.bandwidth_tbs:g} TB/s; ridge points {ridge[0]:.0f} and {ridge[1]:.0f} FLOP/byte.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Roofline model of the ProtoSeg head step (default) or of each op.")
    parser.add_argument("--ops", action="store_true", help="per-op roofline of the Triton backend at one preset")
    parser.add_argument("--preset", choices=list(PRESETS), default="ade20k", help="preset of --ops (per-GPU N)")
    parser.add_argument("--passes", action="store_true", help="with --ops: list every pass of every row")
    parser.add_argument("--contrast", action="store_true", help="pixel_contrast_loss at its presets")
    args = parser.parse_args(argv)
    if args.contrast:
        from .roofline_contrast import table as contrast_table

        print(contrast_table())
        return 0
    if not args.ops:
        print(table())
        return 0
    from .roofline_ops import ops_table, passes_listing, triton_tiles

    preset = PRESETS[args.preset]
    tiles = triton_tiles(preset.problem(preset.n_gpu))
    print(ops_table(preset, tiles=tiles))
    if args.passes:
        print(passes_listing(preset, tiles))
    return 0


if __name__ == "__main__":
    sys.exit(main())
