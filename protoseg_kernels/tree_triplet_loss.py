"""``tree_triplet_loss``: HSSN's tree-triplet loss on pixel embeddings (docs/spec.md §11.2).

For each leaf class c present (ascending): anchors = pixels of c, positives = pixels of the
other leaves under c's parent, negatives = pixels of leaves under another parent;
m_c = min(|anchors|, |positives|, |negatives|, max_triplet); the first m_c of each in the
selection order (raster order for ``"first"``, as the original; a random order for
``"random"``), paired by position. With d(u, v) = 1 − ⟨u, v⟩:

    L_c = (1/m_c)·Σ_j relu(d(a_j, p_j) − d(a_j, n_j) + margin) = (1/m_c)·Σ_j relu(⟨a_j, n_j − p_j⟩ + margin)
    loss = mean of L_c over the classes with m_c > 0 (0 when there is none)

Gradient of one active triplet (its relu argument > 0) with weight w = g/(m_c·#classes):
da = w·(n − p), dp = −w·a, dn = w·a.

The selection runs on the device without a host synchronisation: the pixels are ordered by
(class, order), (parent, order) and (valid, order) with three stable sorts, and the j-th
positive of class c (the j-th pixel of c's parent group that is not of class c) is found by
one ``searchsorted`` over a key that counts, for each pixel of c, the pixels of other classes
before it in the group (the negatives likewise, per parent group among all valid pixels).
The distances are then taken in row chunks from the embedding read in place; backward
re-gathers those rows instead of keeping them, so nothing of size classes × N × D (nor
C·max_triplet × D) is kept for backward: only the 3·C·max_triplet pixel indices.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from ._checks import (
    IGNORE_INDEX,
    check_bool,
    check_choice,
    check_float_tensor,
    check_generator,
    check_index_range,
    check_int,
    check_tensor,
    sanitize_index,
)
from ._op_utils import compute_dtype
from .hierarchy import Hierarchy
from .tree_min_loss import check_hierarchy, check_pixel_labels

OP = "tree_triplet_loss"
SELECTIONS = ("first", "random")
_CHUNK_ROWS = 1024  # rows gathered at a time: bounds the transient memory (about 10·1024·D values)
# Backward also holds int64 storage offsets of the 3·rows·D gradient elements it adds.
_BACKWARD_CHUNK_ROWS = 256


class Triplets(NamedTuple):
    """[C, T] pixel ids (flat over the batch) of the anchors, positives and negatives, and
    m [C], the number of triplets of each class; entries j >= m_c are padding."""

    anchors: Tensor
    positives: Tensor
    negatives: Tensor
    count: Tensor


def _gather_rows(embedding: Tensor, pixels: Tensor) -> Tensor:
    """[Q, D] rows of embedding [B, D, P] at flat pixel ids, in the compute dtype."""
    p = embedding.shape[2]
    return embedding[pixels // p, :, pixels % p].to(compute_dtype(embedding.dtype))


def _chunks(q: int, rows: int = _CHUNK_ROWS):
    return ((start, min(start + rows, q)) for start in range(0, q, rows))


@torch.library.custom_op("protoseg::tree_triplet_loss", mutates_args=())
def _triplet_op(embedding: Tensor, anchors: Tensor, positives: Tensor, negatives: Tensor, margin: float) -> Tensor:
    """relu(⟨a, n − p⟩ + margin) [Q] for embedding [B, D, P] and flat pixel ids [Q]
    (clamped into range: the op is reachable through torch.ops)."""
    upper = max(embedding.shape[0] * embedding.shape[2] - 1, 0)
    out = embedding.new_empty(anchors.shape[0], dtype=compute_dtype(embedding.dtype))
    for start, stop in _chunks(anchors.shape[0]):
        a, p, n = (_gather_rows(embedding, ids[start:stop].clamp(0, upper)) for ids in (anchors, positives, negatives))
        out[start:stop] = torch.relu((a * (n - p)).sum(1) + margin)
    return out


@_triplet_op.register_fake
def _(embedding, anchors, positives, negatives, margin):
    return embedding.new_empty(anchors.shape[0], dtype=compute_dtype(embedding.dtype))


def _empty_gradient(embedding: Tensor) -> Tensor:
    """Zeros for d embedding [B, D, P] in the compute dtype, laid out as the embedding (so
    that autograd passes it on without a layout copy, e.g. into a leaf's ``.grad``)."""
    return torch.zeros_like(embedding, dtype=compute_dtype(embedding.dtype))


def _element_offsets(result: Tensor, pixels: Tensor) -> Tensor:
    """[Q, D] storage offsets of result[b, :, p] for flat pixel ids b·P + p, whatever the
    layout of result [B, D, P] (dense, as :func:`_empty_gradient` makes it)."""
    stride_b, stride_d, stride_p = result.stride()
    p = result.shape[2]
    rows = (pixels // p) * stride_b + (pixels % p) * stride_p
    return rows.unsqueeze(1) + torch.arange(result.shape[1], device=pixels.device) * stride_d


@torch.library.custom_op("protoseg::tree_triplet_loss_backward", mutates_args=())
def _triplet_backward_op(
    grad: Tensor, embedding: Tensor, anchors: Tensor, positives: Tensor, negatives: Tensor, margin: float
) -> Tensor:
    """d embedding [B, D, P] in the embedding's dtype and layout."""
    upper = max(embedding.shape[0] * embedding.shape[2] - 1, 0)
    result = _empty_gradient(embedding)
    storage = result.as_strided((result.numel(),), (1,))  # every element once: the layout is dense
    for start, stop in _chunks(anchors.shape[0], _BACKWARD_CHUNK_ROWS):
        ids = [t[start:stop].clamp(0, upper) for t in (anchors, positives, negatives)]
        a, p, n = (_gather_rows(embedding, i) for i in ids)
        active = (a * (n - p)).sum(1) + margin > 0
        w = torch.where(active, grad[start:stop].to(a.dtype), 0).unsqueeze(1)
        taken = w != 0  # a padding or inactive triplet adds nothing, not 0·NaN
        # One accumulating write per chunk, a's rows then p's then n's (index_put_ is the
        # quickest scattered accumulation on the CPU; on both devices it adds duplicates).
        offsets = torch.cat([_element_offsets(result, pixels) for pixels in ids]).view(-1)
        rows = torch.cat([w * (n - p), -w * a, w * a]).where(taken.repeat(3, 1), 0)
        storage.index_put_((offsets,), rows.view(-1), accumulate=True)
    return result.to(embedding.dtype)


@_triplet_backward_op.register_fake
def _(grad, embedding, anchors, positives, negatives, margin):
    return _empty_gradient(embedding).to(embedding.dtype)


def _setup_context(ctx, inputs, output):
    embedding, anchors, positives, negatives, margin = inputs
    ctx.save_for_backward(embedding, anchors, positives, negatives)
    ctx.margin = margin


def _backward(ctx, grad):
    embedding, anchors, positives, negatives = ctx.saved_tensors
    return _triplet_backward_op(grad, embedding, anchors, positives, negatives, ctx.margin), None, None, None, None


_triplet_op.register_autograd(_backward, setup_context=_setup_context)


def _counts_and_starts(keys: Tensor, size: int) -> tuple[Tensor, Tensor]:
    """Per key in [0, size): how many entries, and where its run starts in sorted order."""
    counts = torch.zeros(size, dtype=torch.int64, device=keys.device).scatter_add_(0, keys, torch.ones_like(keys))
    return counts, counts.cumsum(0) - counts


def _inverse(permutation: Tensor) -> Tensor:
    positions = torch.arange(permutation.numel(), device=permutation.device)
    return torch.empty_like(permutation).scatter_(0, permutation, positions)


def select_triplets(labels: Tensor, leaf_group: Tensor, num_groups: int, order: Tensor, max_triplet: int) -> Triplets:
    """The triplets of docs/spec.md §11.2 for sanitised flat labels [n] (a leaf or −1), the
    parent group of each leaf [C] in [0, num_groups), and ``order`` [n], the pixels in
    selection order (a permutation). Device-side; no host synchronisation."""
    n, c, device = labels.numel(), leaf_group.numel(), labels.device
    valid = labels >= 0
    cls = torch.where(valid, labels, c)  # c and num_groups: sentinels for ignored pixels
    grp = torch.where(valid, leaf_group[labels.clamp_min(0)], num_groups)
    class_sorted = order[torch.argsort(cls[order], stable=True)]
    group_sorted = order[torch.argsort(grp[order], stable=True)]
    valid_sorted = order[torch.argsort((~valid[order]).to(torch.int8), stable=True)]
    class_count, class_start = _counts_and_starts(cls, c + 1)
    group_count, group_start = _counts_and_starts(grp, num_groups + 1)
    position = torch.arange(n, device=device)
    stride = n + 1  # keys of (run, offset) pairs: run·stride + offset, offset in [0, n)
    # Along class_sorted: pixel t of class c has (group position − t) pixels of other
    # classes before it in its group; nondecreasing in t, so the keys are sorted.
    c_of = cls[class_sorted]
    in_group = _inverse(group_sorted) - group_start[grp]
    key_positive = c_of * stride + in_group[class_sorted] - (position - class_start[c_of])
    # Along group_sorted: pixel u of group g has (global valid position − u) valid pixels
    # of other groups before it.
    g_of = grp[group_sorted]
    key_negative = g_of * stride + _inverse(valid_sorted)[group_sorted] - (position - group_start[g_of])
    j = torch.arange(max_triplet, device=device).unsqueeze(0)  # [1, T]
    classes = torch.arange(c, device=device).unsqueeze(1)  # [C, 1]
    group = leaf_group.unsqueeze(1)
    skip_positive = torch.searchsorted(key_positive, classes * stride + j, right=True) - class_start[:c, None]
    skip_negative = torch.searchsorted(key_negative, group * stride + j, right=True) - group_start[group]
    top = max(n - 1, 0)
    own = class_count[:c]
    count = torch.minimum(torch.minimum(own, group_count[leaf_group] - own),
                          (valid.sum() - group_count[leaf_group]).clamp_max(max_triplet))
    return Triplets(
        anchors=class_sorted[(class_start[:c, None] + j).clamp(0, top)],
        positives=group_sorted[(group_start[group] + j + skip_positive).clamp(0, top)],
        negatives=valid_sorted[(j + skip_negative).clamp(0, top)],
        count=count.clamp_min(0),
    )


def leaf_groups(hierarchy: Hierarchy, device: torch.device) -> tuple[Tensor, int]:
    """(the parent group of each leaf [C], in [0, G); G) for a hierarchy of depth >= 1."""
    parents = sorted({hierarchy.parents[leaf] for leaf in range(hierarchy.num_leaves)})
    if parents[0] < 0:
        raise ValueError(f"{OP}: the hierarchy needs depth >= 1 (every leaf under a parent), got {hierarchy!r}")
    index = {parent: g for g, parent in enumerate(parents)}
    groups = [index[hierarchy.parents[leaf]] for leaf in range(hierarchy.num_leaves)]
    return torch.tensor(groups, dtype=torch.int64, device=device), len(parents)


def _embedding_as_channels(embedding: object) -> tuple[Tensor, bool]:
    """(embedding as a [B, D, P] view, whether it came as [N, D])."""
    embedding = check_tensor(OP, "embedding", embedding)
    if embedding.dim() not in (2, 4):
        raise ValueError(f"{OP}: embedding must have shape [N, D] or [B, D, H, W], got shape {tuple(embedding.shape)}")
    embedding = check_float_tensor(OP, "embedding", embedding, embedding.dim(), "[N, D] or [B, D, H, W]")
    if embedding.dim() == 2:
        return embedding.t().unsqueeze(0), True
    return embedding.flatten(2), False


def _check_margin(margin: object) -> float:
    if isinstance(margin, bool) or not isinstance(margin, (int, float)) or not math.isfinite(margin):
        raise ValueError(f"{OP}: margin must be a finite number, got {margin!r}")
    return float(margin)


def tree_triplet_loss(
    embedding: Tensor,
    labels: Tensor,
    hierarchy: Hierarchy,
    *,
    max_triplet: int = 200,
    margin: float = 0.6,
    selection: str = "first",
    generator: torch.Generator | None = None,
    ignore_index: int = IGNORE_INDEX,
    validate: bool = True,
) -> Tensor:
    """HSSN's tree-triplet loss (formulas in the module docstring, docs/spec.md §11.2).

    Args:
        embedding: [N, D] or [B, D, H, W] floating pixel embeddings (l2-normalised by the
            caller, as HSSN's projection head does); read in place, never modified.
        labels: [N] or [B, H, W] integer leaf ids in [0, C) or ``ignore_index``, at the
            embedding's resolution. Ignored pixels are never anchors, positives or negatives.
        hierarchy: the class tree, of depth >= 1.
        max_triplet: at most this many triplets per class.
        margin: the triplet margin.
        selection: ``"first"`` (the first pixels in raster order, as the original) or
            ``"random"`` (drawn at random, from ``generator`` if given).
        generator: random source of ``"random"``, on the embedding's device.
        ignore_index: label of pixels that take no part.
        validate: raise ``ValueError`` on a label outside [0, C) other than ``ignore_index``
            (one host synchronisation); with ``False`` such labels are ignored.

    Returns:
        The loss, a 0-dim fp32 tensor (fp64 for fp64 embeddings), differentiable in
        ``embedding``; 0 when no class has a triplet.
    """
    hierarchy = check_hierarchy(OP, hierarchy)
    embedding3d, flat = _embedding_as_channels(embedding)
    flat_labels = check_pixel_labels(OP, labels, embedding, flat).reshape(-1)
    max_triplet = check_int(OP, "max_triplet", max_triplet, minimum=1)
    margin = _check_margin(margin)
    selection = check_choice(OP, "selection", selection, SELECTIONS)
    generator = check_generator(OP, generator, embedding.device, "embedding")
    ignore_index = check_int(OP, "ignore_index", ignore_index)
    validate = check_bool(OP, "validate", validate)
    groups, num_groups = leaf_groups(hierarchy, embedding.device)
    if validate:
        check_index_range(OP, "labels", flat_labels, hierarchy.num_leaves, ignore_index, "leaf class ids")
    n = flat_labels.numel()
    if n == 0:
        return embedding.sum().to(compute_dtype(embedding.dtype)) * 0
    if selection == "first":
        order = torch.arange(n, device=embedding.device)
    else:
        order = torch.rand(n, generator=generator, device=embedding.device).argsort()
    triplets = select_triplets(sanitize_index(flat_labels, hierarchy.num_leaves, ignore_index), groups, num_groups,
                               order, max_triplet)
    per_triplet = _triplet_op(
        embedding3d, triplets.anchors.reshape(-1), triplets.positives.reshape(-1), triplets.negatives.reshape(-1),
        margin,
    ).view_as(triplets.anchors)
    taken = torch.arange(max_triplet, device=embedding.device) < triplets.count.unsqueeze(1)
    per_class = torch.where(taken, per_triplet, 0).sum(1) / triplets.count.clamp_min(1).to(per_triplet.dtype)
    present = triplets.count > 0
    return torch.where(present, per_class, 0).sum() / present.sum().clamp_min(1).to(per_triplet.dtype)
