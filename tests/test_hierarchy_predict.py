"""hierarchy_predict and hierarchy_scores (docs/spec.md §11.3) against per-pixel loops."""

from __future__ import annotations

import pytest
import torch

import protoseg_kernels as pk

THREE_LEVELS = pk.Hierarchy([5, 5, 6, 6, 7, 8, 8, 9, -1, -1])


def literal(z, hierarchy, rule):
    """Per pixel (rows of z [N, V]): the leaf maximising the rule's score, first on ties."""
    probabilities = z.softmax(1)
    out = []
    for i in range(z.shape[0]):
        if rule == "softmax_sum":
            scores = [sum(float(probabilities[i, v]) for v in hierarchy.paths[c])
                      for c in range(hierarchy.num_leaves)]
        else:
            scores = [min(float(torch.sigmoid(z[i, v])) for v in hierarchy.paths[c])
                      for c in range(hierarchy.num_leaves)]
        out.append(max(range(len(scores)), key=lambda c: (scores[c], -c)))
    return torch.tensor(out)


@pytest.mark.parametrize("hierarchy", [pk.Hierarchy.cityscapes(), THREE_LEVELS], ids=["cityscapes", "three"])
@pytest.mark.parametrize("rule", ["softmax_sum", "path_min"])
def test_every_image_of_a_batch(hierarchy, rule):
    z = torch.randn(3, hierarchy.num_nodes, 4, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    prediction = pk.hierarchy_predict(z, hierarchy, rule=rule)
    assert prediction.shape == (3, 4, 5) and prediction.dtype == torch.int64
    rows = z.permute(0, 2, 3, 1).reshape(-1, hierarchy.num_nodes)
    assert torch.equal(prediction.reshape(-1), literal(rows, hierarchy, rule))
    assert torch.equal(pk.hierarchy_predict(rows, hierarchy, rule=rule), prediction.reshape(-1))


@pytest.mark.parametrize("rule", ["softmax_sum", "path_min"])
def test_scores_are_the_per_leaf_path_scores_in_the_input_layout(rule):
    z = torch.randn(2, THREE_LEVELS.num_nodes, 3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    scores = pk.hierarchy_scores(z, THREE_LEVELS, rule=rule)
    assert scores.shape == (2, THREE_LEVELS.num_leaves, 3, 4) and scores.dtype == torch.float64
    probabilities = z.softmax(1)
    for c, path in enumerate(THREE_LEVELS.paths[: THREE_LEVELS.num_leaves]):
        on_path = probabilities[:, list(path)].sum(1) if rule == "softmax_sum" else z[:, list(path)].amin(1)
        torch.testing.assert_close(scores[:, c], on_path, rtol=1e-12, atol=1e-12)
    rows = z.permute(0, 2, 3, 1).reshape(-1, THREE_LEVELS.num_nodes)
    flat = pk.hierarchy_scores(rows, THREE_LEVELS, rule=rule)
    assert flat.shape == (rows.shape[0], THREE_LEVELS.num_leaves)
    torch.testing.assert_close(flat, scores.permute(0, 2, 3, 1).reshape(-1, THREE_LEVELS.num_leaves))
    assert torch.equal(scores.argmax(1), pk.hierarchy_predict(z, THREE_LEVELS, rule=rule))


def test_ancestor_probability_changes_the_softmax_sum_choice():
    # leaf 0 is the largest node alone, but leaves 2 and 3 share a heavy parent (node 6)
    z = torch.tensor([[3.0, -5, 2.0, -5, -5, -5, 2.8, -5, -5, -5]])
    assert int(pk.hierarchy_predict(z, THREE_LEVELS)) == 2
    assert int(z[:, :5].argmax()) == 0


def test_bad_arguments():
    with pytest.raises(ValueError, match="rule"):
        pk.hierarchy_predict(torch.zeros(2, 10), THREE_LEVELS, rule="max")
    with pytest.raises(ValueError, match="one channel per node"):
        pk.hierarchy_predict(torch.zeros(2, 9), THREE_LEVELS)
