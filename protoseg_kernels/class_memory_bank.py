"""``ClassMemoryBank``: ContrastiveSeg's per-class segment and pixel queues (docs/spec.md §10.3).

Buffers (all in the ``state_dict``, all on the module's device):

* ``features`` [2, C, L, D]: queue 0 holds segment means, queue 1 single pixels;
* ``labels`` [2, C, L] int64: the class of each slot, ``ignore_index`` while it is empty;
* ``pointers`` [2, C] int64: the next slot each queue of each class writes.

``enqueue`` takes, for every image b and class c present in its labels, the normalised
mean of c's pixels (one segment entry) and ``pixels_per_class`` of c's pixels drawn
without replacement (pixel entries, each normalised). The entries of a queue are written
in order (image, then draw order) to consecutive slots modulo L from the pointer, which
advances by the number written; when more than L entries arrive at once the last L win.

Without a host synchronisation and without a loop over classes:

* segment sums are one batched GEMM with the one-hot labels (deterministic, unlike a
  floating-point scatter-add on a GPU);
* the draw ranks each (image, class) group's pixels by a random priority with two
  stable sorts (:mod:`protoseg_kernels._groups`) and keeps ranks below ``pixels_per_class``;
* the ring write visits a static window of W = min(entries per class, L) slots per class
  from its pointer: window position w takes the latest entry k ≡ w (mod L) when
  w < (entries of the class), else keeps its slot. The window's slots are distinct, so the
  scatter has no duplicate target and the result does not depend on write order.

With ``process_group``, every rank's (fixed-size) contributions are all-gathered and
applied in rank order, so all ranks hold the bank one process would hold after enqueueing
the concatenated batch. Every rank must pass embeddings of the same shape.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from ._checks import (
    FLOAT_DTYPES,
    IGNORE_INDEX,
    INDEX_DTYPES,
    check_bool,
    check_float_tensor,
    check_generator,
    check_index_range,
    check_int,
    check_tensor,
    sanitize_index,
)
from ._distributed import group_name
from ._groups import rank_within_groups

OP = "ClassMemoryBank"
SEGMENT, PIXEL = 0, 1  # the two queues of ``features``


class Contributions:
    """What one enqueue writes, per queue: entries [G, C, P, D] and valid [G, C, P], the
    valid entries of each (image, class) first (P = 1 for segments)."""

    def __init__(self, segments: Tensor, segment_valid: Tensor, pixels: Tensor, pixel_valid: Tensor) -> None:
        self.tensors = [segments, segment_valid, pixels, pixel_valid]

    def gathered(self, group: Any) -> Contributions:
        """The contributions of every rank of ``group``, concatenated in rank order."""
        world = dist.get_world_size(group)
        parts = []
        for t in self.tensors:
            wire = t.to(torch.uint8) if t.dtype == torch.bool else t.contiguous()
            received = [torch.empty_like(wire) for _ in range(world)]
            dist.all_gather(received, wire, group=group)
            joined = torch.cat(received)
            parts.append(joined.bool() if t.dtype == torch.bool else joined)
        return Contributions(*parts)


class ClassMemoryBank(nn.Module):
    """Per-class ring queues of segment means and pixel embeddings.

    Args:
        num_classes: C.
        size: L, slots per queue and class.
        dim: D, the embedding size.
        ignore_index: label of empty slots (use the ``ignore_index`` given to
            ``pixel_contrast_loss``).
        dtype: dtype of the stored features (float32 by default; anchors are cast to it).
        device: where the buffers live.
    """

    def __init__(
        self, num_classes: int, size: int, dim: int, *, ignore_index: int = IGNORE_INDEX,
        dtype: torch.dtype = torch.float32, device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        self.num_classes = check_int(OP, "num_classes", num_classes, minimum=1)
        self.size = check_int(OP, "size", size, minimum=1)
        self.dim = check_int(OP, "dim", dim, minimum=1)
        self.ignore_index = check_int(OP, "ignore_index", ignore_index)
        if dtype not in FLOAT_DTYPES:
            raise TypeError(f"{OP}: dtype must be a floating dtype, got {dtype}")
        shape = (2, self.num_classes, self.size)
        self.register_buffer("features", torch.zeros(*shape, self.dim, dtype=dtype, device=device))
        self.register_buffer("labels", torch.full(shape, self.ignore_index, dtype=torch.int64, device=device))
        self.register_buffer("pointers", torch.zeros(2, self.num_classes, dtype=torch.int64, device=device))

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}, size={self.size}, dim={self.dim}, ignore_index={self.ignore_index}"

    def contrast_set(self) -> tuple[Tensor, Tensor]:
        """(features [2·C·L, D], labels [2·C·L]): views of the buffers, stored by (queue,
        class, slot); empty slots carry ``ignore_index``."""
        return self.features.view(-1, self.dim), self.labels.view(-1)

    @torch.no_grad()
    def enqueue(
        self,
        embedding: Tensor,
        labels: Tensor,
        *,
        pixels_per_class: int = 10,
        generator: torch.Generator | None = None,
        priority: Tensor | None = None,
        process_group: Any | None = None,
        validate: bool = True,
    ) -> None:
        """Write this batch's segment means and drawn pixels into the queues.

        Args:
            embedding: [B, D, h, w] floating (read without gradient).
            labels: [B, h, w] integer classes in [0, C) or ``ignore_index``, at the
                embedding's resolution (the caller downsamples).
            pixels_per_class: pixels drawn per image and class (all of them when fewer).
            generator: draws the default priority (on the bank's device).
            priority: [B, h, w] floating: the drawn pixels of a class are those of lowest
                priority (ties in raster order); overrides ``generator``.
            process_group: gather every rank's contributions and apply them in rank order.
            validate: raise ``ValueError`` on a label outside [0, C) other than
                ``ignore_index`` (one host synchronisation); with ``False`` such pixels
                are skipped. With ``process_group`` the check is collective (one extra
                small all-reduce): every rank raises the same error, naming the rank.
        """
        if process_group is not None:
            group_name(f"{OP}.enqueue", process_group)  # raises on a bad group
        x, classes, priority, per_class = self._check_enqueue(
            embedding, labels, pixels_per_class, generator, priority, validate, process_group)
        contributions = self._contributions(x, classes, priority, per_class)
        if process_group is not None:
            contributions = contributions.gathered(process_group)
        segments, segment_valid, pixels, pixel_valid = contributions.tensors
        self._ring_write(SEGMENT, segments, segment_valid)
        self._ring_write(PIXEL, pixels, pixel_valid)

    # ------------------------------------------------------------------ checks
    def _check_enqueue(
        self, embedding: object, labels: object, pixels_per_class: object, generator: object,
        priority: object, validate: object, group: Any | None,
    ) -> tuple[Tensor, Tensor, Tensor, int]:
        x = check_float_tensor(OP, "embedding", embedding, 4, "[B, D, h, w]")
        batch, dim, height, width = x.shape
        if dim != self.dim:
            raise ValueError(f"{OP}.enqueue: embedding must have D = {self.dim} channels, got shape {tuple(x.shape)}")
        if x.device != self.features.device:
            raise ValueError(f"{OP}.enqueue: embedding must be on the bank's device ({self.features.device}), "
                             f"got {x.device}")
        labels = check_tensor(OP, "labels", labels)
        if labels.dtype not in INDEX_DTYPES:
            raise TypeError(f"{OP}.enqueue: labels must be an integer tensor, got dtype {labels.dtype}")
        if tuple(labels.shape) != (batch, height, width) or labels.device != x.device:
            raise ValueError(f"{OP}.enqueue: labels must have shape [B, h, w] = {(batch, height, width)} "
                             f"on {x.device} (the embedding's), got {tuple(labels.shape)} on {labels.device}")
        per_class = check_int(OP, "pixels_per_class", pixels_per_class, minimum=1)
        if check_bool(OP, "validate", validate):
            # collective under a group: every rank raises, before any rank gathers
            check_index_range(f"{OP}.enqueue", "labels", labels, self.num_classes, self.ignore_index, "classes",
                              group)
        classes = sanitize_index(labels, self.num_classes, self.ignore_index).view(batch, -1)
        return x, classes, self._priority(priority, generator, labels.shape, x.device), per_class

    def _priority(self, priority: object, generator: object, shape: torch.Size, device: torch.device) -> Tensor:
        if priority is None:
            generator = check_generator(f"{OP}.enqueue", generator, device, "embedding")
            return torch.rand(shape, generator=generator, device=device).view(shape[0], -1)
        t = check_tensor(OP, "priority", priority)
        if not t.is_floating_point() or t.shape != shape or t.device != device:
            raise ValueError(f"{OP}.enqueue: priority must be a floating [B, h, w] = {tuple(shape)} tensor on "
                             f"{device}, got {t.dtype} {tuple(t.shape)} on {t.device}")
        return t.reshape(shape[0], -1)

    # ----------------------------------------------------------- contributions
    def _contributions(self, x: Tensor, classes: Tensor, priority: Tensor, per_class: int) -> Contributions:
        batch, n = classes.shape
        flat_x = x.reshape(batch, self.dim, n)
        # Segment means: one-hot [B, C, n] × [B, n, D]; the norm of the sum is the mean's.
        one_hot = (classes[:, None, :] == torch.arange(self.num_classes, device=x.device)[None, :, None])
        sums = torch.bmm(one_hot.float(), flat_x.float().transpose(1, 2))
        segments = F.normalize(sums, dim=-1)[:, :, None]
        segment_valid = one_hot.any(dim=2)[:, :, None]
        # Pixels: rank each (image, class) group by priority, keep ranks < per_class.
        groups = self.num_classes + 1  # class C collects the skipped pixels
        image = torch.arange(batch * n, device=x.device) // max(n, 1)
        keys = image * groups + torch.where(classes >= 0, classes, self.num_classes).view(-1)
        ranked = rank_within_groups(keys, priority.reshape(-1))
        kept = (ranked.rank < per_class) & (ranked.keys % groups != self.num_classes)
        group = (ranked.keys // groups) * self.num_classes + ranked.keys % groups
        spare = batch * self.num_classes * per_class
        slot = torch.where(kept, group * per_class + ranked.rank, spare)
        source = torch.full((spare + 1,), -1, dtype=torch.int64, device=x.device)
        source = source.scatter_(0, slot, torch.where(kept, ranked.order, -1))[:spare]
        pixel_valid = source >= 0
        safe = source.clamp_min(0)
        pixels = flat_x[safe // max(n, 1), :, safe % max(n, 1)] if n else flat_x.new_zeros(spare, self.dim)
        pixels = F.normalize(pixels.float(), dim=-1) * pixel_valid[:, None]
        shape = (batch, self.num_classes, per_class)
        return Contributions(segments, segment_valid, pixels.view(*shape, self.dim), pixel_valid.view(shape))

    # -------------------------------------------------------------- ring write
    def _ring_write(self, queue: int, entries: Tensor, valid: Tensor) -> None:
        classes, size, dim = self.num_classes, self.size, self.dim
        count = entries.shape[0] * entries.shape[2]  # entries per class, in (image, draw) order
        valid = valid.permute(1, 0, 2).reshape(classes, count)
        entries = entries.permute(1, 0, 2, 3).reshape(classes, count, dim)
        total = valid.sum(dim=1)
        # column of the k-th valid entry of each class (invalid ones land in a spare column)
        rank = valid.long().cumsum(dim=1) - 1
        columns = torch.arange(count, device=valid.device).expand(classes, count)
        column_of = torch.zeros(classes, count + 1, dtype=torch.int64, device=valid.device)
        column_of.scatter_(1, torch.where(valid, rank, count), torch.where(valid, columns, 0))
        window = torch.arange(min(count, size), device=valid.device)[None, :]
        written = window < total[:, None]
        latest = window + size * ((total[:, None] - 1 - window).clamp_min(0) // size)
        source = column_of.gather(1, latest.clamp(max=count))
        values = entries.gather(1, source[..., None].expand(-1, -1, dim))
        slot = (self.pointers[queue][:, None] + window) % size
        slot_d = slot[..., None].expand(-1, -1, dim)
        features, labels = self.features[queue], self.labels[queue]
        new = torch.where(written[..., None], values.to(features.dtype), features.gather(1, slot_d))
        features.scatter_(1, slot_d, new)
        own_class = torch.arange(classes, device=valid.device)[:, None].expand_as(slot)
        labels.scatter_(1, slot, torch.where(written, own_class, labels.gather(1, slot)))
        self.pointers[queue] = (self.pointers[queue] + total) % size

