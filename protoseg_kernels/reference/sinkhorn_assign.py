"""Reference kernels of the Sinkhorn β recurrence (docs/spec.md §3.4).

Segmented reductions over the pixels of each class are one-hot matmuls
([N, C]ᵀ·[N, K]), which are deterministic on every device.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._common import flat_similarity


def _one_hot(segment: Tensor, num_classes: int, dtype: torch.dtype) -> Tensor:
    """[N, C] membership matrix; all-zero rows for ignored pixels (segment -1).

    A comparison rather than F.one_hot, which reads the indices' range on the host
    (a synchronisation on a GPU)."""
    classes = torch.arange(num_classes, device=segment.device)
    return (segment.unsqueeze(1) == classes).to(dtype)


def _class_sums(segment: Tensor, num_classes: int, values: Tensor) -> Tensor:
    """[C, K] sums of ``values`` [N, K] over each class's pixels, as a one-hot matmul; a NaN
    reaches its own class only (in the matmul, 0·NaN would spread it to every class)."""
    one_hot = _one_hot(segment, num_classes, values.dtype).T
    nan = torch.isnan(values)
    sums = one_hot @ torch.where(nan, 0.0, values)
    return torch.where(one_hot @ nan.to(values.dtype) > 0, float("nan"), sums)


def _per_pixel_beta(beta: Tensor, segment: Tensor) -> Tensor:
    return beta[segment.clamp_min(0)]


def sinkhorn_logits(
    x: Tensor, prototypes: Tensor, segment: Tensor, normalize: bool, epsilon: float
) -> Tensor:
    num_classes, per_class, _ = prototypes.shape
    s = flat_similarity(x, prototypes, normalize).reshape(-1, num_classes, per_class)
    own = s.gather(1, segment.clamp_min(0).view(-1, 1, 1).expand(-1, 1, per_class)).squeeze(1)
    return torch.where((segment >= 0).unsqueeze(1), own / epsilon, 0.0)


def sinkhorn_class_logsumexp(
    logits: Tensor, segment: Tensor, num_classes: int
) -> tuple[Tensor, Tensor]:
    per_class = logits.shape[1]
    valid = (segment >= 0).unsqueeze(1)
    rows = segment.clamp_min(0).unsqueeze(1).expand(-1, per_class)
    masked = torch.where(valid, logits, float("-inf"))
    m = logits.new_full((num_classes, per_class), float("-inf"))
    m = m.scatter_reduce(0, rows, masked, reduce="amax")
    shift = torch.where(valid, m.gather(0, rows), 0.0)
    shifted = torch.where(valid, torch.exp(logits - shift), 0.0)
    return m, _class_sums(segment, num_classes, shifted)


def sinkhorn_marginals(logits: Tensor, segment: Tensor, beta: Tensor) -> Tensor:
    q = torch.softmax(logits + _per_pixel_beta(beta, segment), dim=1)
    return _class_sums(segment, beta.shape[0], q)


def sinkhorn_finalize(
    logits: Tensor, segment: Tensor, beta: Tensor, return_q: bool
) -> tuple[Tensor, Tensor]:
    valid = segment >= 0
    z = logits + _per_pixel_beta(beta, segment)
    index = torch.where(valid & ~torch.isnan(z).any(dim=1), z.argmax(dim=1), -1)
    if not return_q:
        return index, logits.new_empty(0)
    q = torch.where(valid.unsqueeze(1), torch.softmax(z, dim=1), 0.0)
    return index, q
