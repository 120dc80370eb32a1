"""Small helpers shared by the op modules (registration and autograd glue)."""

from __future__ import annotations

import torch
from torch import Tensor

NAMESPACE = "protoseg"


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype of the ops: float64 for float64 inputs, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def or_empty(t: Tensor | None, like: Tensor) -> Tensor:
    """Custom ops cannot return None: an absent tensor travels as an empty one."""
    return like.new_empty(0) if t is None else t


def prototype_grad_or_none(grad: Tensor, needed: bool) -> Tensor | None:
    return grad if needed else None


def fake_similarity_grads(x: Tensor, prototypes: Tensor, need_prototype_grad: bool) -> tuple[Tensor, Tensor]:
    """Fake (meta) outputs of every backward op: dx like x, dP like prototypes or empty."""
    grad_p = torch.empty_like(prototypes) if need_prototype_grad else prototypes.new_empty(0)
    return torch.empty_like(x), grad_p


def keep_ungiven_grads_none(ctx: object) -> None:
    """Ask autograd to pass ``None`` (not zeros) for outputs that got no gradient,
    so a backward kernel can skip the work for them."""
    ctx.set_materialize_grads(False)  # type: ignore[attr-defined]


def reduce_loss(per_item: Tensor, counted: Tensor, reduction: str) -> Tensor:
    """A per-item loss reduced as every loss op of the library does: ``"none"`` as is,
    ``"sum"``, or ``"mean"`` over the items where ``counted`` (bool) holds, which is 0 with
    zero gradient when none does (the original codes give NaN there)."""
    if reduction == "none":
        return per_item
    total = per_item.sum()
    if reduction == "sum":
        return total
    return total / counted.sum().clamp_min(1).to(total.dtype)
