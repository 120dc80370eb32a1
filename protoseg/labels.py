"""Label maps at feature resolution and their validation."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from protoseg_kernels._checks import first_bad_values, on_rank

INDEX_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)


def check_labels(
    labels: object, batch: int, num_classes: int, ignore_index: int, process_group: Any | None = None,
) -> Tensor:
    """``labels`` must be an integer [b, H, W] tensor of classes in [0, C) or ``ignore_index``.

    Reads the values once (one host synchronisation). With ``process_group`` the value check
    is collective (one extra small all-reduce): every rank raises the same error, naming the
    rank the bad value was found on, rather than one rank raising while the others wait in
    the step's collectives.
    """
    if not isinstance(labels, Tensor):
        raise TypeError(f"labels must be a torch.Tensor, got {type(labels).__name__}")
    if labels.dtype not in INDEX_DTYPES:
        raise TypeError(f"labels must be an integer tensor, got dtype {labels.dtype}")
    if labels.dim() != 3 or labels.shape[0] != batch:
        raise ValueError(f"labels must have shape [{batch}, H, W] (one map per image), got {tuple(labels.shape)}")
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= num_classes))
    if process_group is not None:
        found = first_bad_values([(labels, bad)], process_group)
        value = None if found is None else on_rank(found)
    else:
        value = int(labels[bad][0]) if bool(bad.any()) else None
    if value is not None:
        raise ValueError(
            f"labels must hold classes in [0, {num_classes}) or ignore_index={ignore_index}, found {value}"
        )
    return labels


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
