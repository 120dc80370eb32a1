"""Triton kernels of ``pixel_contrast_loss`` (docs/spec.md §10.1), clients of the column engine.

Rows are the anchors â_i, columns the contrast set ĉ_j with its labels (in-batch: the
anchors themselves, column i excluded for row i); ℓ_ij = S_ij/τ with S the engine's
(normalised or raw) dot product. P(i) and N(i) are the labelled columns of the anchor's
label and of another one; an anchor labelled -1 has neither.

Forward (``_sweep.row_sweep``: S tile by tile, per-anchor running statistics, nothing of
size A·M):

* ContrastiveSeg, two sweeps. Sweep 1: log N_i = log Σ_{k∈N(i)} e^{ℓ_ik} as an online
  max-shifted sum. Sweep 2, with the final log N_i: per positive the term
  log(e^{ℓ_ip} + N_i) − ℓ_ip = softplus(log N_i − ℓ_ip), their sum, |P(i)|, and
  log B_i = log Σ_p e^{−logaddexp(ℓ_ip, log N_i)} online; loss_i = s·Σ_p term/|P(i)|.
* SupCon, one sweep: log_norm_i = log Σ_{P∪N} e^{ℓ_ij} online, Σ_p ℓ_ip and |P(i)|;
  loss_i = s·(log_norm_i − Σ_p ℓ_ip/|P(i)|).

s = τ/τ_b; loss_i = 0 where |P(i)| = 0. Every exponential is of a max-shifted or
non-positive value: no overflow at small τ. NaN in a taking-part entry reaches the loss
(the log of a NaN sum stays NaN).

Backward (``_similarity_grads``): ℓ recomputed tile by tile and, with w_i = g_i·s/|P(i)|
(0 where |P(i)| = 0), the gradient in ℓ of docs/spec.md §10.1:

    ContrastiveSeg: ∂ℓ_ip = −w_i·sigmoid(log N_i − ℓ_ip),  ∂ℓ_ik = w_i·e^{ℓ_ik + log B_i}
    SupCon:         ∂ℓ_ij = g_i·s·e^{ℓ_ij − log_norm_i} − w_i·[j ∈ P(i)]

(exponents ≤ log |P(i)|); dS = ∂ℓ/τ, d â = dS·Ĉ, d ĉ = dSᵀ·Â, each through the
normalisation. Against a bank, dx comes from the engine's dx pass and, when asked for,
d contrast from its dW pass (split partials added in split order, no atomics). In-batch
each anchor has both roles: the dW pass's fp32 sum seeds the dx pass's accumulator, so
dS·Â + dSᵀ·Â are added before the one normalisation backward
(``self_similarity_gradient``). With fp16/bf16 inputs the gradient is fp32-accurate up to
its final rounding: dS enters each product as a 16-bit hi + lo pair (``split_ds``), so
that the small entries of dS and their cancellations survive.

GEMM passes (one = A×D×M; in-batch M = A), forward + backward, as realised here:

* ContrastiveSeg: forward 2 (sweep 1, sweep 2). Constant bank: backward 2 (the dx pass
  recomputes S and multiplies dS·Ĉ), 4 in all. Bank with a gradient, or in-batch: the
  dW pass recomputes S again and multiplies dSᵀ·Â, backward 4, 6 in all.
* SupCon: forward 1. Constant bank 1 + 2 = 3; bank with a gradient, or in-batch,
  1 + 4 = 5.

These count fp32 inputs. With fp16/bf16 inputs each backward product is two tensor-core
dots (the hi + lo pair of dS): backward 3 with a constant bank, 6 otherwise, so
ContrastiveSeg 5 and 8, SupCon 4 and 7 dot passes.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._columns import Columns
from ._config import contrast_forward_tiles
from ._host import check_dtype
from ._similarity_grads import GradientSource, self_similarity_gradient, similarity_gradients
from ._sweep import SweepClient, row_sweep
from ._tiles import column_labels, logsumexp_merge, logsumexp_rows, logsumexp_value, natural_log

OP = "pixel_contrast_loss"


# ---- shared device helpers ----------------------------------------------------------

@triton.jit
def _pair_masks(row_label, rows, cols, tile, IN_BATCH: tl.constexpr):
    """[BN, tile] masks of P(i) and N(i): both ends labelled, column i excluded for row i
    in-batch. Rows outside the anchors carry label -1, columns outside the set too."""
    j, c, k, col_ok = tile
    col_label = column_labels(cols, tile)
    takes_part = (row_label[:, None] >= 0) & (col_label[None, :] >= 0)
    if IN_BATCH:
        takes_part = takes_part & (j.to(tl.int32)[None, :] != rows.to(tl.int32)[:, None])
    positive = takes_part & (col_label[None, :] == row_label[:, None])
    negative = takes_part & (col_label[None, :] != row_label[:, None])
    return positive, negative


@triton.jit
def _log1p(x):
    """log(1 + x) for x in [0, 1], to fp32's relative precision also for small x:
    ln(w)·x/(w − 1) with w = 1 + x rounded (Goldberg), x itself where w rounds to 1."""
    w = 1.0 + x
    exact = w == 1.0
    return tl.where(exact, x, natural_log(w) * (x / tl.where(exact, 1.0, w - 1.0)))


@triton.jit
def _softplus(u):
    """log(1 + e^u) without overflow; 0 at u = -inf, NaN stays NaN (through the log1p:
    the max may drop it)."""
    return tl.maximum(u, 0.0) + _log1p(tl.exp(-tl.abs(u)))


@triton.jit
def _masked_logsumexp_step(run_max, run_sum, z, mask):
    """The running (max, sum) of the row-wise log-sum-exp, with the tile's ``z`` on ``mask``."""
    tile_max, tile_sum = logsumexp_rows(tl.where(mask, z, float("-inf")), 1)
    return logsumexp_merge(run_max, run_sum, tile_max, tile_sum)


@triton.jit
def _count(mask):
    return tl.sum(mask.to(tl.int32), axis=1)


# ---- forward, ContrastiveSeg sweep 1: log N_i over the negatives -----------------

@triton.jit
def _negatives_start(rows, row_ok, op, FLAGS: tl.constexpr):
    label_ptr, inv_temperature, log_norm_ptr = op
    label = tl.load(label_ptr + rows, mask=row_ok, other=-1)
    return label, tl.full(rows.shape, float("-inf"), dtype=tl.float32), tl.zeros(rows.shape, dtype=tl.float32)


@triton.jit
def _negatives_step(state, s, rows, row_ok, cols, tile, op, FLAGS: tl.constexpr, KS: tl.constexpr,
                    BC: tl.constexpr):
    label, run_max, run_sum = state
    label_ptr, inv_temperature, log_norm_ptr = op
    positive, negative = _pair_masks(label, rows, cols, tile, FLAGS[0])
    run_max, run_sum = _masked_logsumexp_step(run_max, run_sum, s * inv_temperature, negative)
    return label, run_max, run_sum


@triton.jit
def _negatives_finish(state, rows, row_ok, op, FLAGS: tl.constexpr):
    label, run_max, run_sum = state
    label_ptr, inv_temperature, log_norm_ptr = op
    tl.store(log_norm_ptr + rows, logsumexp_value(run_max, run_sum), mask=row_ok)


# ---- forward, ContrastiveSeg sweep 2: the positives' terms and log B_i ------------

@triton.jit
def _positives_start(rows, row_ok, op, FLAGS: tl.constexpr):
    """(label, log N_i, |P|, Σ_p term, running max and sum of log B_i)."""
    label_ptr, log_norm_ptr, inv_temperature, scale, loss_ptr, positives_ptr, log_b_ptr = op
    label = tl.load(label_ptr + rows, mask=row_ok, other=-1)
    log_norm = tl.load(log_norm_ptr + rows, mask=row_ok, other=0.0)
    zero = tl.zeros(rows.shape, dtype=tl.float32)
    return (label, log_norm, tl.zeros(rows.shape, dtype=tl.int32), zero,
            tl.full(rows.shape, float("-inf"), dtype=tl.float32), zero)


@triton.jit
def _positives_step(state, s, rows, row_ok, cols, tile, op, FLAGS: tl.constexpr, KS: tl.constexpr,
                    BC: tl.constexpr):
    label, log_norm, count, terms, b_max, b_sum = state
    label_ptr, log_norm_ptr, inv_temperature, scale, loss_ptr, positives_ptr, log_b_ptr = op
    positive, negative = _pair_masks(label, rows, cols, tile, FLAGS[0])
    z = s * inv_temperature
    # log(e^ℓ + N) − ℓ = softplus(log N − ℓ): exact where ℓ dominates, unlike the difference.
    term = _softplus(log_norm[:, None] - z)
    terms += tl.sum(tl.where(positive, term, 0.0), axis=1)
    count += _count(positive)
    b_max, b_sum = _masked_logsumexp_step(b_max, b_sum, -(z + term), positive)  # −logaddexp(ℓ, log N)
    return label, log_norm, count, terms, b_max, b_sum


@triton.jit
def _positives_finish(state, rows, row_ok, op, FLAGS: tl.constexpr):
    label, log_norm, count, terms, b_max, b_sum = state
    label_ptr, log_norm_ptr, inv_temperature, scale, loss_ptr, positives_ptr, log_b_ptr = op
    loss = tl.where(count > 0, scale * terms / tl.maximum(count, 1).to(tl.float32), 0.0)
    tl.store(loss_ptr + rows, loss, mask=row_ok)
    tl.store(positives_ptr + rows, count.to(tl.int64), mask=row_ok)
    tl.store(log_b_ptr + rows, logsumexp_value(b_max, b_sum), mask=row_ok)


# ---- forward, SupCon: one sweep -----------------------------------------------------

@triton.jit
def _supcon_start(rows, row_ok, op, FLAGS: tl.constexpr):
    """(label, running max and sum over P ∪ N, Σ_p ℓ, |P|)."""
    label_ptr, inv_temperature, scale, loss_ptr, positives_ptr, log_norm_ptr = op
    label = tl.load(label_ptr + rows, mask=row_ok, other=-1)
    zero = tl.zeros(rows.shape, dtype=tl.float32)
    return label, tl.full(rows.shape, float("-inf"), dtype=tl.float32), zero, zero, tl.zeros(rows.shape, tl.int32)


@triton.jit
def _supcon_step(state, s, rows, row_ok, cols, tile, op, FLAGS: tl.constexpr, KS: tl.constexpr, BC: tl.constexpr):
    label, run_max, run_sum, positive_sum, count = state
    label_ptr, inv_temperature, scale, loss_ptr, positives_ptr, log_norm_ptr = op
    positive, negative = _pair_masks(label, rows, cols, tile, FLAGS[0])
    z = s * inv_temperature
    run_max, run_sum = _masked_logsumexp_step(run_max, run_sum, z, positive | negative)
    positive_sum += tl.sum(tl.where(positive, z, 0.0), axis=1)
    count += _count(positive)
    return label, run_max, run_sum, positive_sum, count


@triton.jit
def _supcon_finish(state, rows, row_ok, op, FLAGS: tl.constexpr):
    label, run_max, run_sum, positive_sum, count = state
    label_ptr, inv_temperature, scale, loss_ptr, positives_ptr, log_norm_ptr = op
    log_norm = logsumexp_value(run_max, run_sum)
    mean_positive = positive_sum / tl.maximum(count, 1).to(tl.float32)
    tl.store(loss_ptr + rows, tl.where(count > 0, scale * (log_norm - mean_positive), 0.0), mask=row_ok)
    tl.store(positives_ptr + rows, count.to(tl.int64), mask=row_ok)
    tl.store(log_norm_ptr + rows, log_norm, mask=row_ok)


# ---- backward: dS of one tile ---------------------------------------------------------

@triton.jit
def _logit_grad(s, rows, row_ok, cols, tile, op, FLAGS: tl.constexpr, KS: tl.constexpr, BC: tl.constexpr):
    """dS = ∂loss/∂ℓ / τ on the tile (FLAGS: in-batch, supcon); 0 off P(i) ∪ N(i)."""
    g_ptr, stride_g, label_ptr, positives_ptr, log_norm_ptr, log_b_ptr, inv_temperature, scale = op
    label = tl.load(label_ptr + rows, mask=row_ok, other=-1)
    count = tl.load(positives_ptr + rows, mask=row_ok, other=0)
    has_positive = count > 0
    g = tl.load(g_ptr + rows * stride_g, mask=has_positive, other=0.0).to(tl.float32)
    coefficient = tl.where(has_positive, g * scale, 0.0)  # g_i·τ/τ_b
    w = coefficient / tl.maximum(count, 1).to(tl.float32)  # w_i
    # The statistics of anchors without a positive are never used (their gradient is 0).
    log_norm = tl.load(log_norm_ptr + rows, mask=has_positive, other=0.0)
    positive, negative = _pair_masks(label, rows, cols, tile, FLAGS[0])
    # Rows without a positive get 0 by the masks, not by w = 0: their statistics are the
    # loads' 0, and exp(ℓ) alone overflows for |ℓ| up to 1/τ (0·inf would be NaN).
    positive &= has_positive[:, None]
    negative &= has_positive[:, None]
    z = s * inv_temperature
    if FLAGS[1]:  # SupCon
        softmax = tl.exp(z - log_norm[:, None])
        grad = tl.where(positive | negative, coefficient[:, None] * softmax, 0.0)
        grad -= tl.where(positive, w[:, None], 0.0)
    else:
        log_b = tl.load(log_b_ptr + rows, mask=has_positive, other=0.0)
        one_minus_sigma = 1.0 / (1.0 + tl.exp(z - log_norm[:, None]))  # sigmoid(log N − ℓ); 0 at N = 0
        on_negatives = tl.where(negative, w[:, None] * tl.exp(z + log_b[:, None]), 0.0)
        grad = tl.where(positive, -w[:, None] * one_minus_sigma, on_negatives)
    return grad * inv_temperature


# ---- host -----------------------------------------------------------------------------

def _columns(anchors: Tensor, anchor_labels: Tensor, contrast: Tensor, contrast_labels: Tensor,
             in_batch: bool) -> Columns:
    """The contrast set as labelled engine columns; in-batch the anchors themselves (the
    same tensor, so the engine knows the columns are the rows)."""
    if in_batch:
        return Columns(anchors, anchor_labels.contiguous())
    return Columns(contrast, contrast_labels.contiguous())


def _per_anchor(a: int, like: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    return torch.empty(a, dtype=dtype, device=like.device)


def pixel_contrast_forward(
    anchors: Tensor, anchor_labels: Tensor, contrast: Tensor, contrast_labels: Tensor,
    in_batch: bool, normalize: bool, temperature: float, base_temperature: float, supcon: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(loss [A], |P| [A] int64, log_norm [A], log_b [A] or empty), fp32."""
    check_dtype(OP, "anchors", anchors)
    columns = _columns(anchors, anchor_labels, contrast, contrast_labels, in_batch)
    labels = anchor_labels.contiguous()
    a = anchors.shape[0]
    loss, log_norm, positives = _per_anchor(a, anchors), _per_anchor(a, anchors), _per_anchor(a, anchors, torch.int64)
    tiles = contrast_forward_tiles(anchors.device, anchors.dtype, columns.m, a)
    inv_temperature, scale = 1.0 / temperature, temperature / base_temperature
    flags = (in_batch,)
    if supcon:
        client = SweepClient(_supcon_start, _supcon_step, _supcon_finish, flags=flags,
                             args=(labels, inv_temperature, scale, loss, positives, log_norm))
        row_sweep(anchors, columns, client, normalize, tiles)
        return loss, positives, log_norm, _per_anchor(0, anchors)
    log_b = _per_anchor(a, anchors)
    negatives = SweepClient(_negatives_start, _negatives_step, _negatives_finish, flags=flags,
                            args=(labels, inv_temperature, log_norm))
    row_sweep(anchors, columns, negatives, normalize, tiles)
    positive_terms = SweepClient(_positives_start, _positives_step, _positives_finish, flags=flags,
                                 args=(labels, log_norm, inv_temperature, scale, loss, positives, log_b))
    row_sweep(anchors, columns, positive_terms, normalize, tiles)
    return loss, positives, log_norm, log_b


def pixel_contrast_backward(
    grad_loss: Tensor, anchors: Tensor, anchor_labels: Tensor, contrast: Tensor, contrast_labels: Tensor,
    positives: Tensor, log_norm: Tensor, log_b: Tensor, in_batch: bool, normalize: bool, temperature: float,
    base_temperature: float, supcon: bool, need_contrast_grad: bool,
) -> tuple[Tensor, Tensor | None]:
    """(d anchors [A, D], d contrast [M, D] or None) in the inputs' dtype."""
    check_dtype(OP, "anchors", anchors)
    columns = _columns(anchors, anchor_labels, contrast, contrast_labels, in_batch)
    need_contrast_grad = need_contrast_grad and not in_batch
    if columns.m == 0:  # nothing to contrast with (the dx pass would have no tile to start its sum)
        return torch.zeros_like(anchors), torch.zeros_like(contrast) if need_contrast_grad else None
    source = GradientSource(
        _logit_grad, needs_similarity=True, flags=(in_batch, supcon), split_ds=True,
        args=(grad_loss, grad_loss.stride(0), anchor_labels.contiguous(), positives.contiguous(),
              log_norm.contiguous(), None if supcon else log_b.contiguous(), 1.0 / temperature,
              temperature / base_temperature),
    )
    if in_batch:
        return self_similarity_gradient(anchors, columns, source, normalize), None
    return similarity_gradients(anchors, columns, source, normalize, need_contrast_grad)
