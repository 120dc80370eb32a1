"""``tree_min_loss``: HSSN's tree-min loss over sigmoid node scores (docs/spec.md §11.1).

Logits z [N, V] or [B, V, H, W] score the V nodes of a :class:`~protoseg_kernels.Hierarchy`
(s_v = σ(z_v)). For pixel i with leaf label y_i the positive nodes are y_i and its ancestors.
With MCL_v = min of s over v and its ancestors, MCM_v = max of s over v and its descendants:

    t_iv = −(1 − MCL_v)^γ·log(MCL_v + ε)    (v positive)
    t_iv = −MCM_v^γ·log(1 − MCM_v + ε)      (v negative)         (γ = 0 without focal_gamma)
    loss_i = scale·Σ_v t_iv/|level(v)|,     loss = Σ_valid loss_i / n_valid   ("mean")

The gradient goes through each min (max) to its first arg-min (arg-max) node, smallest node
index first; with p = MCL_v, q = MCM_v and the chain rule through σ:

    ∂t/∂z_{argmin} = p(1 − p)^γ·[γ·log(p + ε) − (1 − p)/(p + ε)]
    ∂t/∂z_{argmax} = q^γ(1 − q)·[q/(1 − q + ε) − γ·log(1 − q + ε)]

A fused backend reads the logits in place (no permuted copy) once forward and once backward,
and allocates only the per-pixel loss forward and the gradient backward: no one-hot targets,
no [B, V, H, W] temporaries. Backends: reference/tree_min_loss.py, csrc/cpu/tree_min_loss.cpp,
csrc/cuda/tree_min_loss.cu, triton/tree_min_loss.py.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ._backend import get_backend, resolve_backend
from ._checks import (
    IGNORE_INDEX,
    INDEX_DTYPES,
    check_bool,
    check_choice,
    check_float_tensor,
    check_index_range,
    check_int,
    check_positive_finite,
    check_tensor,
    sanitize_index,
)
from ._op_utils import compute_dtype, reduce_loss
from .hierarchy import Hierarchy

OP = "tree_min_loss"
REDUCTIONS = ("mean", "sum", "none")


@torch.library.custom_op("protoseg::tree_min_loss", mutates_args=())
def _tree_min_op(
    logits: Tensor, labels: Tensor, ancestors: Tensor, descendants: Tensor, node_weights: Tensor,
    num_leaves: int, focal_gamma: float, eps: float, ignore_index: int, validate: bool, backend: str,
) -> Tensor:
    """Per-pixel loss [B, P] of logits [B, V, P] (a view of the caller's tensor)."""
    if validate:
        check_index_range(OP, "labels", labels, num_leaves, ignore_index, "leaf class ids")
    return get_backend(backend).tree_min_forward(
        logits, sanitize_index(labels, num_leaves, ignore_index), ancestors, descendants, node_weights,
        focal_gamma, eps,
    )


@_tree_min_op.register_fake
def _(logits, labels, ancestors, descendants, node_weights, num_leaves, focal_gamma, eps, ignore_index,
      validate, backend):
    return logits.new_empty(labels.shape, dtype=compute_dtype(logits.dtype))


@torch.library.custom_op("protoseg::tree_min_loss_backward", mutates_args=())
def _tree_min_backward_op(
    grad_loss: Tensor, logits: Tensor, labels: Tensor, ancestors: Tensor, descendants: Tensor,
    node_weights: Tensor, num_leaves: int, focal_gamma: float, eps: float, ignore_index: int, backend: str,
) -> Tensor:
    """d logits, shaped like logits [B, V, P], in their dtype."""
    return get_backend(backend).tree_min_backward(
        grad_loss, logits, sanitize_index(labels, num_leaves, ignore_index), ancestors, descendants,
        node_weights, focal_gamma, eps,
    )


@_tree_min_backward_op.register_fake
def _(grad_loss, logits, labels, ancestors, descendants, node_weights, num_leaves, focal_gamma, eps,
      ignore_index, backend):
    return torch.empty_like(logits)


def _setup_context(ctx, inputs, output):
    logits, labels, ancestors, descendants, node_weights, num_leaves, focal_gamma, eps, ignore_index, _, \
        backend = inputs
    ctx.save_for_backward(logits, labels, ancestors, descendants, node_weights)
    ctx.args = (num_leaves, focal_gamma, eps, ignore_index, backend)


def _backward(ctx, grad_loss):
    logits, labels, ancestors, descendants, node_weights = ctx.saved_tensors
    grad = _tree_min_backward_op(grad_loss, logits, labels, ancestors, descendants, node_weights, *ctx.args)
    return (grad, *(None,) * 10)


_tree_min_op.register_autograd(_backward, setup_context=_setup_context)


def _nodes_as_channels(op: str, logits: object, num_nodes: int) -> tuple[Tensor, bool]:
    """(logits as a [B, V, P] view, whether they came as [N, V]); no copy for the usual
    layouts ([N, V] row-major, [B, V, H, W] contiguous or channels-last)."""
    logits = check_tensor(op, "logits", logits)
    if logits.dim() not in (2, 4):
        raise ValueError(f"{op}: logits must have shape [N, V] or [B, V, H, W], got shape {tuple(logits.shape)}")
    logits = check_float_tensor(op, "logits", logits, logits.dim(), "[N, V] or [B, V, H, W]")
    if logits.shape[1] != num_nodes:
        raise ValueError(f"{op}: logits must have one channel per node of the hierarchy (V = {num_nodes}) "
                         f"in dimension 1, got shape {tuple(logits.shape)}")
    if logits.dim() == 2:
        return logits.t().unsqueeze(0), True
    return logits.flatten(2), False


def check_pixel_labels(op: str, labels: object, logits: Tensor, flat: bool) -> Tensor:
    """Labels [N] (for [N, V] logits) or [B, H, W] (for [B, V, H, W]) as int64 [B, P]."""
    labels = check_tensor(op, "labels", labels)
    expected = (logits.shape[0],) if flat else (logits.shape[0], *logits.shape[2:])
    if labels.dtype not in INDEX_DTYPES:
        raise TypeError(f"{op}: labels must be an integer tensor, got dtype {labels.dtype}")
    if tuple(labels.shape) != expected:
        layout = "[N]" if flat else "[B, H, W]"
        raise ValueError(f"{op}: labels must have shape {layout} = {expected}, got shape {tuple(labels.shape)}")
    if labels.device != logits.device:
        raise ValueError(f"{op}: labels must be on the same device as logits ({logits.device}), got {labels.device}")
    pixels = labels.shape[0] if flat else math.prod(labels.shape[1:])  # explicit: -1 is ambiguous for B = 0
    return labels.long().reshape(1 if flat else labels.shape[0], pixels)


def check_hierarchy(op: str, hierarchy: object) -> Hierarchy:
    if not isinstance(hierarchy, Hierarchy):
        raise TypeError(f"{op}: hierarchy must be a protoseg_kernels.Hierarchy, got {type(hierarchy).__name__}")
    return hierarchy


def _check_gamma(focal_gamma: object) -> float:
    if focal_gamma is None:
        return 0.0
    if isinstance(focal_gamma, bool) or not isinstance(focal_gamma, (int, float)) \
            or not math.isfinite(focal_gamma) or focal_gamma < 0:
        raise ValueError(f"{OP}: focal_gamma must be None or a finite number >= 0, got {focal_gamma!r}")
    return float(focal_gamma)


def tree_min_loss(
    logits: Tensor,
    labels: Tensor,
    hierarchy: Hierarchy,
    *,
    focal_gamma: float | None = None,
    scale: float = 5.0,
    ignore_index: int = IGNORE_INDEX,
    eps: float = 1e-8,
    reduction: str = "mean",
    validate: bool = True,
) -> Tensor:
    """HSSN's tree-min loss (formulas in the module docstring, docs/spec.md §11.1).

    Args:
        logits: [N, V] or [B, V, H, W] floating node logits, V = ``hierarchy.num_nodes``
            (leaves first); read in place, never modified.
        labels: [N] or [B, H, W] integer leaf ids in [0, C) or ``ignore_index``.
        hierarchy: the class tree.
        focal_gamma: γ of the focal weighting, or ``None`` for none.
        scale: the loss's factor (5 in HSSN).
        ignore_index: label of pixels that take no part.
        eps: ε inside the logarithms.
        reduction: ``"mean"`` over valid pixels (0 with zero gradient when there is none),
            ``"sum"``, or ``"none"`` (the per-pixel loss shaped like ``labels``, 0 where ignored).
        validate: raise ``ValueError`` on a label outside [0, C) other than ``ignore_index``
            (one host synchronisation); with ``False`` such labels are ignored.

    Returns:
        The loss, fp32 (fp64 for fp64 logits), differentiable in ``logits``.
    """
    hierarchy = check_hierarchy(OP, hierarchy)
    logits3d, flat = _nodes_as_channels(OP, logits, hierarchy.num_nodes)
    pixel_labels = check_pixel_labels(OP, labels, logits, flat)
    focal_gamma = _check_gamma(focal_gamma)
    scale = check_positive_finite(OP, "scale", scale, logits.dtype)
    eps = check_positive_finite(OP, "eps", eps, logits.dtype)
    ignore_index = check_int(OP, "ignore_index", ignore_index)
    reduction = check_choice(OP, "reduction", reduction, REDUCTIONS)
    validate = check_bool(OP, "validate", validate)
    backend = resolve_backend(OP, logits.device, logits.dtype, argument="logits")
    tables = hierarchy.tables(logits.device)
    per_pixel = _tree_min_op(
        logits3d, pixel_labels, tables.ancestors, tables.descendants, tables.node_weights * scale,
        hierarchy.num_leaves, focal_gamma, eps, ignore_index, validate, backend,
    )
    valid = (pixel_labels != ignore_index) & (pixel_labels >= 0) & (pixel_labels < hierarchy.num_leaves)
    if reduction == "none":
        return per_pixel.reshape(labels.shape)
    return reduce_loss(per_pixel, valid, reduction)
