"""``update_prototypes``: the momentum update of the prototypes (docs/spec.md §3.5).

Pixel i contributes to prototype (labels_i, index_i) when its label is not
ignored, index_i >= 0 and mask_i. With s_ck = Σ x̂_i and n_ck the count:

    P_ck ← normalize(γ·P̂_ck + (1 − γ)·normalize(s_ck))   where n_ck > 0, else P̂_ck

The count only gates the update (the original behaviour). Sums use a fixed
summation order, so results are bitwise reproducible. With ``process_group``
the sums and counts are all-reduced before the update.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any, NamedTuple

import torch
from torch import Tensor

from ._backend import get_backend, resolve_backend
from ._checks import (
    IGNORE_INDEX,
    IndexRange,
    check_bool,
    check_features_and_prototypes,
    check_index_ranges,
    check_index_tensor,
    check_int,
    check_mask,
    check_unit_interval,
    sanitize_index,
    valid_index_mask,
)
from ._distributed import NO_GROUP, Reducer, group_name

OP = "update_prototypes"
UNASSIGNED = -1


class PrototypeUpdate(NamedTuple):
    prototypes: Tensor
    counts: Tensor


def _prototype_keys(
    labels: Tensor, index: Tensor, mask: Tensor | None, num_classes: int, per_class: int,
    ignore_index: int,
) -> Tensor:
    """Flat prototype c·K + k of each contributing pixel, -1 for the others."""
    segment = sanitize_index(labels, num_classes, ignore_index)
    slot = sanitize_index(index, per_class, UNASSIGNED)
    contributes = (segment >= 0) & (slot >= 0)
    if mask is not None:
        contributes &= mask
    return torch.where(contributes, segment * per_class + slot, -1)


def run_update(
    kernels: ModuleType, prototypes: Tensor, x: Tensor, labels: Tensor, index: Tensor,
    mask: Tensor | None, momentum: float, normalize: bool, ignore_index: int, validate: bool,
    reducer: Reducer,
) -> tuple[Tensor, Tensor]:
    """Segmented sums, all-reduce, momentum step; returns (new prototypes, counts [C, K])."""
    num_classes, per_class, _ = prototypes.shape
    if validate:
        # collective under a group: every rank raises, before any rank all-reduces
        check_index_ranges(OP, [
            IndexRange("labels", labels, num_classes, ignore_index, "class indices"),
            # only where the pixel is labelled: an ignored pixel's index is never read
            IndexRange("index", index, per_class, UNASSIGNED, "prototype indices", "-1 (unassigned)",
                       only=valid_index_mask(labels, num_classes, ignore_index)),
        ], reducer.group)
    key = _prototype_keys(labels, index, mask, num_classes, per_class, ignore_index)
    sums, counts = kernels.prototype_sums(x, key, num_classes * per_class, normalize)
    sums, counts = reducer.sum(sums), reducer.sum(counts)
    new = kernels.momentum_update(prototypes, sums, counts, momentum, normalize)
    return new, counts.view(num_classes, per_class)


@torch.library.custom_op("protoseg::update_prototypes", mutates_args=())
def _update_op(
    prototypes: Tensor, x: Tensor, labels: Tensor, index: Tensor, mask: Tensor | None,
    momentum: float, normalize: bool, ignore_index: int, validate: bool, backend: str,
    group: str = NO_GROUP,
) -> tuple[Tensor, Tensor]:
    # ``group``: the process group's name ("" for none); its all-reduces run in here.
    return run_update(
        get_backend(backend), prototypes, x, labels, index, mask, momentum, normalize,
        ignore_index, validate, Reducer(group),
    )


@_update_op.register_fake
def _(prototypes, x, labels, index, mask, momentum, normalize, ignore_index, validate, backend,
      group=NO_GROUP):
    c, k, _ = prototypes.shape
    return torch.empty_like(prototypes), prototypes.new_empty(c, k, dtype=torch.int64)


def update_prototypes(
    prototypes: Tensor,
    x: Tensor,
    labels: Tensor,
    index: Tensor,
    *,
    mask: Tensor | None = None,
    momentum: float = 0.999,
    normalize: bool = True,
    ignore_index: int = IGNORE_INDEX,
    process_group: Any | None = None,
    validate: bool = True,
) -> PrototypeUpdate:
    """Move each prototype towards the mean direction of the pixels assigned to it.

    Args:
        prototypes: [C, K, D] current prototypes.
        x: [N, D] pixel embeddings (cast to ``prototypes``' dtype is not done:
            ``x`` may be any floating dtype; sums are fp32, fp64 for fp64).
        labels: [N] integer class of each pixel, or ``ignore_index``.
        index: [N] integer prototype within the class, in [0, K), or -1 (none).
        mask: optional [N] bool; only pixels with ``mask`` True contribute
            (ProtoSeg passes "predicted class == label").
        momentum: γ in [0, 1]; 1 keeps the prototypes.
        normalize: l2-normalise ``x`` and ``prototypes`` first (else used as given).
        ignore_index: label of pixels to skip.
        process_group: a ``torch.distributed`` group whose ranks' sums and counts
            are added before the update; None: this process's pixels only. Its
            all-reduces run inside the custom op (also under ``torch.compile``).
        validate: raise ``ValueError`` on out-of-range labels/index; with
            ``False`` such pixels are skipped. With ``process_group`` the check is
            collective: every rank raises the same error, naming the rank the value
            was found on (one extra small all-reduce per call).

    Returns:
        ``PrototypeUpdate(prototypes [C, K, D] new tensor in prototypes' dtype,
        counts [C, K] int64)``. No gradient.
    """
    if isinstance(x, Tensor) and isinstance(prototypes, Tensor) and x.dim() == 3 and prototypes.dim() == 2:
        raise ValueError(f"{OP}: prototypes must have shape [C, K, D] and x [N, D], got prototypes "
                         f"{tuple(prototypes.shape)} and x {tuple(x.shape)}: the prototypes come first "
                         "(update_prototypes(prototypes, x, labels, index))")
    x, prototypes_as_x = check_features_and_prototypes(OP, x, prototypes)
    del prototypes_as_x  # checked for shape and device; the update keeps prototypes' dtype
    labels = check_index_tensor(OP, "labels", labels, x.shape[0], x.device)
    index = check_index_tensor(OP, "index", index, x.shape[0], x.device)
    if mask is not None:
        mask = check_mask(OP, mask, x.shape[0], x.device)
    momentum = check_unit_interval(OP, "momentum", momentum)
    normalize = check_bool(OP, "normalize", normalize)
    ignore_index = check_int(OP, "ignore_index", ignore_index)
    validate = check_bool(OP, "validate", validate)
    group = group_name(OP, process_group)
    x, prototypes = x.detach(), prototypes.detach()
    # The kernels compute in x's dtype; the prototypes' dtype only sets the output's, which
    # every backend honours (fp64 prototypes with fp32 x run on triton too).
    backend = resolve_backend(OP, x.device, x.dtype)
    new, counts = _update_op(
        prototypes, x, labels, index, mask, momentum, normalize, ignore_index, validate, backend,
        group,
    )
    return PrototypeUpdate(new, counts)
