"""Hierarchy (docs/spec.md §11): construction, validation and the kernels' tables."""

from __future__ import annotations

import pytest
import torch

import protoseg_kernels as pk


def test_cityscapes_is_hssn_tree():
    h = pk.Hierarchy.cityscapes()
    assert (h.num_leaves, h.num_nodes, h.depth) == (19, 26, 1)
    groups = [(0, 2), (2, 5), (5, 8), (8, 10), (10, 11), (11, 13), (13, 19)]
    for g, (start, stop) in enumerate(groups):
        assert h.children[19 + g] == tuple(range(start, stop))
    assert h.names[0] == "road" and h.names[25] == "vehicle"
    assert torch.equal(h.leaf_ancestors(1), torch.tensor([0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 4, 5, 5, 6, 6, 6, 6, 6, 6]))


def test_three_level_tables():
    h = pk.Hierarchy([5, 5, 6, 6, 7, 8, 8, 9, -1, -1])
    assert (h.num_leaves, h.depth, h.num_levels) == (5, 2, 3)
    assert h.level(1) == (5, 6, 7) and h.level(2) == (8, 9) and h.ancestor_at(3, 2) == 8
    t = h.tables("cpu")
    assert t.ancestors[2].tolist() == [2, 6, 8] and t.ancestors[6].tolist() == [6, 8, -1]
    assert t.descendants[8].tolist() == [0, 1, 2, 3, 5, 6, 8]
    assert t.descendants[0].tolist() == [0] + [-1] * 6
    torch.testing.assert_close(t.node_weights, torch.tensor([0.2] * 5 + [1 / 3] * 3 + [0.5] * 2, dtype=torch.float64))


def test_flat_and_from_groups():
    assert pk.Hierarchy.flat(3).parents == (3, 3, 3, -1)
    assert pk.Hierarchy.from_groups([[1], [0, 2]]).parents == (4, 3, 4, -1, -1)
    with pytest.raises(ValueError, match="cover the leaves"):
        pk.Hierarchy.from_groups([[0], [0, 1]])


@pytest.mark.parametrize("parents,error,match", [
    ([2, 2, 3, 2], ValueError, "cycle"),
    ([1, 5], ValueError, "parents\\[1\\] must be -1"),
    ([0, -1], ValueError, "parents\\[0\\] must be -1"),
    ([1, -1, 1], ValueError, "leaves must be nodes 0..C-1"),
    ([2, 3, 3, -1], ValueError, "same depth"),
    ([1.0, -1], TypeError, "must be an int"),
    ("ab", TypeError, "sequence of ints"),
    ([], ValueError, "at least one node"),
])
def test_malformed_hierarchies(parents, error, match):
    with pytest.raises(error, match=match):
        pk.Hierarchy(parents)


def test_names_must_match_nodes():
    with pytest.raises(ValueError, match="names"):
        pk.Hierarchy([1, -1], names=["a"])
