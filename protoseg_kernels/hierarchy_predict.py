"""``hierarchy_predict`` and ``hierarchy_scores``: HSSN's hierarchy-aware inference (docs/spec.md §11.3).

* ``rule="softmax_sum"`` (the original): P = softmax of the logits over all V nodes; each
  leaf scores its own probability plus its ancestors'; the prediction is the argmax over
  leaves. The original indexes the batch's first image; here every image is scored.
* ``rule="path_min"``: the argmax over leaves of MCL (the min of σ(z) over the leaf and its
  ancestors, docs/spec.md §11.1), i.e. of the min of z along the leaf's path.

Ties go to the smallest leaf; a NaN score wins (as in torch.argmax).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._checks import check_choice
from .hierarchy import Hierarchy
from .tree_min_loss import _nodes_as_channels, check_hierarchy

OP = "hierarchy_predict"
RULES = ("softmax_sum", "path_min")


def hierarchy_scores(logits: Tensor, hierarchy: Hierarchy, *, rule: str = "softmax_sum") -> Tensor:
    """Leaf scores whose argmax over leaves is :func:`hierarchy_predict`'s prediction.

    Args:
        logits: [N, V] or [B, V, H, W] floating node logits (leaves first).
        hierarchy: the class tree.
        rule: ``"softmax_sum"``: probability of the leaf plus its ancestors' (fp32, or fp64
            for fp64 logits); ``"path_min"``: the min logit along the leaf's path (the
            logits' dtype; monotone in MCL).

    Returns:
        [N, C] or [B, C, H, W] scores (C = ``hierarchy.num_leaves``).
    """
    hierarchy = check_hierarchy(OP, hierarchy)
    z, flat = _nodes_as_channels(OP, logits, hierarchy.num_nodes)  # [B, V, P]
    rule = check_choice(OP, "rule", rule, RULES)
    paths = hierarchy.tables(logits.device).ancestors[: hierarchy.num_leaves]  # [C, L], −1 padded
    if rule == "softmax_sum":
        probabilities = torch.softmax(z.float() if z.dtype != torch.float64 else z, dim=1)
        on_path = torch.zeros(hierarchy.num_leaves, hierarchy.num_nodes + 1, dtype=probabilities.dtype,
                              device=logits.device)
        on_path.scatter_(1, torch.where(paths < 0, hierarchy.num_nodes, paths), 1.0)
        scores = torch.einsum("cv,bvp->bcp", on_path[:, :-1], probabilities)
    else:
        scores = z[:, paths.clamp_min(0), :].amin(2)  # every leaf's path is full (equal depth)
    if flat:
        return scores[0].t()
    return scores.view(logits.shape[0], hierarchy.num_leaves, *logits.shape[2:])


def hierarchy_predict(logits: Tensor, hierarchy: Hierarchy, *, rule: str = "softmax_sum") -> Tensor:
    """Leaf predictions from node logits: the argmax over leaves of :func:`hierarchy_scores`.

    Args:
        logits: [N, V] or [B, V, H, W] floating node logits (leaves first).
        hierarchy: the class tree.
        rule: ``"softmax_sum"`` or ``"path_min"`` (module docstring).

    Returns:
        int64 leaf ids [N] or [B, H, W].
    """
    return hierarchy_scores(logits, hierarchy, rule=rule).argmax(1 if logits.dim() == 4 else -1)
