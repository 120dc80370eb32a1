"""Per-op roofline of the Triton backend (``python -m benchmarks.roofline --ops``).

The Triton backend at a preset's per-GPU N, each op called as
the op benchmark calls it (``benchmarks/op_cases.py``): ``normalize=False`` on unit
rows, prototypes without gradient (backward gives dx only), ``class_scores`` with
reduction "max" and ``lse_temperature`` (scores, int64 index, lse; backward from the
scores through the index and from lse), ``ppc_ppd_loss`` with reduction "mean",
``sinkhorn_assign`` with 3 iterations, ``update_prototypes`` with a mask. Per row:

* useful FLOPs: :func:`benchmarks.flops.op_flops` (a backward counts its dx GEMM
  only). The bounds use what each side executes: the kernel backward recomputes S
  (two GEMMs); the naive update multiplies by a one-hot matrix (2·N·K·D); the
  kernels' Sinkhorn logits and update sums are fp32 FMAs on the CUDA cores (the
  ``Gpu.fp32_tflops`` peak), everything else runs on the tensor cores (TF32 for
  fp32 data, as in the step table; PyTorch's default ``allow_tf32=False`` would
  run fp32 GEMMs without tensor cores, on both sides).
* compulsory bytes: every tensor the op's autograd node receives read once and
  every tensor it returns written once (a backward receives the upstream gradients
  and the saved tensors it uses, and returns dx): the floor of any implementation.
* kernel bytes (HBM): every launch of the op on this backend (the Triton kernels
  and the torch ops of the wrappers: index sanitising, the sort of the update)
  reads each tensor it touches once and writes each output once; nothing is
  assumed to survive in L2 from one launch to the next (an overcount for small
  buffers such as Sinkhorn's [N, K] fp32 logits). Re-reads within a launch are
  assumed to hit L2, and are listed apart (``rereads``, ``prototype_rereads``):
  the prototype matrix [C·K, D] (a few MB: every pixel block of a GEMM kernel
  reads all of it, Sinkhorn's logits kernel gathers K rows per pixel), the x rows
  of a pixel block (re-read for every column tile of prototypes), the per-row and
  per-(row, class) inputs of the dS function, and the fp32 dx̂ accumulator [N, D]
  of the backward (read-modify-written once per column tile, counted as written
  back to HBM once). Kernel bytes plus the "x rows and buffers" re-reads are the
  traffic if none of those re-reads hit L2; the prototype re-reads always should.
* naive bytes: the naive op of ``op_cases.py`` (the baseline's way), pass by pass
  as PyTorch runs it, autograd formulas included, like the NAIVE_* dicts above.

Pixels that a kernel skips (ignored labels: 10% of the benchmark's; pixels that do
not contribute to the update) are counted as read, on every side. Tile sizes come
from ``protoseg_kernels.triton._config`` for a GPU and are printed under the table:
they set the re-read counts (not the HBM counts). They are the bf16 tiles; fp32
with TF32 has the same pixel blocks and column tiles (only the D chunk differs),
fp32 without TF32 (``allow_tf32=False``) has 64-wide tiles: 24 instead of 12
column tiles in the ppc_ppd backward.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .flops import op_flops, similarity_flops, sinkhorn_flops, update_flops
from .problems import Preset, Problem
from .roofline import H100_SXM, Gpu, bound_ms

# A pass: (count, elements, bytes per element). Elements name a tensor shape (see _elements); bytes per element is a
# number or E, the element size of x, the prototypes, the scores and their gradients (4 for fp32, 2 for bf16).
# Several tensors of one shape moved together are one entry with the sum of their sizes (e.g. 9 = read int64, write
# bool).
E = "e"
TENSOR_CORES, CUDA_CORES = "tensor", "fma"
ITERATIONS = 3  # Sinkhorn iterations of the benchmark (HeadConfig)
SINKHORN_REDUCTIONS = 2 + (ITERATIONS - 1)  # class max, Σ exp, then one Σ softmax per further iteration
SEGMENT_PASSES_PER_SORT_DIGIT = 4  # CUB radix sort of (int64 key, int64 index): read and write both per 8-bit digit
SORT_DIGITS = 8  # 64-bit keys, 8 bits a pass


def _elements(p: Problem) -> dict[str, int]:
    n, d, c, k = p.n, p.d, p.c, p.k
    return {"N": n, "N·D": n * d, "N·C": n * c, "N·K": n * k, "N·C·K": n * c * k, "C·K": c * k,
            "C·K·D": c * k * d, "(N-C)·K·D": (n - c) * k * d}


def pass_bytes(passes: dict[str, tuple[float, str, int | str]], p: Problem, element: int) -> float:
    sizes = _elements(p)
    return sum(count * sizes[shape] * (element if size == E else size) for count, shape, size in passes.values())


@dataclass(frozen=True)
class TritonTiles:
    """The block sizes the Triton backend picks on a GPU for a problem (``protoseg_kernels.triton._config``)."""

    scores_forward: Any  # GemmTiles of the class_scores forward (class layout)
    ppc_forward: Any  # GemmTiles of the ppc_ppd forward (flat layout)
    scores_backward: Any  # GemmTiles of the dx pass of class_scores "max" (class layout)
    ppc_backward: Any  # GemmTiles of the dx pass of ppc_ppd (flat layout)
    segment: Any  # SegmentTiles of Sinkhorn's per-class reductions
    own_class: tuple[int, int, int]  # (block_n, k_pad, block_d) of Sinkhorn's logits
    sums_block_d: int  # D chunk of the update's segment sums

    def column_tiles(self, gemm: Any, p: Problem) -> int:
        return gemm.num_column_tiles(p.c, p.k)

    @staticmethod
    def pixel_blocks(gemm: Any, p: Problem) -> int:
        return _cdiv(p.n, gemm.block_n)

    @staticmethod
    def slot_blocks(gemm: Any, p: Problem) -> int:
        return 1 if gemm.flat else _cdiv(p.k, gemm.k_slots)

    def sinkhorn_chunks(self, p: Problem) -> int:
        return _cdiv(p.n, self.segment.pixels)

    def sinkhorn_class_blocks(self, p: Problem) -> int:
        return _cdiv(p.c, self.segment.block_c)

    def sums_chunks(self, p: Problem) -> int:
        return _cdiv(p.d, self.sums_block_d)

    def describe(self, p: Problem) -> str:
        def gemm(name: str, t: Any) -> str:
            layout = (f"flat {t.width} prototypes" if t.flat
                      else f"{t.k_slots} slots × {t.block_c} classes, {self.slot_blocks(t, p)} slot blocks")
            return f"{name} BN={t.block_n}, {layout} ({self.column_tiles(t, p)} column tiles)"

        return ("Triton tiles (GPU, bf16; TF32 the same but BD): "
                + "; ".join([gemm("class_scores fwd", self.scores_forward), gemm("ppc_ppd fwd", self.ppc_forward),
                             gemm("class_scores dx", self.scores_backward), gemm("ppc_ppd dx", self.ppc_backward)])
                + f"; Sinkhorn logits {self.own_class[0]} pixels a program, reductions over "
                f"{self.sinkhorn_chunks(p)} chunks of {self.segment.pixels} pixels × "
                f"{self.sinkhorn_class_blocks(p)} blocks of {self.segment.block_c} classes; "
                f"update sums in {self.sums_chunks(p)} chunks of {self.sums_block_d} dims.")


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def triton_tiles(p: Problem) -> TritonTiles:
    """The tiles of the Triton launchers on a GPU (meta device: no interpreter tiles) for ``p``."""
    import torch

    from protoseg_kernels.triton import _config

    meta, dtype = torch.device("meta"), torch.bfloat16
    return TritonTiles(
        scores_forward=_config.class_scores_forward_tiles(meta, dtype, p.c, p.k),
        ppc_forward=_config.flat_forward_tiles(meta, dtype, p.c, p.k),
        scores_backward=_config.gradient_tiles(meta, dtype, p.c, p.k, "class"),
        ppc_backward=_config.gradient_tiles(meta, dtype, p.c, p.k, "flat"),
        segment=_config.segment_tiles(meta, p.c, p.k),
        own_class=_config.own_class_tiles(meta, p.k),
        sums_block_d=_config.row_tiles(meta, block_r=32, block_d=64).block_d,
    )


@dataclass(frozen=True)
class OpRow:
    """One op and mode: FLOPs, and the pass lists of the floor, the Triton kernels and the naive op."""

    op: str
    mode: str
    useful_flops: int
    kernel_flops: int
    kernel_units: str  # TENSOR_CORES or CUDA_CORES
    naive_flops: int
    naive_units: str
    compulsory: dict[str, tuple[float, str, int | str]]
    kernel: dict[str, tuple[float, str, int | str]]  # HBM: each launch reads and writes each tensor once
    naive: dict[str, tuple[float, str, int | str]]
    # Re-reads within a launch, assumed served by L2 (not in ``kernel``):
    rereads: dict[str, tuple[float, str, int | str]] = field(default_factory=dict)  # x rows, work buffers
    prototype_rereads: dict[str, tuple[float, str, int | str]] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return f"{self.op} {self.mode}"


def _sanitize(name: str) -> dict[str, tuple[float, str, int | str]]:
    """``sanitize_index`` of an [N] int64 tensor: ``valid_index_mask`` and a ``torch.where``."""
    return {
        f"sanitize {name}: 3 comparisons (read int64, write bool)": (3, "N", 9),
        f"sanitize {name}: 2 ands (read 2 bool, write bool)": (2, "N", 3),
        f"sanitize {name}: where (read bool and int64, write int64)": (1, "N", 17),
    }


def _class_scores_rows(p: Problem, t: TritonTiles) -> list[OpRow]:
    fwd, bwd = t.scores_forward, t.scores_backward
    tiles_f, tiles_b, slots_b = t.column_tiles(fwd, p), t.column_tiles(bwd, p), t.slot_blocks(bwd, p)
    gemm = similarity_flops(p)
    forward = OpRow(
        "class_scores", "fwd", op_flops("class_scores", "fwd", p), gemm, TENSOR_CORES, gemm, TENSOR_CORES,
        compulsory={
            "x (read)": (1, "N·D", E),
            "prototypes (read)": (1, "C·K·D", E),
            "scores (write)": (1, "N·C", E),
            "index, int64 (write)": (1, "N·C", 8),
            "lse, fp32 (write)": (1, "N", 4),
        },
        kernel={
            "forward kernel: x (read)": (1, "N·D", E),
            "forward kernel: prototypes (read)": (1, "C·K·D", E),
            "forward kernel: scores (write)": (1, "N·C", E),
            "forward kernel: index, int64 (write)": (1, "N·C", 8),
            "forward kernel: lse, fp32 (write)": (1, "N", 4),
        },
        rereads={
            f"x rows of a pixel block, again for each further column tile ({tiles_f} - 1)": (tiles_f - 1, "N·D", E),
        },
        prototype_rereads={
            "prototypes, again by each further pixel block": (t.pixel_blocks(fwd, p) - 1, "C·K·D", E),
        },
        naive={
            "einsum: x (read)": (1, "N·D", E),
            "einsum: prototypes (read)": (1, "C·K·D", E),
            "einsum: S [N, K, C] (write)": (1, "N·C·K", E),
            "amax over K: S (read)": (1, "N·C·K", E),
            "amax: scores (write)": (1, "N·C", E),
        },
    )
    backward = OpRow(
        "class_scores", "bwd", op_flops("class_scores", "bwd", p), 2 * gemm, TENSOR_CORES, gemm, TENSOR_CORES,
        compulsory={
            "grad of scores (read)": (1, "N·C", E),
            "grad of lse, fp32 (read)": (1, "N", 4),
            "saved x (read)": (1, "N·D", E),
            "saved prototypes (read)": (1, "C·K·D", E),
            "saved index, int64 (read)": (1, "N·C", 8),
            "saved lse, fp32 (read)": (1, "N", 4),
            "dx (write)": (1, "N·D", E),
        },
        kernel={  # one launch of _grad_x_kernel (recompute S, dS, dS·P̂ into the accumulator, then dx)
            "dx kernel: x (read, to recompute S)": (1, "N·D", E),
            "dx kernel: prototypes (read, for S and dS·P)": (1, "C·K·D", E),
            "dx kernel: grad of scores (read)": (1, "N·C", E),
            "dx kernel: index, int64 (read)": (1, "N·C", 8),
            "dx kernel: grad of lse and lse, fp32 (read)": (2, "N", 4),
            "dx kernel: fp32 dx̂ accumulator [N, D] (written back once)": (1, "N·D", 4),
            "dx kernel: dx (write)": (1, "N·D", E),
        },
        rereads={
            f"x rows, again for each further column tile ({tiles_b} - 1)": (tiles_b - 1, "N·D", E),
            f"grad of scores, again for each further slot block ({slots_b} - 1)": (slots_b - 1, "N·C", E),
            f"index, again for each further slot block ({slots_b} - 1)": (slots_b - 1, "N·C", 8),
            "grad of lse and lse, again for each further column tile": (2 * (tiles_b - 1), "N", 4),
            f"accumulator: a store per column tile, a load per tile after the first, the final load "
            f"(2·{tiles_b} - 1 beyond the write-back)": (2 * tiles_b - 1, "N·D", 4),
        },
        prototype_rereads={
            "prototypes, twice (S, dS·P) by every pixel block, less the first read":
                (2 * t.pixel_blocks(bwd, p) - 1, "C·K·D", E),
        },
        naive={  # amax backward: (grad / (S == scores).sum(K)) · (S == scores); einsum backward: dS·P
            "amax backward, S == scores: S (read)": (1, "N·C·K", E),
            "amax backward, S == scores: scores (read)": (1, "N·C", E),
            "amax backward, S == scores: bool mask (write)": (1, "N·C·K", 1),
            "amax backward, count = mask.sum(K): mask (read)": (1, "N·C·K", 1),
            "amax backward, count: int64 (write)": (1, "N·C", 8),
            "amax backward, grad / count: count, int64 (read)": (1, "N·C", 8),
            "amax backward, grad / count: grad (read), result (write)": (2, "N·C", E),
            "amax backward, dS = (grad / count)·mask: mask (read)": (1, "N·C·K", 1),
            "amax backward, dS = (grad / count)·mask: grad / count (read)": (1, "N·C", E),
            "amax backward, dS (write)": (1, "N·C·K", E),
            "einsum backward, dx = dS·P: dS (read)": (1, "N·C·K", E),
            "einsum backward: prototypes (read)": (1, "C·K·D", E),
            "einsum backward: dx (write)": (1, "N·D", E),
        },
    )
    return [forward, backward]


def _ppc_ppd_rows(p: Problem, t: TritonTiles) -> list[OpRow]:
    fwd, bwd = t.ppc_forward, t.ppc_backward
    tiles_f, tiles_b = t.column_tiles(fwd, p), t.column_tiles(bwd, p)
    gemm = similarity_flops(p)
    forward = OpRow(
        "ppc_ppd_loss", "fwd", op_flops("ppc_ppd_loss", "fwd", p), gemm, TENSOR_CORES, gemm, TENSOR_CORES,
        compulsory={
            "x (read)": (1, "N·D", E),
            "prototypes (read)": (1, "C·K·D", E),
            "target, int64 (read)": (1, "N", 8),
            "ppc, ppd, lse per pixel, fp32 (write: the custom op's outputs)": (3, "N", 4),
        },
        kernel={
            **_sanitize("target"),
            "forward kernel: x (read)": (1, "N·D", E),
            "forward kernel: prototypes (read)": (1, "C·K·D", E),
            "forward kernel: target, int64 (read)": (1, "N", 8),
            "forward kernel: ppc, ppd, lse, fp32 (write)": (3, "N", 4),
            "mean: valid_index_mask(target), 3 comparisons (read int64, write bool)": (3, "N", 9),
            "mean: valid_index_mask(target), 2 ands (read 2 bool, write bool)": (2, "N", 3),
            "mean: ppc.sum(), ppd.sum() (read fp32), valid.sum() twice (read bool)": (2, "N", 5),
        },
        rereads={
            f"x rows of a pixel block, again for each further column tile ({tiles_f} - 1)": (tiles_f - 1, "N·D", E),
        },
        prototype_rereads={
            "prototypes, again by each further pixel block": (t.pixel_blocks(fwd, p) - 1, "C·K·D", E),
        },
        naive={  # mm, cross_entropy(logits, target), ppd_loss (boolean-indexed rows, gather)
            "mm: x (read)": (1, "N·D", E),
            "mm: prototypes (read)": (1, "C·K·D", E),
            "mm: logits [N, C·K] (write)": (1, "N·C·K", E),
            "target.float() (read int64, write fp32), .long() (read fp32, write int64)": (2, "N", 12),
            "cross-entropy, log-softmax: logits (read), log-probabilities (write)": (2, "N·C·K", E),
            "cross-entropy, nll: target (read), a gathered log-probability (a 32-byte sector) per pixel": (1, "N", 40),
            "PPD: target != -1 twice (read fp32, write bool), nonzero twice (read bool, write int64)": (2, "N", 14),
            "PPD: logits[valid] (boolean-indexed rows: read, write)": (2, "N·C·K", E),
            "PPD: target[valid] (read, write fp32), gather (a sector per pixel)": (1, "N", 40),
            "PPD: (1 - s)², mean (≈ 3 passes over N)": (3, "N", E),
        },
    )
    backward = OpRow(
        "ppc_ppd_loss", "bwd", op_flops("ppc_ppd_loss", "bwd", p), 2 * gemm, TENSOR_CORES, gemm, TENSOR_CORES,
        compulsory={
            "grad of ppc and ppd per pixel, fp32 (read)": (2, "N", 4),
            "saved x (read)": (1, "N·D", E),
            "saved prototypes (read)": (1, "C·K·D", E),
            "saved target, int64 (read)": (1, "N", 8),
            "saved lse, fp32 (read)": (1, "N", 4),
            "dx (write)": (1, "N·D", E),
        },
        kernel={  # the mean's gradients reach the op as stride-0 expansions of a scalar: read as [N] here
            **_sanitize("target"),
            "dx kernel: x (read, to recompute S)": (1, "N·D", E),
            "dx kernel: prototypes (read, for S and dS·P)": (1, "C·K·D", E),
            "dx kernel: target, int64 (read)": (1, "N", 8),
            "dx kernel: grad of ppc, grad of ppd, lse, fp32 (read)": (3, "N", 4),
            "dx kernel: fp32 dx̂ accumulator [N, D] (written back once)": (1, "N·D", 4),
            "dx kernel: dx (write)": (1, "N·D", E),
        },
        rereads={
            f"x rows, again for each further column tile ({tiles_b} - 1)": (tiles_b - 1, "N·D", E),
            "target, grads and lse, again for each further column tile": (tiles_b - 1, "N", 8 + 3 * 4),
            f"accumulator: a store per column tile, a load per tile after the first, the final load "
            f"(2·{tiles_b} - 1 beyond the write-back)": (2 * tiles_b - 1, "N·D", 4),
        },
        prototype_rereads={
            "prototypes, twice (S, dS·P) by every pixel block, less the first read":
                (2 * t.pixel_blocks(bwd, p) - 1, "C·K·D", E),
        },
        naive={  # autograd of mm → {cross_entropy, boolean index → gather}
            "PPD: mean, (1 - s)², gather backward on [N] (≈ 4 passes)": (4, "N", E),
            "PPD: gather backward, zeros [valid, C·K] (write)": (1, "N·C·K", E),
            "PPD: gather backward, scatter (a sector per pixel)": (1, "N", 32),
            "PPD: boolean-index backward, zeros_like(logits) (write)": (1, "N·C·K", E),
            "PPD: index_put_(accumulate=True): self, values (read), self (write)": (3, "N·C·K", E),
            "PPD: index_put_, sort of the row indices (≈ CUB radix sort)": (SORT_DIGITS, "N", 32),
            "cross-entropy: nll backward, zeros (write)": (1, "N·C·K", E),
            "cross-entropy: nll backward, scatter (a sector per pixel)": (1, "N", 32),
            "cross-entropy: log-softmax backward, grad and log-probabilities (read), result (write)":
                (3, "N·C·K", E),
            "sum of the two gradients of the logits (read 2, write)": (3, "N·C·K", E),
            "mm backward, dx = dlogits·P: dlogits (read)": (1, "N·C·K", E),
            "mm backward: prototypes (read)": (1, "C·K·D", E),
            "mm backward: dx (write)": (1, "N·D", E),
        },
    )
    return [forward, backward]


def _sinkhorn_row(p: Problem, t: TritonTiles) -> OpRow:
    chunks, class_blocks, r = t.sinkhorn_chunks(p), t.sinkhorn_class_blocks(p), SINKHORN_REDUCTIONS
    flops = sinkhorn_flops(p)
    return OpRow(
        "sinkhorn_assign", "fwd", op_flops("sinkhorn_assign", "fwd", p), flops, CUDA_CORES, flops, TENSOR_CORES,
        compulsory={
            "x (read)": (1, "N·D", E),
            "prototypes (read)": (1, "C·K·D", E),
            "labels, int64 (read)": (1, "N", 8),
            "index, int64 (write)": (1, "N", 8),
        },
        kernel={
            **_sanitize("labels"),
            "logits kernel: labels (read)": (1, "N", 8),
            "logits kernel: x (read)": (1, "N·D", E),
            "logits kernel: prototypes (read)": (1, "C·K·D", E),
            "logits kernel: logits L = S[i, class_i, :]/ε [N, K], fp32 (write)": (1, "N·K", 4),
            f"{r} class reductions (max, Σ exp, {ITERATIONS - 1} × Σ softmax): labels (read)": (r, "N", 8),
            f"{r} class reductions: logits (read)": (r, "N·K", 4),
            f"{r - 1} class reductions: class max or β [C, K] (read)": (r - 1, "C·K", 4),
            f"{r} class reductions: {chunks} partial [C, K] (write, read by the combine kernel)":
                (2 * r * chunks, "C·K", 4),
            f"{r} combine kernels: [C, K] (write)": (r, "C·K", 4),
            "β recurrence on [C, K] between the passes (merge_logsumexp, where, log: ≈ 25 passes)": (25, "C·K", 4),
            "finalize kernel: logits (read)": (1, "N·K", 4),
            "finalize kernel: labels (read)": (1, "N", 8),
            "finalize kernel: β (read)": (1, "C·K", 4),
            "finalize kernel: index, int64 (write)": (1, "N", 8),
        },
        rereads={
            f"class reductions: labels, again by each further block of {t.segment.block_c} classes "
            f"({class_blocks} - 1)": (r * (class_blocks - 1), "N", 8),
            "class reductions: logits, again by each further class block (at most: only for 32-pixel "
            "blocks holding one of its classes)": (r * (class_blocks - 1), "N·K", 4),
        },
        prototype_rereads={
            "logits kernel: the K prototype rows of each pixel's class, less the first read":
                (1, "(N-C)·K·D", E),
        },
        naive={  # op_cases.naive_sinkhorn: per class c, matrix_sinkhorn(x̂[labels == c] @ P̂_cᵀ)
            "index = full_like(labels, -1) (write)": (1, "N", 8),
            f"per class: labels == c, twice (read int64, write bool) × {p.c}": (2 * p.c, "N", 9),
            f"per class: nonzero of the mask, twice (read bool; a host sync each) × {p.c}": (2 * p.c, "N", 1),
            "x̂[labels == c] (boolean-indexed rows: read, write)": (2, "N·D", E),
            "c_k·P̂_cᵀ: rows (read)": (1, "N·D", E),
            "c_k·P̂_cᵀ: prototypes (read)": (1, "C·K·D", E),
            "c_k·P̂_cᵀ: logits [n, K] (write)": (1, "N·K", E),
            "matrix Sinkhorn: / ε, exp (read, write each)": (4, "N·K", E),
            "matrix Sinkhorn: L /= L.sum() (read; read, write)": (3, "N·K", E),
            f"matrix Sinkhorn: {ITERATIONS} × (row sums, /=, /= K, column sums, /=, /= n): 2 reads, 4 × (read, write)":
                (10 * ITERATIONS, "N·K", E),
            "matrix Sinkhorn: L *= n (read, write), argmax (read)": (3, "N·K", E),
            "matrix Sinkhorn: argmax, int64 (write)": (1, "N", 8),
            "F.one_hot: zeros [n, K] int64 (write), .to(dtype) (read int64)": (2, "N·K", 8),
            "F.one_hot: scatter (read index), .to(dtype) (write)": (1, "N", 8),
            "F.one_hot: .to(dtype) (write)": (1, "N·K", E),
            "index[labels == c] = argmax (read, write int64)": (2, "N", 8),
        },
    )


def _update_row(p: Problem, t: TritonTiles) -> OpRow:
    chunks = t.sums_chunks(p)
    return OpRow(
        "update_prototypes", "fwd", op_flops("update_prototypes", "fwd", p), update_flops(p), CUDA_CORES,
        2 * p.n * p.k * p.d, TENSOR_CORES,  # the naive sums are a one-hot matmul
        compulsory={
            "x (read)": (1, "N·D", E),
            "labels, index, int64 (read)": (2, "N", 8),
            "mask, bool (read)": (1, "N", 1),
            "prototypes (read)": (1, "C·K·D", E),
            "new prototypes (write)": (1, "C·K·D", E),
            "counts, int64 (write)": (1, "C·K", 8),
        },
        kernel={
            **_sanitize("labels"),
            **_sanitize("index"),
            "keys: segment >= 0, slot >= 0 (read int64, write bool)": (2, "N", 9),
            "keys: & of those, &= mask (read 2 bool, write bool)": (2, "N", 3),
            "keys: segment·K + slot (multiply: read, write int64; add: read 2, write)": (1, "N", 40),
            "keys: where (read bool and int64, write int64)": (1, "N", 17),
            f"stable sort of the keys: ≈ CUB radix sort of (int64 key, int64 index), {SORT_DIGITS} digit passes "
            "(read, write both)": (SORT_DIGITS * SEGMENT_PASSES_PER_SORT_DIGIT, "N", 8),
            "stable sort: index iota (write), key histogram (read)": (2, "N", 8),
            "searchsorted: bounds [C·K + 1] (write; its log N probes hit L2)": (1, "C·K", 8),
            "counts = bounds[1:] - bounds[:-1] (read 2, write int64)": (1, "C·K", 24),
            "sums kernel: bounds (read)": (1, "C·K", 8),
            "sums kernel: order, int64 (read)": (1, "N", 8),
            "sums kernel: x rows in key order (read)": (1, "N·D", E),
            "sums kernel: sums [C·K, D], fp32 (write)": (1, "C·K·D", 4),
            "momentum kernel: prototypes (read)": (1, "C·K·D", E),
            "momentum kernel: sums, fp32 (read)": (1, "C·K·D", 4),
            "momentum kernel: counts (read)": (1, "C·K", 8),
            "momentum kernel: new prototypes (write)": (1, "C·K·D", E),
        },
        rereads={
            f"sums kernel: order, again by each further chunk of {t.sums_block_d} dims ({chunks} - 1)":
                (chunks - 1, "N", 8),
            "momentum kernel: sums, again by the two blend loops": (2, "C·K·D", 4),
        },
        prototype_rereads={
            "momentum kernel: prototypes, again by the two blend loops": (2, "C·K·D", E),
        },
        naive={  # op_cases.naive_update: per class c, update_class_prototypes on x̂[labels == c]
            "prototypes.clone() (read, write)": (2, "C·K·D", E),
            f"per class: labels == c, three times (read int64, write bool) × {p.c}": (3 * p.c, "N", 9),
            f"per class: nonzero of the mask, three times (read bool; a host sync each) × {p.c}": (3 * p.c, "N", 1),
            "index[labels == c] (read, write int64), correct[labels == c] (read, write bool)": (2, "N", 9),
            "x̂[labels == c] (boolean-indexed rows: read, write)": (2, "N·D", E),
            "F.one_hot: zeros [n, K] int64 (write), .to(dtype) (read int64)": (2, "N·K", 8),
            "F.one_hot: scatter (read index)": (1, "N", 8),
            "F.one_hot: .to(dtype) (write)": (1, "N·K", E),
            "m_q = q·mask (read, write)": (2, "N·K", E),
            "c_q = c_k·mask (read, write)": (2, "N·D", E),
            "f = m_qᵀ·c_q: c_q (read)": (1, "N·D", E),
            "f = m_qᵀ·c_q: m_q (read); n = m_q.sum(0) (read)": (2, "N·K", E),
            "per class on [K, D]: f (write), normalise (≈ 3), old rows (read, write), momentum blend (≈ 7), "
            "masked write-back (read, write): ≈ 15 passes": (15, "C·K·D", E),
            "final l2_normalize: norms (read), division (read, write)": (3, "C·K·D", E),
        },
    )


def op_rows(p: Problem, tiles: TritonTiles | None = None) -> list[OpRow]:
    """Every op and mode of the per-op roofline at problem ``p``."""
    t = tiles or triton_tiles(p)
    return [*_class_scores_rows(p, t), *_ppc_ppd_rows(p, t), _sinkhorn_row(p, t), _update_row(p, t)]


def _tflops(units: str, tensor_tflops: float, gpu: Gpu) -> float:
    return gpu.fp32_tflops if units == CUDA_CORES else tensor_tflops


def row_bounds_us(row: OpRow, p: Problem, element: int, gpu: Gpu = H100_SXM) -> tuple[float, float]:
    """(kernel, naive) lower bounds in µs with data of ``element`` bytes (4: fp32 as TF32, 2: bf16)."""
    tensor = gpu.tf32_tflops if element == 4 else gpu.bf16_tflops
    kernel = bound_ms(row.kernel_flops, pass_bytes(row.kernel, p, element),
                      _tflops(row.kernel_units, tensor, gpu), gpu)
    naive = bound_ms(row.naive_flops, pass_bytes(row.naive, p, element), _tflops(row.naive_units, tensor, gpu), gpu)
    return kernel * 1e3, naive * 1e3


def ops_table(preset: Preset, gpu: Gpu = H100_SXM, tiles: TritonTiles | None = None) -> str:
    p = preset.problem(preset.n_gpu)
    t = tiles or triton_tiles(p)
    header = ("| op | mode | GFLOP useful (executed: kernel / naive) | MB fp32: compulsory / kernel / naive "
              "| MB bf16: compulsory / kernel / naive | L2 re-reads MB fp32 / bf16: x rows, buffers · prototypes "
              f"| {gpu.name} bound µs, fp32 (TF32): kernel / naive | bf16: kernel / naive |")
    lines = [f"{p.name}: N={p.n}, D={p.d}, C={p.c}, K={p.k} (C·K={p.c * p.k}); the Triton backend against the naive "
             "ops of benchmarks/op_cases.py.", "", header, "|" + "---|" * 8]

    def mb(passes: dict[str, tuple[float, str, int | str]], element: int) -> float:
        return pass_bytes(passes, p, element) / 1e6

    for row in op_rows(p, t):
        by_size = {e: (mb(row.compulsory, e), mb(row.kernel, e), mb(row.naive, e)) for e in (4, 2)}
        bounds = {e: row_bounds_us(row, p, e, gpu) for e in (4, 2)}
        lines.append(
            f"| {row.op} | {row.mode} | {row.useful_flops / 1e9:.3g} "
            f"({row.kernel_flops / 1e9:.3g} / {row.naive_flops / 1e9:.3g}) "
            + "".join(f"| {c:.0f} / {k:.0f} / {n:.0f} " for c, k, n in by_size.values())
            + f"| {mb(row.rereads, 4):.0f} / {mb(row.rereads, 2):.0f} · "
            f"{mb(row.prototype_rereads, 4):.0f} / {mb(row.prototype_rereads, 2):.0f} "
            + "".join(f"| {k:.1f} / {n:.1f} " for k, n in bounds.values()) + "|"
        )
    lines += [
        "",
        "MB: 1e6 bytes. Kernel: each launch (Triton kernels and the wrappers' torch ops) reads each tensor it touches "
        "once from HBM and writes each output once; its re-reads within a launch are the L2 columns (kernel + "
        "'x rows, buffers' = the traffic if they all missed L2). Bound: max(executed FLOPs / peak, bytes / bandwidth).",
        t.describe(p),
        f"{gpu.name}: {gpu.tf32_tflops:g} TFLOP/s TF32, {gpu.bf16_tflops:g} TFLOP/s bf16 (dense), "
        f"{gpu.fp32_tflops:g} TFLOP/s fp32 FMA (the kernels' Sinkhorn logits and update sums), "
        f"{gpu.bandwidth_tbs:g} TB/s.",
    ]
    return "\n".join(lines)


def passes_listing(preset: Preset, tiles: TritonTiles | None = None) -> str:
    """Every pass of every row, with its MB in fp32 / bf16."""
    p = preset.problem(preset.n_gpu)
    sizes = _elements(p)
    lines = []
    for row in op_rows(p, tiles):
        lines.append(f"\n## {row.name}")
        for title, passes in (("compulsory", row.compulsory), ("kernel (HBM)", row.kernel),
                              ("kernel re-reads (L2): x rows, buffers", row.rereads),
                              ("kernel re-reads (L2): prototypes", row.prototype_rereads), ("naive", row.naive)):
            lines.append(f"{title}: {pass_bytes(passes, p, 4) / 1e6:.1f} / {pass_bytes(passes, p, 2) / 1e6:.1f} MB")
            for key, (count, shape, size) in passes.items():
                mbs = [count * sizes[shape] * (e if size == E else size) / 1e6 for e in (4, 2)]
                lines.append(f"  {key}: {count:g} × {shape} × {size} B = {mbs[0]:.2f} / {mbs[1]:.2f} MB")
    return "\n".join(lines)
