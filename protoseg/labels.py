"""Label maps at feature resolution and their validation."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from protoseg_kernels._checks import INDEX_DTYPES, first_bad_values, on_rank


def check_labels(
    labels: object, batch: int, num_classes: int, ignore_index: int, process_group: Any | None = None,
) -> Tensor:
    """``labels`` must be an integer [b, H, W] tensor of classes in [0, C) or ``ignore_index``;
    returns them (a copy, as int64, without a process group; the use of the returned tensor is
    what keeps the check in a compiled graph).

    Reads the values once (one host synchronisation). Without ``process_group`` the value check
    is one opaque op (``protoseg::check_labels``), so a head that checks its labels still
    compiles as one graph (``torch.compile(fullgraph=True)``) and the check runs at every call
    of the compiled step. With ``process_group`` it is collective (one extra small all-reduce;
    eager only): every rank raises the same error, naming the rank the bad value was found on,
    rather than one rank raising while the others wait in the step's collectives.
    """
    if not isinstance(labels, Tensor):
        raise TypeError(f"labels must be a torch.Tensor, got {type(labels).__name__}")
    if labels.dtype not in INDEX_DTYPES:
        raise TypeError(f"labels must be an integer tensor, got dtype {labels.dtype}")
    if labels.dim() != 3 or labels.shape[0] != batch:
        raise ValueError(f"labels must have shape [{batch}, H, W] (one map per image), got {tuple(labels.shape)}")
    if process_group is None:
        return _checked_labels(labels, num_classes, ignore_index)
    found = first_bad_values([(labels, _out_of_range(labels, num_classes, ignore_index))], process_group)
    if found is not None:
        raise _label_error(num_classes, ignore_index, on_rank(found))
    return labels


def _out_of_range(labels: Tensor, num_classes: int, ignore_index: int) -> Tensor:
    return (labels != ignore_index) & ((labels < 0) | (labels >= num_classes))


def _label_error(num_classes: int, ignore_index: int, found: object) -> ValueError:
    return ValueError(f"labels must hold classes in [0, {num_classes}) or ignore_index={ignore_index}, found {found}")


@torch.library.custom_op("protoseg::check_labels", mutates_args=())
def _checked_labels(labels: Tensor, num_classes: int, ignore_index: int) -> Tensor:
    bad = _out_of_range(labels, num_classes, ignore_index)
    if bool(bad.any()):  # the one host synchronisation
        raise _label_error(num_classes, ignore_index, int(labels[bad][0]))
    return labels.to(torch.int64, copy=True)


@_checked_labels.register_fake
def _(labels: Tensor, num_classes: int, ignore_index: int) -> Tensor:
    return torch.empty_like(labels, dtype=torch.int64)


def downsample_labels(labels: Tensor, size: tuple[int, int]) -> Tensor:
    """Nearest-neighbour resampling of [b, H, W] labels to ``size`` (docs/spec.md §8.4).

    ``F.interpolate(mode="nearest")`` on float labels, as the original code does:
    for an integer factor it keeps the top-left pixel of each block. Integer
    labels below 2**24 are exact in float32.
    """
    if tuple(labels.shape[-2:]) == tuple(size):
        return labels.long()
    resized = F.interpolate(labels[:, None].float(), size=size, mode="nearest")
    return resized[:, 0].long()
