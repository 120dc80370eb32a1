"""``pk.sample_anchors`` (docs/spec.md §10.2) against a literal per-image, per-class loop."""

from __future__ import annotations

import pytest
import torch

import protoseg_kernels as pk
from benchmarks.measure import Case, profile_case


def literal_side(labels, predictions, priority, c, hard):
    """Pixels of class c that are hard (or easy), in ascending priority, ties by raster order."""
    pixels = [i for i in range(len(labels)) if labels[i] == c and (predictions[i] != c) == hard]
    return sorted(pixels, key=lambda i: (float(priority[i]), i))


def literal_sample(labels, predictions, priority, max_samples, max_views, ignore_index=-1):
    """docs/spec.md §10.2 read word by word, with Python loops."""
    batch, n = labels.shape
    pairs = [(b, c) for b in range(batch) for c in sorted(set(labels[b].tolist()) - {ignore_index})
             if c >= 0 and int((labels[b] == c).sum()) > max_views]
    index = [-1] * max_samples
    out_labels = [ignore_index] * max_samples
    if not pairs:
        return index, out_labels
    views = min(max_samples // len(pairs), max_views)
    for ordinal, (b, c) in enumerate(pairs):
        hard, easy = (literal_side(labels[b], predictions[b], priority[b], c, wanted) for wanted in (True, False))
        keep_hard, keep_easy = views // 2, views - views // 2
        if len(hard) < keep_hard:
            keep_hard, keep_easy = len(hard), views - len(hard)
        elif len(easy) < keep_easy:
            keep_hard, keep_easy = views - len(easy), len(easy)
        chosen = hard[:keep_hard] + easy[:keep_easy]
        for slot, i in enumerate(chosen):
            index[ordinal * views + slot] = b * n + i
            out_labels[ordinal * views + slot] = c
    return index, out_labels


def random_maps(batch, n, classes, seed, ignore_fraction=0.1, accuracy=0.6):
    g = torch.Generator().manual_seed(seed)
    # Long-tailed class frequencies, so some pairs qualify and some do not.
    weights = torch.tensor([0.6 ** c for c in range(classes)])
    labels = torch.multinomial(weights, batch * n, replacement=True, generator=g).view(batch, n)
    labels[torch.rand(batch, n, generator=g) < ignore_fraction] = -1
    wrong = torch.randint(0, classes, (batch, n), generator=g)
    predictions = torch.where(torch.rand(batch, n, generator=g) < accuracy, labels.clamp_min(0), wrong)
    return labels, predictions, g


def check_against_literal(labels, predictions, priority, max_samples, max_views):
    result = pk.sample_anchors(labels, predictions, max_samples=max_samples, max_views=max_views,
                               priority=priority)
    index, out_labels = literal_sample(labels, predictions, priority, max_samples, max_views)
    assert result.index.dtype == torch.int64 and result.labels.dtype == torch.int64
    assert result.index.tolist() == index
    assert result.labels.tolist() == out_labels
    return result


@pytest.mark.parametrize("batch,n,classes,max_samples,max_views", [
    (3, 257, 6, 64, 10),      # V limited by max_samples
    (2, 301, 4, 1024, 7),     # V = max_views
    (1, 97, 3, 13, 5),        # odd V, ragged
    (4, 64, 9, 64, 1),        # max_views 1 (the bank configuration): one easy anchor per pair
])
def test_matches_the_literal_rule_on_random_maps(batch, n, classes, max_samples, max_views):
    for seed in range(3):
        labels, predictions, g = random_maps(batch, n, classes, seed)
        priority = torch.rand(batch, n, generator=g)
        result = check_against_literal(labels, predictions, priority, max_samples, max_views)
        assert (result.index >= 0).any(), "the case must keep some anchors"


def test_a_short_side_is_taken_whole_and_the_other_fills_up():
    n = 40
    labels = torch.zeros(1, n, dtype=torch.long)
    predictions = torch.zeros(1, n, dtype=torch.long)
    predictions[0, :3] = 1  # 3 hard, 37 easy
    priority = torch.rand(1, n, generator=torch.Generator().manual_seed(1))
    result = check_against_literal(labels, predictions, priority, 20, 20)
    assert set(result.index[:3].tolist()) == {0, 1, 2}  # all hard, first
    predictions = 1 - predictions  # 37 hard, 3 easy
    result = check_against_literal(labels, predictions, priority, 20, 20)
    assert set(result.index[17:20].tolist()) == {0, 1, 2}  # all easy, last


def test_ties_in_priority_go_by_raster_order():
    labels = torch.tensor([[0] * 8 + [1] * 8])
    predictions = labels.clone()
    result = pk.sample_anchors(labels, predictions, max_samples=6, max_views=3,
                               priority=torch.zeros(1, 16))
    assert result.index.tolist() == [0, 1, 2, 8, 9, 10]
    assert result.labels.tolist() == [0, 0, 0, 1, 1, 1]


def test_nothing_qualifies_gives_all_padding():
    labels = torch.tensor([[0, 0, 1, -1], [2, 2, 2, -1]])
    result = pk.sample_anchors(labels, labels, max_samples=8, max_views=3, ignore_index=-1)
    assert result.index.tolist() == [-1] * 8 and result.labels.tolist() == [-1] * 8
    empty = pk.sample_anchors(torch.empty(2, 0, dtype=torch.long), torch.empty(2, 0, dtype=torch.long),
                              max_samples=4, ignore_index=255)
    assert empty.index.tolist() == [-1] * 4 and empty.labels.tolist() == [255] * 4
    # More qualifying pairs than samples: V = 0, nothing kept, no crash.
    many = torch.arange(6).repeat_interleave(5).view(1, -1)
    assert (pk.sample_anchors(many, many, max_samples=4, max_views=2).index == -1).all()


def test_the_loss_of_an_all_padding_sample_is_zero():
    labels = torch.full((2, 10), -1)
    sample = pk.sample_anchors(labels, labels, max_samples=16)
    anchors = torch.randn(20, 8, requires_grad=True)
    loss = pk.pixel_contrast_loss(anchors[sample.index.clamp_min(0)], sample.labels)
    loss.backward()
    assert loss.item() == 0 and not anchors.grad.any()


def test_ignore_index_and_narrow_label_dtypes():
    labels, predictions, g = random_maps(2, 200, 5, seed=4)
    priority = torch.rand(2, 200, generator=g)
    expected = pk.sample_anchors(labels, predictions, max_samples=32, max_views=6, priority=priority)
    shifted = torch.where(labels < 0, 255, labels).to(torch.uint8)
    result = pk.sample_anchors(shifted, predictions.to(torch.int32), max_samples=32, max_views=6,
                               priority=priority, ignore_index=255)
    assert torch.equal(result.index, expected.index)
    assert torch.equal(result.labels, torch.where(expected.labels < 0, 255, expected.labels))


def test_default_priority_is_a_draw_without_replacement_from_the_generator():
    labels, predictions, _ = random_maps(2, 300, 4, seed=5)
    draw = [pk.sample_anchors(labels, predictions, max_samples=64, max_views=20,
                              generator=torch.Generator().manual_seed(s)) for s in (7, 7, 8)]
    assert torch.equal(draw[0].index, draw[1].index)
    assert not torch.equal(draw[0].index, draw[2].index)
    kept = draw[0].index[draw[0].index >= 0]
    assert kept.unique().numel() == kept.numel()  # no pixel twice
    flat = labels.view(-1)
    assert torch.equal(flat[kept], draw[0].labels[draw[0].index >= 0])


def test_no_host_synchronisation_without_validation():
    labels, predictions, g = random_maps(2, 500, 6, seed=6)

    def step(_):
        return pk.sample_anchors(labels, predictions, max_samples=64, max_views=10, generator=g, validate=False)

    assert profile_case(Case(lambda: None, step), torch.device("cpu")).host_syncs == 0


def test_compiles_without_graph_breaks():
    labels, predictions, g = random_maps(2, 120, 4, seed=7)
    priority = torch.rand(2, 120, generator=g)

    def sample(labels, predictions, priority):
        return pk.sample_anchors(labels, predictions, max_samples=16, max_views=5, priority=priority,
                                 validate=False)

    compiled = torch.compile(sample, fullgraph=True, backend="eager")
    assert torch.equal(compiled(labels, predictions, priority).index, sample(labels, predictions, priority).index)


@pytest.mark.parametrize("kwargs,error,match", [
    ({"labels": torch.zeros(2, 3)}, TypeError, "labels must be an integer tensor"),
    ({"labels": torch.zeros(6, dtype=torch.long)}, ValueError, r"labels must have shape \[B, n\]"),
    ({"predictions": torch.zeros(2, 4, dtype=torch.long)}, ValueError, "predictions must have shape"),
    ({"labels": torch.tensor([[0, -3, 1]])}, ValueError, "labels must hold class ids >= 0"),
    ({"max_samples": 0}, ValueError, "max_samples must be >= 1"),
    ({"max_views": 0}, ValueError, "max_views must be >= 1"),
    ({"priority": torch.zeros(2, 2)}, ValueError, "priority must have shape"),
    ({"priority": torch.zeros(2, 3, dtype=torch.long)}, TypeError, "priority must be a floating tensor"),
    ({"priority": torch.tensor([[0.0, float("nan"), 1.0], [0.0, 0.0, 0.0]])}, ValueError, "NaN"),
    ({"generator": 3}, TypeError, "generator must be a torch.Generator"),
])
def test_bad_arguments_are_named(kwargs, error, match):
    args = {"labels": torch.zeros(2, 3, dtype=torch.long), "predictions": None}
    args.update(kwargs)
    labels = args.pop("labels")
    predictions = args.pop("predictions")
    if predictions is None:
        predictions = torch.zeros(labels.shape if labels.dim() == 2 else (2, 3), dtype=torch.long)
    with pytest.raises(error, match=match):
        pk.sample_anchors(labels, predictions, **args)
