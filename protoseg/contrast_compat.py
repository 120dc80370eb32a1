"""The original ContrastiveSeg memory bank, bugs included (``compat="contrastiveseg"``,
docs/spec.md §10.3, §12). Use it only to reproduce the original code's results.

The original ``_dequeue_and_enqueue`` loops over images and over the classes of each image
(``unique``, ``nonzero`` and ``int(ptr)``: host synchronisations) and has three bugs that
this module keeps on purpose:

1. the pixel queue gets ``randperm(num_pixel)[:K]`` of *all* the image's pixels, i.e. K of the
   first ``num_pixel`` pixels in raster order, whatever their class (the class's own
   pixels were meant);
2. the pixel pointer advances by 1 instead of K (and when ``ptr + K >= L`` the K entries go
   to the last K slots and the pointer resets to 0);
3. class 0 is never stored (``x > 0`` was meant to drop the ignore label).

The original bank also starts from random unit vectors, every slot labelled with its class
(its loss contrasts with all of them from the first step): :func:`original_fill`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from protoseg_kernels import ClassMemoryBank
from protoseg_kernels.class_memory_bank import PIXEL, SEGMENT


@torch.no_grad()
def original_fill(bank: ClassMemoryBank, generator: torch.Generator | None = None) -> None:
    """Random unit vectors in every slot, each labelled with its class, as the original's
    ``register_buffer(..., randn(...))`` followed by a normalisation."""
    noise = torch.randn(bank.features.shape, generator=generator, dtype=torch.float32)
    bank.features.copy_(F.normalize(noise, dim=-1))
    classes = torch.arange(bank.num_classes, device=bank.labels.device)
    bank.labels.copy_(classes[None, :, None].expand_as(bank.labels))


@torch.no_grad()
def original_enqueue(bank: ClassMemoryBank, keys: Tensor, labels: Tensor, pixels_per_class: int,
                     ignore_index: int | None = None, generator: torch.Generator | None = None) -> None:
    """The original ``_dequeue_and_enqueue``: keys [B, D, h, w], labels [B, h, w] at the
    keys' resolution. ``ignore_index`` (default: the bank's) is skipped as the original
    skips its −1 label; ``generator`` drives the CPU ``randperm`` (default: the global one)."""
    ignore = bank.ignore_index if ignore_index is None else ignore_index
    size = bank.size
    segment_queue, pixel_queue = bank.features[SEGMENT], bank.features[PIXEL]
    segment_ptr, pixel_ptr = bank.pointers[SEGMENT], bank.pointers[PIXEL]
    batch_size, feat_dim = keys.shape[:2]
    for bs in range(batch_size):
        this_feat = keys[bs].contiguous().view(feat_dim, -1)
        this_label = labels[bs].contiguous().view(-1)
        this_label_ids = torch.unique(this_label)
        this_label_ids = [x for x in this_label_ids if x > 0 and x != ignore]
        for lb in this_label_ids:
            idxs = (this_label == lb).nonzero()
            feat = torch.mean(this_feat[:, idxs], dim=1).squeeze(1)
            ptr = int(segment_ptr[lb])
            segment_queue[lb, ptr, :] = F.normalize(feat.view(-1), p=2, dim=0)
            segment_ptr[lb] = (segment_ptr[lb] + 1) % size

            num_pixel = idxs.shape[0]
            perm = torch.randperm(num_pixel, generator=generator)
            k = min(num_pixel, pixels_per_class)
            feat = this_feat[:, perm[:k]]
            feat = torch.transpose(feat, 0, 1)
            ptr = int(pixel_ptr[lb])
            if ptr + k >= size:
                pixel_queue[lb, -k:, :] = F.normalize(feat, p=2, dim=1)
                pixel_ptr[lb] = 0
            else:
                pixel_queue[lb, ptr:ptr + k, :] = F.normalize(feat, p=2, dim=1)
                pixel_ptr[lb] = (pixel_ptr[lb] + 1) % size
