"""tree_triplet_loss (docs/spec.md §11.2) against a literal transcription of the spec."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import protoseg_kernels as pk

F64 = torch.float64
THREE_LEVELS = pk.Hierarchy([5, 5, 6, 6, 7, 8, 8, 9, -1, -1])


def literal_triplet(embedding, labels, hierarchy, max_triplet, margin, ignore_index=-1):
    """Plain loops over classes and pixels in raster order, autograd for the gradient."""
    rows = embedding.permute(0, 2, 3, 1).reshape(-1, embedding.shape[1])
    y = [int(v) for v in labels.reshape(-1)]
    parent = hierarchy.parents
    total, classes = rows.new_zeros(()), 0
    for c in range(hierarchy.num_leaves):
        valid = [i for i, v in enumerate(y) if v != ignore_index]
        anchors = [i for i in valid if y[i] == c]
        positives = [i for i in valid if y[i] != c and parent[y[i]] == parent[c]]
        negatives = [i for i in valid if parent[y[i]] != parent[c]]
        m = min(len(anchors), len(positives), len(negatives), max_triplet)
        if m == 0:
            continue
        terms = [torch.relu((1 - rows[a] @ rows[p]) - (1 - rows[a] @ rows[n]) + margin)
                 for a, p, n in zip(anchors[:m], positives[:m], negatives[:m])]
        total = total + torch.stack(terms).mean()
        classes += 1
    return total / max(classes, 1)


def make_inputs(seed, hierarchy, shape=(2, 5, 4, 6), ignore=0.2, classes=None, dtype=F64):
    g = torch.Generator().manual_seed(seed)
    b, d, h, w = shape
    embedding = F.normalize(torch.randn(b, d, h, w, generator=g, dtype=F64), dim=1).to(dtype)
    labels = torch.randint(0, min(classes or hierarchy.num_leaves, hierarchy.num_leaves), (b, h, w), generator=g)
    labels[torch.rand(b, h, w, generator=g) < ignore] = -1
    return embedding.requires_grad_(), labels


@pytest.mark.parametrize("hierarchy", [pk.Hierarchy.cityscapes(), THREE_LEVELS], ids=["cityscapes", "three"])
@pytest.mark.parametrize("max_triplet,classes,seed", [(200, None, 0), (3, 6, 1), (1, 4, 2), (7, 9, 3)])
def test_matches_the_literal_spec(hierarchy, max_triplet, classes, seed):
    embedding, labels = make_inputs(seed, hierarchy, classes=classes)
    loss = pk.tree_triplet_loss(embedding, labels, hierarchy, max_triplet=max_triplet, margin=0.6)
    expected = literal_triplet(embedding, labels, hierarchy, max_triplet, 0.6)
    assert loss.dtype == F64
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=1e-12)
    if expected.requires_grad:
        (grad,) = torch.autograd.grad(loss, embedding)
        (grad_expected,) = torch.autograd.grad(expected, embedding)
        torch.testing.assert_close(grad, grad_expected, rtol=1e-12, atol=1e-12)


def test_flat_layout_and_channels_last_agree_with_nchw():
    embedding, labels = make_inputs(4, pk.Hierarchy.cityscapes(), classes=8)
    h = pk.Hierarchy.cityscapes()
    reference = pk.tree_triplet_loss(embedding, labels, h)
    flat = embedding.detach().permute(0, 2, 3, 1).reshape(-1, embedding.shape[1])
    reference = reference.detach()
    assert float(pk.tree_triplet_loss(flat, labels.reshape(-1), h)) == pytest.approx(float(reference), abs=1e-14)
    cl = embedding.detach().to(memory_format=torch.channels_last)
    assert float(pk.tree_triplet_loss(cl, labels, h)) == pytest.approx(float(reference), abs=1e-14)


@pytest.mark.parametrize("layout", ["nchw", "channels_last", "flat", "flat_transposed"])
def test_the_gradient_comes_in_the_embedding_layout_and_equals_the_nchw_one(layout):
    """A gradient laid out as its input reaches a leaf's .grad without a layout copy (autograd
    copies a gradient of other strides into the leaf's: an embedding-sized allocation) and is
    the same numbers in every layout."""
    h = pk.Hierarchy.cityscapes()
    embedding, labels = make_inputs(5, h, classes=8)
    (expected,) = torch.autograd.grad(pk.tree_triplet_loss(embedding, labels, h), embedding)
    base = embedding.detach()
    if layout == "nchw":
        x, x_labels, as_nchw = base.clone(), labels, lambda g: g
    elif layout == "channels_last":
        x, x_labels, as_nchw = base.to(memory_format=torch.channels_last), labels, lambda g: g
    else:
        rows = base.permute(0, 2, 3, 1).reshape(-1, base.shape[1])
        x = rows.clone() if layout == "flat" else rows.t().contiguous().t()
        x_labels = labels.reshape(-1)
        as_nchw = lambda g: g.view(base.shape[0], *base.shape[2:], base.shape[1]).permute(0, 3, 1, 2)  # noqa: E731
    x.requires_grad_()
    (grad,) = torch.autograd.grad(pk.tree_triplet_loss(x, x_labels, h), x)  # as the op returns it
    assert grad.stride() == x.stride()
    torch.testing.assert_close(as_nchw(grad), expected, rtol=1e-12, atol=1e-12)


def test_gradcheck():
    embedding, labels = make_inputs(5, THREE_LEVELS)
    def loss(e):
        return pk.tree_triplet_loss(e, labels, THREE_LEVELS, max_triplet=4)
    assert torch.autograd.gradcheck(loss, (embedding,))


def test_ignored_pixels_are_never_negatives():
    # Only classes 0 (anchor) and 1 (its sibling) are labelled; the other pixels are ignored,
    # so there is no negative and no triplet (the original would take ignored pixels).
    embedding, labels = make_inputs(6, pk.Hierarchy.cityscapes(), classes=2, ignore=0.5)
    labels[labels >= 0] = labels[labels >= 0] % 2
    loss = pk.tree_triplet_loss(embedding, labels, pk.Hierarchy.cityscapes())
    assert float(loss) == 0.0
    loss.backward()
    assert torch.count_nonzero(embedding.grad) == 0


def test_all_ignored_and_empty_give_zero_with_zero_gradient():
    h = pk.Hierarchy.cityscapes()
    embedding, labels = make_inputs(7, h)
    loss = pk.tree_triplet_loss(embedding, torch.full_like(labels, -1), h)
    loss.backward()
    assert float(loss) == 0.0 and torch.count_nonzero(embedding.grad) == 0
    empty = torch.zeros(0, 8, dtype=F64, requires_grad=True)
    assert float(pk.tree_triplet_loss(empty, torch.zeros(0, dtype=torch.long), h)) == 0.0


def test_random_selection_is_reproducible_and_uses_valid_pixels():
    h = pk.Hierarchy.cityscapes()
    embedding, labels = make_inputs(8, h, shape=(2, 4, 8, 8), classes=10)
    runs = [pk.tree_triplet_loss(embedding, labels, h, max_triplet=3, selection="random",
                                 generator=torch.Generator().manual_seed(s)) for s in (1, 1, 2)]
    assert float(runs[0]) == float(runs[1])
    assert float(runs[0]) != float(runs[2])


def test_nan_at_a_selected_pixel_gives_nan():
    h = pk.Hierarchy.cityscapes()
    embedding, labels = make_inputs(9, h, classes=6)
    with torch.no_grad():
        first_anchor = (labels.reshape(-1) == 0).nonzero()[0, 0]
        embedding.view(2, 5, -1)[first_anchor // 24, 0, first_anchor % 24] = float("nan")
    assert torch.isnan(pk.tree_triplet_loss(embedding, labels, h))


def test_inputs_are_not_modified():
    h = pk.Hierarchy.cityscapes()
    embedding, labels = make_inputs(10, h)
    before = embedding.detach().clone(), labels.clone()
    pk.tree_triplet_loss(embedding, labels, h).backward()
    assert torch.equal(embedding.detach(), before[0]) and torch.equal(labels, before[1])


def test_compiles_without_graph_breaks():
    h = pk.Hierarchy.cityscapes()
    embedding, labels = make_inputs(11, h, classes=8)
    compiled = torch.compile(lambda e, y: pk.tree_triplet_loss(e, y, h, validate=False), fullgraph=True)
    torch.testing.assert_close(compiled(embedding, labels), pk.tree_triplet_loss(embedding, labels, h))


def test_opcheck():
    embedding, _ = make_inputs(12, THREE_LEVELS)
    ids = torch.tensor([0, 5, 7]), torch.tensor([1, 2, 3]), torch.tensor([9, 10, 11])
    torch.library.opcheck(torch.ops.protoseg.tree_triplet_loss.default, (embedding.flatten(2), *ids, 0.6))


@pytest.mark.parametrize("kwargs,error,match", [
    ({"labels": torch.full((2, 4, 6), 19)}, ValueError, "labels must hold leaf class ids"),
    ({"labels": torch.zeros(2, 4, 5, dtype=torch.long)}, ValueError, "labels must have shape"),
    ({"labels": torch.zeros(2, 4, 6)}, TypeError, "labels must be an integer tensor"),
    ({"embedding": torch.zeros(2, 5, 4)}, ValueError, "embedding must have shape"),
    ({"hierarchy": [0, 1]}, TypeError, "hierarchy must be"),
    ({"hierarchy": pk.Hierarchy([-1, -1])}, ValueError, "depth >= 1"),
    ({"max_triplet": 0}, ValueError, "max_triplet"),
    ({"margin": float("nan")}, ValueError, "margin"),
    ({"selection": "last"}, ValueError, "selection"),
])
def test_bad_arguments(kwargs, error, match):
    h = pk.Hierarchy.cityscapes()
    embedding, labels = make_inputs(13, h)
    args = {"embedding": embedding, "labels": labels, "hierarchy": h} | kwargs
    with pytest.raises(error, match=match):
        pk.tree_triplet_loss(args.pop("embedding"), args.pop("labels"), args.pop("hierarchy"), **args)


def test_validate_false_ignores_out_of_range_labels():
    h = pk.Hierarchy.cityscapes()
    embedding, labels = make_inputs(14, h, classes=8)
    bad = labels.clone()
    bad[labels == 3] = 40
    ignored = labels.clone()
    ignored[labels == 3] = -1
    torch.testing.assert_close(pk.tree_triplet_loss(embedding, bad, h, validate=False),
                               pk.tree_triplet_loss(embedding, ignored, h))
