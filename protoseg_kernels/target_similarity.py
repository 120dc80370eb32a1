"""``target_similarity``: each pixel's similarity to its target prototype (docs/spec.md §3.7).

s_i = ⟨x̂_i, P̂_{t_i}⟩ for a valid flat target t_i = c·K + k, 0 for ignored pixels.
It is what ``ppc_ppd_loss(..., lse=...)`` still needs once ``class_scores`` has
given the log-sum-exp: ppc_i = lse_i − s_i/τ, ppd_i = (1 − s_i)² (docs/spec.md §7's 3-GEMM
head). The work is a gathered dot product, N·D, so one portable PyTorch
implementation serves every device; there are no backend kernels.

Memory: gathering ``P̂[target]`` with autograd would keep an [N, D] tensor alive
until backward. Here the target rows are gathered block by block into one reused
buffer of at most ⌈N/ROW_BLOCKS⌉ rows, in forward and again in backward, and
nothing of size N×D is saved besides ``x`` itself.

Gradient (x̂ = x/max(‖x‖, ε), as F.normalize):
* dx_i = g_i·P̂_t without normalisation; with it g_i·(P̂_t − s_i·x̂_i)/‖x_i‖, or
  g_i·P̂_t/ε where the norm is clamped.
* dP̂_t = Σ_{i: t_i = t} g_i·x̂_i, then through the normalisation of P. The sum
  is deterministic: pixels are stably sorted by target and reduced segment by
  segment in a fixed order (no floating-point atomics on any device).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._checks import (
    IGNORE_INDEX,
    check_bool,
    check_features_and_prototypes,
    check_index_range,
    check_index_tensor,
    check_int,
    sanitize_index,
)
from ._op_utils import compute_dtype, fake_similarity_grads, keep_ungiven_grads_none, or_empty
from .reference._common import NORM_EPS, normalize_rows, normalize_rows_backward

OP = "target_similarity"
ROW_BLOCKS = 8  # the gathered rows live in a buffer of at most ⌈N/8⌉ × D elements


def _row_blocks(n: int) -> list[slice]:
    rows = max(1, -(-n // ROW_BLOCKS))
    return [slice(start, min(start + rows, n)) for start in range(0, n, rows)]


def _flat_prototypes(prototypes: Tensor, dtype: torch.dtype, normalize: bool) -> Tensor:
    """P̂ [C·K, D] in the compute dtype (C·K·D work: small)."""
    flat = prototypes.reshape(-1, prototypes.shape[-1]).to(dtype)
    return normalize_rows(flat) if normalize else flat


def _gather(flat: Tensor, safe_target: Tensor, rows: slice, buffer: Tensor) -> Tensor:
    """flat[safe_target[rows]] written into (a prefix of) ``buffer``."""
    return torch.index_select(flat, 0, safe_target[rows], out=buffer[: rows.stop - rows.start])


def _forward(x: Tensor, prototypes: Tensor, target: Tensor, normalize: bool) -> Tensor:
    """s [N] in the compute dtype; ``target`` is sanitised (ignored = -1)."""
    dtype = compute_dtype(x.dtype)
    flat = _flat_prototypes(prototypes, dtype, normalize)
    safe = target.clamp_min(0)
    s = x.new_empty(x.shape[0], dtype=dtype)
    blocks = _row_blocks(x.shape[0])
    buffer = x.new_empty(blocks[0].stop if blocks else 0, x.shape[1], dtype=dtype)
    for rows in blocks:
        xb = x[rows].to(dtype)
        torch.sum(_gather(flat, safe, rows, buffer).mul_(xb), dim=1, out=s[rows])
        if normalize:
            s[rows] /= xb.norm(dim=1).clamp_min(NORM_EPS)
    return torch.where(target >= 0, s, 0.0)


def _grad_x_block(xb: Tensor, pb: Tensor, gb: Tensor, normalize: bool) -> Tensor:
    """dx of one row block (compute dtype); ``pb`` (the gathered P̂_t) is overwritten."""
    if not normalize:
        return pb.mul_(gb.unsqueeze(1))
    norm = xb.norm(dim=1, keepdim=True)
    clamped = norm.clamp_min(NORM_EPS)
    s = (pb * xb).sum(dim=1, keepdim=True) / clamped
    radial = torch.where(norm > NORM_EPS, s / clamped, 0.0)  # P̂_t − radial·x = P̂_t − s·x̂
    return pb.addcmul_(xb, radial, value=-1).mul_(gb.unsqueeze(1) / clamped)


def _grad_prototypes(
    grad: Tensor, x: Tensor, prototypes: Tensor, target: Tensor, normalize: bool
) -> Tensor:
    """dP [C, K, D]: segment sums of g_i·x̂_i over the pixels sorted by target, one
    block of sorted pixels at a time, blocks added in order (deterministic)."""
    dtype = grad.dtype
    segments = prototypes.shape[0] * prototypes.shape[1]
    key = torch.where(target >= 0, target, segments)  # ignored pixels: one extra segment
    order = torch.argsort(key, stable=True)
    sorted_key = key[order]
    grad_hat = x.new_zeros(segments + 1, x.shape[1], dtype=dtype)
    ones = torch.ones_like(sorted_key)
    for rows in _row_blocks(x.shape[0]):
        xb = x[order[rows]].to(dtype)
        if normalize:
            xb = normalize_rows(xb)
        lengths = torch.zeros(segments + 1, dtype=torch.int64, device=x.device)
        lengths.scatter_add_(0, sorted_key[rows], ones[rows])  # integer counts: exact
        weighted = xb.mul_(grad[order[rows]].unsqueeze(1))
        grad_hat += torch.segment_reduce(weighted, "sum", lengths=lengths, axis=0, unsafe=True)
    grad_hat = grad_hat[:segments]
    if normalize:
        grad_hat = normalize_rows_backward(prototypes.reshape(grad_hat.shape).to(dtype), grad_hat)
    return grad_hat.reshape(prototypes.shape).to(prototypes.dtype)


def _backward(
    grad: Tensor, x: Tensor, prototypes: Tensor, target: Tensor, normalize: bool,
    need_prototype_grad: bool,
) -> tuple[Tensor, Tensor | None]:
    dtype = compute_dtype(x.dtype)
    grad = torch.where(target >= 0, grad.to(dtype), 0.0)  # s is the constant 0 at ignored pixels
    flat = _flat_prototypes(prototypes, dtype, normalize)
    safe = target.clamp_min(0)
    grad_x = torch.empty_like(x)
    blocks = _row_blocks(x.shape[0])
    buffer = x.new_empty(blocks[0].stop if blocks else 0, x.shape[1], dtype=dtype)
    for rows in blocks:
        pb = _gather(flat, safe, rows, buffer)
        grad_x[rows] = _grad_x_block(x[rows].to(dtype), pb, grad[rows], normalize)
    grad_p = _grad_prototypes(grad, x, prototypes, target, normalize) if need_prototype_grad else None
    return grad_x, grad_p


def _sanitized(target: Tensor, prototypes: Tensor, ignore_index: int) -> Tensor:
    return sanitize_index(target, prototypes.shape[0] * prototypes.shape[1], ignore_index)


@torch.library.custom_op("protoseg::target_similarity", mutates_args=())
def _target_similarity_op(
    x: Tensor, prototypes: Tensor, target: Tensor, normalize: bool, ignore_index: int,
    validate: bool,
) -> Tensor:
    if validate:
        upper = prototypes.shape[0] * prototypes.shape[1]
        check_index_range(OP, "target", target, upper, ignore_index, "flat prototype indices")
    return _forward(x, prototypes, _sanitized(target, prototypes, ignore_index), normalize)


@_target_similarity_op.register_fake
def _(x, prototypes, target, normalize, ignore_index, validate):
    return x.new_empty(x.shape[0], dtype=compute_dtype(x.dtype))


@torch.library.custom_op("protoseg::target_similarity_backward", mutates_args=())
def _target_similarity_backward_op(
    grad: Tensor, x: Tensor, prototypes: Tensor, target: Tensor, normalize: bool,
    ignore_index: int, need_prototype_grad: bool,
) -> tuple[Tensor, Tensor]:
    grad_x, grad_p = _backward(
        grad, x, prototypes, _sanitized(target, prototypes, ignore_index), normalize,
        need_prototype_grad,
    )
    return grad_x, or_empty(grad_p, prototypes)


@_target_similarity_backward_op.register_fake
def _(grad, x, prototypes, target, normalize, ignore_index, need_prototype_grad):
    return fake_similarity_grads(x, prototypes, need_prototype_grad)


def _setup_context(ctx, inputs, output):
    x, prototypes, target, normalize, ignore_index, _ = inputs
    ctx.save_for_backward(x, prototypes, target)
    ctx.args = (normalize, ignore_index)
    keep_ungiven_grads_none(ctx)


def _autograd_backward(ctx, grad):
    nones = (None,) * 4
    if grad is None:
        return (None, None, *nones)
    x, prototypes, target = ctx.saved_tensors
    need_p = ctx.needs_input_grad[1]
    grad_x, grad_p = _target_similarity_backward_op(grad, x, prototypes, target, *ctx.args, need_p)
    return (grad_x, grad_p if need_p else None, *nones)


_target_similarity_op.register_autograd(_autograd_backward, setup_context=_setup_context)


def target_similarity(
    x: Tensor,
    prototypes: Tensor,
    target: Tensor,
    *,
    normalize: bool = True,
    ignore_index: int = IGNORE_INDEX,
    validate: bool = True,
) -> Tensor:
    """Similarity [N] of each pixel to its target prototype, N·D work.

    Args:
        x: [N, D] pixel embeddings.
        prototypes: [C, K, D] (cast to ``x``'s dtype).
        target: [N] integer flat prototype indices c·K + k, or ``ignore_index``.
        normalize: cosine similarity (both l2-normalised inside the op) instead of
            the plain dot product; the same meaning as in every other op.
        ignore_index: target value of pixels without a target (their s is 0).
        validate: raise ``ValueError`` on targets outside [0, C·K) that are not
            ``ignore_index`` (one host sync); with ``False`` they are ignored.

    Returns:
        s [N], fp32 (fp64 for fp64 inputs), 0 at ignored pixels. Differentiable in
        ``x`` and, when it requires grad, in ``prototypes`` (deterministically).
    """
    x, prototypes = check_features_and_prototypes(OP, x, prototypes)
    target = check_index_tensor(OP, "target", target, x.shape[0], x.device)
    normalize = check_bool(OP, "normalize", normalize)
    ignore_index = check_int(OP, "ignore_index", ignore_index)
    validate = check_bool(OP, "validate", validate)
    return _target_similarity_op(x, prototypes, target, normalize, ignore_index, validate)
