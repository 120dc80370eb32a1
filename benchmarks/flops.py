"""Explicit FLOP counts and the GEMM floor of each benchmark row.

FLOPs are the *useful* arithmetic of the computation, the same number for every
implementation of a row (a multiply-add counts 2; element-wise work such as
exp and normalisation is not counted):

* similarity forward S = x̂·P̂ᵀ: 2·N·D·C·K; its input gradient dx̂ = dS·P̂: 2·N·D·C·K
  (recomputing S in backward, as fused kernels do to save memory, is not useful work);
* Sinkhorn logits, each pixel against its own class's K prototypes: 2·N·K·D;
* prototype sums: N·D;
* target similarity, a gathered dot product per pixel: 2·N·D (its dx as much).

The GEMM floor (docs/spec.md §7) is the measured time of bare GEMMs of the same sizes:
a fused head step needs the forward similarity GEMM, its recomputation in
backward and the dx GEMM, i.e. 2 × "fwd" + 1 × "dx". Per-op rows use the GEMMs
their fused algorithm needs (Sinkhorn and the update have no GEMM floor).
"""

from __future__ import annotations

from .problems import Problem

GEMM_FWD = "fwd"  # [N, D] × [D, C·K]
GEMM_DX = "dx"  # [N, C·K] × [C·K, D]
HEAD_FLOOR = "3 GEMMs"


def similarity_flops(p: Problem) -> int:
    return 2 * p.n * p.d * p.c * p.k


def sinkhorn_flops(p: Problem) -> int:
    return 2 * p.n * p.k * p.d


def update_flops(p: Problem) -> int:
    return p.n * p.d


def target_similarity_flops(p: Problem) -> int:
    return 2 * p.n * p.d


def head_step_flops(p: Problem) -> int:
    return 2 * similarity_flops(p) + sinkhorn_flops(p) + update_flops(p)


def op_flops(op: str, mode: str, p: Problem) -> int:
    if op in ("class_scores", "ppc_ppd_loss"):
        return similarity_flops(p) * (2 if mode == "fwd+bwd" else 1)
    if op == "sinkhorn_assign":
        return sinkhorn_flops(p)
    if op == "update_prototypes":
        return update_flops(p)
    if op == "target_similarity":
        return target_similarity_flops(p) * (2 if mode == "fwd+bwd" else 1)
    raise ValueError(f"unknown op {op!r}")


# How many of each bare GEMM the fused algorithm of a row needs.
_FLOOR_GEMMS = {
    "fwd": {GEMM_FWD: 1},
    "bwd": {GEMM_FWD: 1, GEMM_DX: 1},
    "fwd+bwd": {GEMM_FWD: 2, GEMM_DX: 1},
}


# class_scores with reduction="max" (the benchmarked call): its gradient flows through one
# prototype per class (N·C·D work, 1/K of a GEMM), so its backward needs no bare GEMM and
# has no floor; fwd+bwd needs the forward's one.
_CLASS_SCORES_GEMMS = {"fwd": {GEMM_FWD: 1}, "bwd": None, "fwd+bwd": {GEMM_FWD: 1}}


def floor_gemms(op: str, mode: str) -> dict[str, int] | None:
    """{gemm name: count} making up the floor of a row, or None when it has none."""
    if op == "head_step":
        return dict(_FLOOR_GEMMS["fwd+bwd"])
    if op == "ppc_ppd_loss":
        return dict(_FLOOR_GEMMS[mode])
    if op == "class_scores":
        gemms = _CLASS_SCORES_GEMMS[mode]
        return dict(gemms) if gemms else None
    return None
