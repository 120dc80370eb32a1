"""Triton kernels of ``tree_min_loss`` (docs/spec.md §11.1): HSSN's tree-min loss.

Logits z [B, V, P] are read in place through their three strides (the [N, V] layout
arrives as [1, V, N] with node stride 1, [B, V, H, W] as its flatten(2), channels-last
included); nothing is copied. One program owns a block of BP pixels of one image and
works on the nodes VB at a time ([BP, VB] tiles; V is not limited: a larger tree is
covered chunk by chunk):

* MCL_v (the min of z over row v of ``ancestors``) and MCM_v (the max over row v of
  ``descendants``) by a loop over the table's columns: each column j gathers, for every
  node v of the chunk, z at node ``table[v, j]`` (a second, cached read of the pixel's
  logits) into a running first extremum. Rows ascend, so the strict comparison keeps the
  smallest node on a tie; NaN wins, the first NaN stays (``_tiles.replaces_max`` and its
  twin); an entry outside [0, V) is padding.
* Node v is positive for label y when v is in row y of ``ancestors`` (a loop over L).
  With a = σ(±m) the "right" probability (p = σ(MCL) for a positive node, 1 − q = σ(−MCM)
  for a negative one) and b = 1 − a the other, computed as σ(∓m):

      t = −b^γ·log(a + ε),   ∂t/∂m = ±a·b^γ·[γ·log(a + ε) − b/(a + ε)]   (+ positive, − negative)

  which is the reference's pair of formulas term by term.

Backward: each node v contributes C_v = g·w_v·∂t/∂m to its target A_v (the arg-min or
arg-max node). The program owns its pixels' whole gradient rows and writes each element
exactly once: grad[:, u] = Σ_v C_v·[A_v = u], a masked reduction per output node u. When
the tree fits one chunk (V ≤ VB, the Cityscapes tree's 26 nodes included) C and A are
formed once and each column u is stored as it is reduced; a larger tree is done one
[BP, VB] output tile at a time, from every node chunk (recomputed per output tile). No
atomics, no zero fill, deterministic. Ignored pixels (a label outside [0, V)) read no
logits and get loss 0 and a zero gradient.

fp32 arithmetic (the backend takes float16, bfloat16 and float32 logits); the logarithm
is ``_tiles.natural_log`` made safe for 0, subnormals and NaN, the sigmoid 1/(1 + e^−m),
the focal weight b^γ a square for γ = 2 (as torch.pow), e^{γ·log b} otherwise, and nothing
for γ = 0. No libdevice, no atomics, no inline assembly.
"""

from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._config import interpreted, next_pow2
from ._host import check_dtype, launch
from ._tiles import INTERPRETED, LN2, natural_log, replaces_max, to_dtype

OP = "tree_min_loss"

# The focal weight b^γ, chosen on the host: none (γ = 0), a square (γ = 2, HSSN's), a power.
FOCAL_NONE, FOCAL_SQUARE, FOCAL_POW = "none", "square", "pow"

MAX_NODE_BLOCK = 128  # nodes per tile on a GPU; a larger tree is covered in chunks
TILE_ELEMENTS = 2048  # BP·VB on a GPU: 8 values of a tile per thread at 8 warps
NUM_WARPS = 8
INTERPRETED_NODE_BLOCK = 16  # so that the test trees (V = 10, 26) span one and two chunks
INTERPRETED_PIXEL_BLOCK = 16

MIN_NORMAL = tl.constexpr(1.1754943508222875e-38)  # smallest normal fp32
SUBNORMAL_SCALE = tl.constexpr(16777216.0)  # 2^24: lifts every fp32 subnormal to a normal


def _blocks(device: torch.device, v: int) -> tuple[int, int]:
    """(BP pixels, VB nodes) of a tile."""
    if interpreted(device):
        return INTERPRETED_PIXEL_BLOCK, min(next_pow2(v), INTERPRETED_NODE_BLOCK)
    node_block = min(next_pow2(v), MAX_NODE_BLOCK)
    return max(TILE_ELEMENTS // node_block, 16), node_block


@triton.jit
def _log(x):
    """ln x for x >= 0 (or NaN) in fp32: -inf at 0, NaN stays NaN, subnormals scaled up
    first (``natural_log`` reads the exponent off the bits of a normal number)."""
    tiny = x < MIN_NORMAL
    scaled = tl.where(tiny, x * SUBNORMAL_SCALE, x)
    y = natural_log(tl.where(scaled > 0, scaled, 1.0)) - tl.where(tiny, 24.0 * LN2, 0.0)
    y = tl.where(x == 0, float("-inf"), y)
    y = tl.where(x == float("inf"), x, y)
    return tl.where(x != x, x, y)


@triton.jit
def _sigmoid(m):
    """σ(m) = 1/(1 + e^−m): 0 at −inf, 1 at +inf, NaN for NaN."""
    return 1.0 / (1.0 + tl.exp(-m))


@triton.jit
def _focal_weight(b, gamma, FOCAL: tl.constexpr):
    """b^γ for b in [0, 1] (or NaN); 1 without focal weighting."""
    if FOCAL == "square":
        w = b * b
    elif FOCAL == "pow":
        w = tl.exp(gamma * _log(b))  # 0 at b = 0 (γ > 0), NaN for NaN
    else:
        w = tl.full(b.shape, 1.0, dtype=tl.float32)
    return w


@triton.jit
def _to_output(v, dtype: tl.constexpr):
    """``to_dtype``, with ±0 kept exact: interpreted, its bf16 rounding step turns ±0 into a
    subnormal that the interpreter's fp32 → bf16 cast mangles (to ±1.17e-38)."""
    out = to_dtype(v, dtype)
    if INTERPRETED and dtype == tl.bfloat16:
        out = tl.where(v == 0, v.to(dtype), out)
    return out


@triton.jit
def _replaces_min(v, best):
    """The twin of ``replaces_max``: strictly smaller, or the first NaN."""
    return (v < best) | ((v != v) & (best == best))


@triton.jit
def _first_extremum(z_ptr, pixel_offset, pixel_ok, stride_v, table_ptr, width, nodes, node_ok, V,
                    LARGEST: tl.constexpr, BP: tl.constexpr, VB: tl.constexpr):
    """(extremum [BP, VB] fp32, its first node [BP, VB] int32) of z over row v of ``table``
    ([V, width], contiguous) for each node v of ``nodes``; (±inf, −1) for a row without
    a valid entry (never one of a Hierarchy's tables) or a masked lane."""
    if LARGEST:
        best = tl.full([BP, VB], float("-inf"), dtype=tl.float32)
    else:
        best = tl.full([BP, VB], float("inf"), dtype=tl.float32)
    arg = tl.full([BP, VB], -1, dtype=tl.int32)
    row = nodes * width
    for j in range(0, width):
        entry = tl.load(table_ptr + row + j, mask=node_ok, other=-1)
        entry_ok = (entry >= 0) & (entry < V)
        safe = tl.where(entry_ok, entry, 0)
        z = tl.load(z_ptr + pixel_offset[:, None] + safe[None, :] * stride_v,
                    mask=pixel_ok[:, None] & entry_ok[None, :], other=0.0).to(tl.float32)
        if LARGEST:
            better = replaces_max(z, best)
        else:
            better = _replaces_min(z, best)
        # The first valid entry always enters (also a ±inf that cannot beat the start).
        take = entry_ok[None, :] & ((arg < 0) | better)
        best = tl.where(take, z, best)
        arg = tl.where(take, safe.to(tl.int32)[None, :], arg)
    return best, arg


@triton.jit
def _node_chunk(z_ptr, pixel_offset, valid, stride_v, label, anc_ptr, L, desc_ptr, S, w_ptr, v0, V, gamma, eps,
                FOCAL: tl.constexpr, BACKWARD: tl.constexpr, BP: tl.constexpr, VB: tl.constexpr):
    """For the nodes v0 .. v0 + VB of the pixels with ``valid`` labels: forward, (w_v·t_v
    [BP, VB], 0 where masked); backward, (∂t/∂m·w_v [BP, VB], 0 where masked, and the
    target node [BP, VB] int32, −1 where masked)."""
    nodes = v0 + tl.arange(0, VB).to(tl.int64)
    node_ok = nodes < V
    # Positive nodes: those in row y of the ancestors.
    label_row = tl.where(valid, label, 0) * L
    positive = tl.zeros([BP, VB], dtype=tl.int1)
    for j in range(0, L):
        on_path = tl.load(anc_ptr + label_row + j, mask=valid, other=-1)
        positive = positive | (on_path[:, None] == nodes[None, :])
    ok = valid[:, None] & node_ok[None, :]
    positive = positive & ok
    mcl, argmin = _first_extremum(z_ptr, pixel_offset, valid, stride_v, anc_ptr, L, nodes, node_ok, V,
                                  False, BP, VB)
    mcm, argmax = _first_extremum(z_ptr, pixel_offset, valid, stride_v, desc_ptr, S, nodes, node_ok, V,
                                  True, BP, VB)
    m = tl.where(positive, mcl, mcm)
    m = tl.where(ok, m, 0.0)
    # a: the probability the term rewards (p, or 1 − q); b = 1 − a; both as sigmoids.
    sigma, sigma_of_minus = _sigmoid(m), _sigmoid(-m)
    a = tl.where(positive, sigma, sigma_of_minus)
    b = tl.where(positive, sigma_of_minus, sigma)
    w = tl.load(w_ptr + nodes, mask=node_ok, other=0.0)[None, :]
    log_a = _log(a + eps)
    if BACKWARD:
        slope = a * (gamma * log_a - b / (a + eps))
        if FOCAL != "none":
            slope = slope * _focal_weight(b, gamma, FOCAL)
        slope = tl.where(positive, slope, -slope)
        target = tl.where(positive, argmin, argmax)
        return slope * w, tl.where(ok, target, -1)
    else:
        term = -log_a
        if FOCAL != "none":
            term = term * _focal_weight(b, gamma, FOCAL)
        return tl.where(ok, w * term, 0.0), tl.where(ok, 0, -1)


@triton.jit
def _pixels(labels_ptr, stride_lb, stride_lp, stride_zb, stride_zp, b, P, V, BP: tl.constexpr):
    """(pixels [BP] int64, in range, labelled (label in [0, V)), label, offset of node 0)."""
    pixels = tl.program_id(0).to(tl.int64) * BP + tl.arange(0, BP).to(tl.int64)
    in_range = pixels < P
    label = tl.load(labels_ptr + b * stride_lb + pixels * stride_lp, mask=in_range, other=-1)
    valid = in_range & (label >= 0) & (label < V)
    return pixels, in_range, valid, label, b * stride_zb + pixels * stride_zp


@triton.jit
def _tree_min_forward_kernel(z_ptr, stride_zb, stride_zv, stride_zp, labels_ptr, stride_lb, stride_lp, anc_ptr, L,
                             desc_ptr, S, w_ptr, loss_ptr, V, P, gamma, eps, FOCAL: tl.constexpr,
                             ONE_CHUNK: tl.constexpr, BP: tl.constexpr, VB: tl.constexpr):
    """loss[b, p] = Σ_v w_v·t_v for a labelled pixel, 0 for an ignored one."""
    b = tl.program_id(1).to(tl.int64)
    pixels, in_range, valid, label, pixel_offset = _pixels(labels_ptr, stride_lb, stride_lp, stride_zb, stride_zp,
                                                           b, P, V, BP)
    if ONE_CHUNK:  # V <= VB
        terms, _ = _node_chunk(z_ptr, pixel_offset, valid, stride_zv, label, anc_ptr, L, desc_ptr, S, w_ptr, 0, V,
                               gamma, eps, FOCAL, False, BP, VB)
        loss = tl.sum(terms, axis=1)
    else:
        loss = tl.zeros([BP], dtype=tl.float32)
        for v0 in range(0, V, VB):
            terms, _ = _node_chunk(z_ptr, pixel_offset, valid, stride_zv, label, anc_ptr, L, desc_ptr, S, w_ptr, v0,
                                   V, gamma, eps, FOCAL, False, BP, VB)
            loss += tl.sum(terms, axis=1)
    tl.store(loss_ptr + b * P + pixels, tl.where(valid, loss, 0.0), mask=in_range)


@triton.jit
def _tree_min_backward_kernel(g_ptr, stride_gb, stride_gp, z_ptr, stride_zb, stride_zv, stride_zp, labels_ptr,
                              stride_lb, stride_lp, anc_ptr, L, desc_ptr, S, w_ptr, out_ptr, stride_ob, stride_ov,
                              stride_op, V, P, gamma, eps, FOCAL: tl.constexpr, ONE_CHUNK: tl.constexpr,
                              BP: tl.constexpr, VB: tl.constexpr):
    """out[b, u, p] = Σ_v g·w_v·∂t_v/∂m over the nodes v whose target is u; 0 when ignored."""
    b = tl.program_id(1).to(tl.int64)
    pixels, in_range, valid, label, pixel_offset = _pixels(labels_ptr, stride_lb, stride_lp, stride_zb, stride_zp,
                                                           b, P, V, BP)
    g = tl.load(g_ptr + b * stride_gb + pixels * stride_gp, mask=valid, other=0.0).to(tl.float32)
    out = out_ptr + b * stride_ob + pixels * stride_op
    if ONE_CHUNK:  # V <= VB: every contribution at once, each output node's column stored as formed
        slope, target = _node_chunk(z_ptr, pixel_offset, valid, stride_zv, label, anc_ptr, L, desc_ptr, S, w_ptr, 0,
                                    V, gamma, eps, FOCAL, True, BP, VB)
        contribution = tl.where(target >= 0, slope * g[:, None], 0.0)
        for u in range(0, V):
            routed = tl.sum(tl.where(target == u, contribution, 0.0), axis=1)
            tl.store(out + u * stride_ov, _to_output(routed, out_ptr.dtype.element_ty), mask=in_range)
    else:  # one [BP, VB] output tile at a time, from every node chunk (recomputed per tile)
        for u0 in range(0, V, VB):
            outputs = u0 + tl.arange(0, VB)
            grad = tl.zeros([BP, VB], dtype=tl.float32)
            for v0 in range(0, V, VB):
                slope, target = _node_chunk(z_ptr, pixel_offset, valid, stride_zv, label, anc_ptr, L, desc_ptr, S,
                                            w_ptr, v0, V, gamma, eps, FOCAL, True, BP, VB)
                contribution = tl.where(target >= 0, slope * g[:, None], 0.0)
                for u in range(u0, tl.minimum(u0 + VB, V)):
                    routed = tl.sum(tl.where(target == u, contribution, 0.0), axis=1)
                    grad = tl.where(outputs[None, :] == u, grad + routed[:, None], grad)
            uu = outputs.to(tl.int64)
            tl.store(out[:, None] + uu[None, :] * stride_ov, _to_output(grad, out_ptr.dtype.element_ty),
                     mask=in_range[:, None] & (uu < V)[None, :])


def _focal(focal_gamma: float) -> str:
    if focal_gamma == 0:
        return FOCAL_NONE
    return FOCAL_SQUARE if focal_gamma == 2 else FOCAL_POW


def _tree_args(logits: Tensor, labels: Tensor, ancestors: Tensor, descendants: Tensor,
               node_weights: Tensor) -> tuple[Any, ...]:
    """The launch arguments both kernels share: logits and labels with their strides, then
    the tree (contiguous int64 tables and their widths, fp32 weights: tiny copies at most)."""
    check_dtype(OP, "logits", logits)
    v = logits.shape[1]
    for name, table in (("ancestors", ancestors), ("descendants", descendants)):
        if table.dim() != 2 or table.shape[0] != v:
            raise ValueError(f"{OP}: {name} must have shape [{v}, width], got {tuple(table.shape)}")
    if tuple(node_weights.shape) != (v,):
        raise ValueError(f"{OP}: node_weights must have shape [{v}], got {tuple(node_weights.shape)}")
    labels = labels.to(torch.int64)
    anc, desc = ancestors.to(torch.int64).contiguous(), descendants.to(torch.int64).contiguous()
    return (logits, *logits.stride(), labels, *labels.stride(), anc, anc.shape[1], desc, desc.shape[1],
            node_weights.to(torch.float32).contiguous())


def _constexprs(device: torch.device, v: int, focal_gamma: float) -> dict[str, Any]:
    block_p, block_v = _blocks(device, v)
    return {"FOCAL": _focal(focal_gamma), "ONE_CHUNK": v <= block_v, "BP": block_p, "VB": block_v,
            "num_warps": NUM_WARPS}


def tree_min_forward(
    logits: Tensor, labels: Tensor, ancestors: Tensor, descendants: Tensor, node_weights: Tensor,
    focal_gamma: float, eps: float,
) -> Tensor:
    args = _tree_args(logits, labels, ancestors, descendants, node_weights)
    batch, v, pixels = logits.shape
    loss = torch.empty(batch, pixels, dtype=torch.float32, device=logits.device)
    flags = _constexprs(logits.device, v, focal_gamma)
    launch(_tree_min_forward_kernel, (triton.cdiv(pixels, flags["BP"]), batch), *args, loss, v, pixels,
           float(focal_gamma), float(eps), **flags)
    return loss


def tree_min_backward(
    grad_loss: Tensor, logits: Tensor, labels: Tensor, ancestors: Tensor, descendants: Tensor,
    node_weights: Tensor, focal_gamma: float, eps: float,
) -> Tensor:
    args = _tree_args(logits, labels, ancestors, descendants, node_weights)
    batch, v, pixels = logits.shape
    grad_loss = grad_loss.to(torch.float32).expand(batch, pixels)  # read through its strides (0 if expanded)
    grad = torch.empty_like(logits)  # dense logits keep their layout; the kernel writes through its strides
    flags = _constexprs(logits.device, v, focal_gamma)
    launch(_tree_min_backward_kernel, (triton.cdiv(pixels, flags["BP"]), batch), grad_loss, *grad_loss.stride(),
           *args, grad, *grad.stride(), v, pixels, float(focal_gamma), float(eps), **flags)
    return grad
