"""``sample_anchors``: ContrastiveSeg's hard-anchor sampling on the device (docs/spec.md §10.2).

Per image b and class c with more than ``max_views`` pixels labelled c (a qualifying pair;
T of them), V = min(⌊max_samples/T⌋, max_views) anchors: ⌊V/2⌋ *hard* ones (labelled c,
predicted otherwise) and V − ⌊V/2⌋ *easy* ones (labelled and predicted c), a short side
taken whole and the other filling up. Within a side the pixels of lowest ``priority``
are kept, in ascending order of it.

The original code loops over images and classes with ``unique``, ``nonzero`` and a CPU
``randperm`` per pair (a host synchronisation each). Here everything is fixed-size: one
stable sort by priority and one by the key (b, c, side) put every (pair, side) run in
priority order; per-pair counts come from a scatter-add, the pair's ordinal among the
qualifying ones from a cumulative sum, and each kept pixel is scattered to slot
ordinal·V + (its rank, hard first). Cost: two sorts of B·n keys.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from ._checks import (
    IGNORE_INDEX,
    INDEX_DTYPES,
    check_bool,
    check_class_ids,
    check_generator,
    check_int,
    check_tensor,
    sanitize_class_ids,
)
from ._groups import rank_within_groups

OP = "sample_anchors"
# Keys pack (image, class, side) into an int64: class ids below 2**31, images below 2**29.
_CLASS_BITS = 31
_INVALID_KEY = torch.iinfo(torch.int64).max


class AnchorSample(NamedTuple):
    """``index`` [max_samples] int64: flat pixel positions b·n + i (−1: padding);
    ``labels`` [max_samples] int64: their classes (``ignore_index``: padding)."""

    index: Tensor
    labels: Tensor


def _check_map(name: str, value: object, shape: torch.Size | None, device: torch.device | None) -> Tensor:
    t = check_tensor(OP, name, value)
    if t.dtype not in INDEX_DTYPES:
        raise TypeError(f"{OP}: {name} must be an integer tensor, got dtype {t.dtype}")
    if t.dim() != 2 or (shape is not None and t.shape != shape):
        expected = "[B, n]" if shape is None else f"[B, n] = {tuple(shape)} (the shape of labels)"
        raise ValueError(f"{OP}: {name} must have shape {expected}, got shape {tuple(t.shape)}")
    if device is not None and t.device != device:
        raise ValueError(f"{OP}: {name} must be on the device of labels ({device}), got {t.device}")
    return t


def _check_priority(priority: object, labels: Tensor, validate: bool) -> Tensor:
    t = check_tensor(OP, "priority", priority)
    if not t.is_floating_point():
        raise TypeError(f"{OP}: priority must be a floating tensor, got dtype {t.dtype}")
    if t.shape != labels.shape:
        raise ValueError(f"{OP}: priority must have shape [B, n] = {tuple(labels.shape)}, got {tuple(t.shape)}")
    if t.device != labels.device:
        raise ValueError(f"{OP}: priority must be on the device of labels ({labels.device}), got {t.device}")
    if validate and t.numel() and bool(torch.isnan(t).any()):
        raise ValueError(f"{OP}: priority must not hold NaN (NaN has no place in an order)")
    return t


def _sort_keys(labels: Tensor, predictions: Tensor) -> Tensor:
    """Key (b, c, side) of every pixel, side 0 for hard and 1 for easy; ignored pixels
    (and class ids too large to pack) get a key above every other."""
    batch, n = labels.shape
    flat = labels.reshape(-1)
    image = torch.arange(batch * n, device=labels.device) // max(n, 1)
    easy = (predictions.reshape(-1).long() == flat).long()
    key = ((image << (_CLASS_BITS + 1)) | (flat << 1)) | easy
    return torch.where((flat >= 0) & (flat < 2**_CLASS_BITS), key, _INVALID_KEY)


def sample_anchors(
    labels: Tensor,
    predictions: Tensor,
    *,
    max_samples: int = 1024,
    max_views: int = 100,
    ignore_index: int = IGNORE_INDEX,
    generator: torch.Generator | None = None,
    priority: Tensor | None = None,
    validate: bool = True,
) -> AnchorSample:
    """Hard and easy anchors per (image, class), a fixed number of them.

    Args:
        labels: [B, n] integer class ids (>= 0) or ``ignore_index``, pixels in raster order.
        predictions: [B, n] integer predicted classes (e.g. the argmax of the logits).
        max_samples: the output size; T qualifying pairs get V = min(⌊max_samples/T⌋,
            max_views) anchors each.
        max_views: a pair qualifies with more than this many pixels; at most this many
            anchors per pair.
        ignore_index: label of pixels that are never anchors; fills ``labels`` padding.
        generator: draws the default priority (uniform, i.e. sampling without replacement).
        priority: [B, n] floating; the kept pixels of a side are those of lowest priority,
            ties in raster order. Overrides ``generator``.
        validate: raise ``ValueError`` on a negative label other than ``ignore_index`` or a
            NaN priority (one host synchronisation); with ``False`` negative labels are
            ignored and nothing synchronises.

    Returns:
        :class:`AnchorSample`. Anchors and their labels for ``pixel_contrast_loss`` are
        ``embedding.permute(0, 2, 3, 1).reshape(-1, D)[index.clamp_min(0)]`` and ``labels``:
        padding rows carry ``ignore_index`` and take no part in the loss.
    """
    labels = _check_map("labels", labels, None, None)
    predictions = _check_map("predictions", predictions, labels.shape, labels.device)
    max_samples = check_int(OP, "max_samples", max_samples, minimum=1)
    max_views = check_int(OP, "max_views", max_views, minimum=1)
    ignore_index = check_int(OP, "ignore_index", ignore_index)
    validate = check_bool(OP, "validate", validate)
    generator = check_generator(OP, generator, labels.device, "labels")
    if labels.shape[0] >= 2**29:
        raise ValueError(f"{OP}: labels must have fewer than 2**29 images, got {labels.shape[0]}")
    if priority is None:
        priority = torch.rand(labels.shape, generator=generator, device=labels.device)
    else:
        priority = _check_priority(priority, labels, validate)
    if validate:
        check_class_ids(OP, "labels", labels, ignore_index)
    classes = sanitize_class_ids(labels, ignore_index)
    return _sample(classes, predictions, priority, max_samples, max_views, ignore_index)


def _sample(
    classes: Tensor, predictions: Tensor, priority: Tensor, max_samples: int, max_views: int, ignore_index: int
) -> AnchorSample:
    device = classes.device
    ranked = rank_within_groups(_sort_keys(classes, predictions), priority.reshape(-1))
    pair = ranked.keys >> 1
    is_hard = (ranked.keys & 1) == 0
    # Per-pair statistics, indexed by the pair's position among the pairs of the sorted order.
    pair_starts = torch.ones_like(ranked.starts)
    pair_starts[1:] = pair[1:] != pair[:-1]
    pair_id = pair_starts.long().cumsum(0) - 1
    ones = torch.ones_like(pair_id)
    count = torch.zeros_like(pair_id).scatter_add_(0, pair_id, ones)
    hard = torch.zeros_like(pair_id).scatter_add_(0, pair_id, is_hard.long())
    labelled = torch.zeros_like(pair_starts).index_put_((pair_id,), ranked.keys != _INVALID_KEY)
    qualifies = labelled & (count > max_views)
    ordinal = qualifies.long().cumsum(0) - 1
    views = torch.clamp(max_samples // qualifies.sum().clamp_min(1), max=max_views)
    # Per pixel: ⌊V/2⌋ hard wanted, but at least V − (easy count) when the easy side is short.
    count, hard, qualifies, ordinal = count[pair_id], hard[pair_id], qualifies[pair_id], ordinal[pair_id]
    keep_hard = torch.minimum(hard, torch.maximum(views // 2, views - (count - hard)))
    kept = qualifies & torch.where(is_hard, ranked.rank < keep_hard, ranked.rank < views - keep_hard)
    slot = ordinal * views + torch.where(is_hard, ranked.rank, keep_hard + ranked.rank)
    slot = torch.where(kept, slot, max_samples)  # one spare slot takes everything not kept
    index = torch.full((max_samples + 1,), -1, dtype=torch.int64, device=device)
    index = index.scatter_(0, slot, torch.where(kept, ranked.order, -1))[:max_samples]
    flat = classes.reshape(-1)
    picked = flat[index.clamp_min(0)] if flat.numel() else torch.zeros_like(index)
    return AnchorSample(index, torch.where(index >= 0, picked, ignore_index))
