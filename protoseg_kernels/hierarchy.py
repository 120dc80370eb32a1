"""``Hierarchy``: a class tree for HSSN (docs/spec.md §11).

Nodes 0..C−1 are the leaves (the dataset's classes), nodes C..V−1 the internal ones; the tree
is given by a parent list (−1 for a root). Every leaf is at the same depth, so each node has a
*height* (0 for leaves, 1 for their parents, ...) that is its level. The hierarchy ops read the
tree as three small tables (:meth:`Hierarchy.tables`), built once per device:

* ``ancestors`` [V, L] int64: row v holds v and its ancestors, in ascending node order, padded
  with −1 (L = depth + 1 levels);
* ``descendants`` [V, S] int64: row v holds v and its descendants, ascending, padded with −1;
* ``node_weights`` [V] float64: 1/|level(v)|, the per-level normalisation of the tree-min loss.

Ascending rows make "the first arg-min / arg-max" of the spec the smallest node index.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor

_CITYSCAPES_GROUPS = (
    ("flat", ("road", "sidewalk")),
    ("construction", ("building", "wall", "fence")),
    ("object", ("pole", "traffic light", "traffic sign")),
    ("nature", ("vegetation", "terrain")),
    ("sky", ("sky",)),
    ("human", ("person", "rider")),
    ("vehicle", ("car", "truck", "bus", "train", "motorcycle", "bicycle")),
)


class HierarchyTables(NamedTuple):
    """The tree as the kernels read it (see the module docstring)."""

    ancestors: Tensor
    descendants: Tensor
    node_weights: Tensor


class Hierarchy:
    """A class tree over V nodes, leaves first (docs/spec.md §11).

    Args:
        parents: V parent indices, −1 for a root. The nodes without children must be exactly
            0..C−1 (the leaves, i.e. the dataset's class ids), all at the same depth.
        names: optional V node names (for tables and figures).

    Raises ``ValueError`` naming the node for a parent outside [−1, V), a cycle, a leaf
    after an internal node, or leaves at different depths.
    """

    def __init__(self, parents: Sequence[int], names: Sequence[str] | None = None) -> None:
        self.parents: tuple[int, ...] = _check_parents(parents)
        v = len(self.parents)
        children: list[list[int]] = [[] for _ in range(v)]
        for node, parent in enumerate(self.parents):
            if parent >= 0:
                children[parent].append(node)
        self.children: tuple[tuple[int, ...], ...] = tuple(tuple(c) for c in children)
        self.num_leaves: int = _check_leaves_first(self.children)
        self.paths: tuple[tuple[int, ...], ...] = tuple(_path_to_root(self.parents, n) for n in range(v))
        self.depth: int = _check_equal_depth(self.paths[: self.num_leaves])
        self.heights: tuple[int, ...] = tuple(self.depth + 1 - len(path) for path in self.paths)
        if names is not None:
            names = tuple(str(n) for n in names)
            if len(names) != v:
                raise ValueError(f"Hierarchy: names must have one entry per node ({v}), got {len(names)}")
        self.names: tuple[str, ...] | None = names
        self._tables: dict[torch.device, HierarchyTables] = {}

    @property
    def num_nodes(self) -> int:
        """V, the number of nodes (the channels of the logits)."""
        return len(self.parents)

    @property
    def num_levels(self) -> int:
        """L = depth + 1; level h holds the nodes of height h (0: the leaves)."""
        return self.depth + 1

    def level(self, height: int) -> tuple[int, ...]:
        """The nodes of height ``height``, ascending."""
        return tuple(n for n, h in enumerate(self.heights) if h == height)

    def ancestor_at(self, node: int, height: int) -> int:
        """The ancestor of ``node`` (or the node itself) at ``height``."""
        path = self.paths[node]
        offset = height - self.heights[node]
        if not 0 <= offset < len(path):
            raise ValueError(f"Hierarchy: node {node} has no ancestor at height {height}")
        return path[offset]

    def leaf_ancestors(self, height: int, device: torch.device | str | None = None) -> Tensor:
        """[C] int64: for each leaf, its ancestor at ``height``, indexed from 0 within that
        level (the class id of the level's cross-entropy)."""
        level = self.level(height)
        position = {node: i for i, node in enumerate(level)}
        ids = [position[self.ancestor_at(leaf, height)] for leaf in range(self.num_leaves)]
        return torch.tensor(ids, dtype=torch.int64, device=device)

    def tables(self, device: torch.device | str) -> HierarchyTables:
        """The kernels' tables on ``device`` (built once per device)."""
        device = torch.device(device)
        if device not in self._tables:
            self._tables[device] = self._build_tables(device)
        return self._tables[device]

    def _build_tables(self, device: torch.device) -> HierarchyTables:
        v = self.num_nodes
        descendants: list[list[int]] = [[n] for n in range(v)]
        for node in range(v):
            for ancestor in self.paths[node][1:]:
                descendants[ancestor].append(node)
        level_sizes = [len(self.level(h)) for h in range(self.num_levels)]
        return HierarchyTables(
            ancestors=_padded([sorted(p) for p in self.paths], self.num_levels, device),
            descendants=_padded([sorted(d) for d in descendants], max(map(len, descendants)), device),
            node_weights=torch.tensor([1.0 / level_sizes[h] for h in self.heights], dtype=torch.float64,
                                      device=device),
        )

    @classmethod
    def flat(cls, num_classes: int) -> Hierarchy:
        """C leaves under one root (two levels)."""
        if num_classes < 1:
            raise ValueError(f"Hierarchy.flat: num_classes must be >= 1, got {num_classes}")
        return cls([num_classes] * num_classes + [-1])

    @classmethod
    def from_groups(cls, groups: Sequence[Sequence[int]], names: Sequence[str] | None = None) -> Hierarchy:
        """Two levels: ``groups[g]`` lists the leaves under internal node C + g."""
        leaves = sorted(leaf for group in groups for leaf in group)
        if leaves != list(range(len(leaves))):
            raise ValueError("Hierarchy.from_groups: the groups must cover the leaves 0..C-1 exactly once")
        c = len(leaves)
        parents = [0] * c + [-1] * len(groups)
        for g, group in enumerate(groups):
            for leaf in group:
                parents[leaf] = c + g
        return cls(parents, names)

    @classmethod
    def cityscapes(cls) -> Hierarchy:
        """The HSSN Cityscapes tree: 19 leaves (train ids) under 7 superclasses, V = 26."""
        groups, leaf_names, start = [], [], 0
        for _, members in _CITYSCAPES_GROUPS:
            groups.append(range(start, start + len(members)))
            leaf_names.extend(members)
            start += len(members)
        return cls.from_groups(groups, leaf_names + [name for name, _ in _CITYSCAPES_GROUPS])

    def __repr__(self) -> str:
        return f"Hierarchy(leaves={self.num_leaves}, nodes={self.num_nodes}, depth={self.depth})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Hierarchy) and other.parents == self.parents

    def __hash__(self) -> int:
        return hash(self.parents)


def _check_parents(parents: Sequence[int]) -> tuple[int, ...]:
    if isinstance(parents, (str, bytes)) or not isinstance(parents, Sequence):
        raise TypeError(f"Hierarchy: parents must be a sequence of ints, got {type(parents).__name__}")
    values = []
    for node, parent in enumerate(parents):
        if isinstance(parent, bool) or not isinstance(parent, int):
            raise TypeError(f"Hierarchy: parents[{node}] must be an int, got {type(parent).__name__}")
        if not -1 <= parent < len(parents) or parent == node:
            raise ValueError(f"Hierarchy: parents[{node}] must be -1 (a root) or another node in "
                             f"[0, {len(parents)}), got {parent}")
        values.append(parent)
    if not values:
        raise ValueError("Hierarchy: parents must list at least one node")
    return tuple(values)


def _path_to_root(parents: tuple[int, ...], node: int) -> tuple[int, ...]:
    path, seen = [node], {node}
    while parents[path[-1]] >= 0:
        parent = parents[path[-1]]
        if parent in seen:
            raise ValueError(f"Hierarchy: the parents of node {node} form a cycle through node {parent}")
        path.append(parent)
        seen.add(parent)
    return tuple(path)


def _check_leaves_first(children: tuple[tuple[int, ...], ...]) -> int:
    leaves = [n for n, c in enumerate(children) if not c]
    if leaves != list(range(len(leaves))):
        first_internal = next(n for n in range(len(children)) if children[n])
        misplaced = next(n for n in leaves if n > first_internal)
        raise ValueError(f"Hierarchy: leaves must be nodes 0..C-1, but node {misplaced} has no child "
                         f"and comes after internal node {first_internal}")
    return len(leaves)


def _check_equal_depth(leaf_paths: tuple[tuple[int, ...], ...]) -> int:
    depths = [len(p) - 1 for p in leaf_paths]
    for leaf, depth in enumerate(depths):
        if depth != depths[0]:
            raise ValueError(f"Hierarchy: every leaf must be at the same depth; leaf 0 is at depth "
                             f"{depths[0]}, leaf {leaf} at depth {depth}")
    return depths[0]


def _padded(rows: list[list[int]], width: int, device: torch.device) -> Tensor:
    table = torch.full((len(rows), width), -1, dtype=torch.int64)
    for i, row in enumerate(rows):
        table[i, : len(row)] = torch.tensor(row, dtype=torch.int64)
    return table.to(device)
