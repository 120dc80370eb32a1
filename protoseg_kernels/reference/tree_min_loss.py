"""Reference kernels of ``tree_min_loss`` (docs/spec.md §11.1), per pixel; the op reduces.

Logits arrive as z [B, V, P] (any strides), labels [B, P] sanitised (a leaf or −1). With
MCL_v = min of z over v and its ancestors (first arg-min a_v), MCM_v = max of z over v and its
descendants (first arg-max b_v), p = σ(MCL_v), q = σ(MCM_v), and w_v = node_weights[v]:

    loss_i = Σ_v w_v·t_iv,  t_iv = −(1 − p)^γ·log(p + ε)   (v on the path of y_i)
                                   −q^γ·log(1 − q + ε)      (every other v)
    ∂t/∂MCL = p(1 − p)^γ·[γ·log(p + ε) − (1 − p)/(p + ε)]
    ∂t/∂MCM = q^γ(1 − q)·[q/(1 − q + ε) − γ·log(1 − q + ε)]

each routed to its arg-min / arg-max node. 1 − σ(m) is computed as σ(−m). The sigmoid is
monotonic, so the min and max are taken over the logits: the same extremum and the same
first index as over the scores.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._common import compute_dtype


def _first_extremum(z: Tensor, table: Tensor, largest: bool) -> tuple[Tensor, Tensor]:
    """(extremum [B, V, P], its first node [B, V, P]) of z over each row of ``table``
    (rows ascending, padded with −1): NaN wins, as in torch.max."""
    safe = table.clamp_min(0)
    values = z[:, safe, :]  # [B, V, W, P]
    padding = (table < 0)[None, :, :, None]
    values = values.masked_fill(padding, float("-inf") if largest else float("inf"))
    extremum = values.amax(2) if largest else values.amin(2)
    hit = (values == extremum.unsqueeze(2)) | (values.isnan() & extremum.isnan().unsqueeze(2))
    first = hit.to(torch.uint8).argmax(2)  # the first maximum of a 0/1 row
    nodes = torch.arange(table.shape[0], device=z.device)[None, :, None]
    return extremum, safe[nodes, first]


def _on_path(labels: Tensor, ancestors: Tensor) -> Tensor:
    """[B, V, P] bool: node v is y_i or one of its ancestors (False for ignored pixels)."""
    v = ancestors.shape[0]
    membership = torch.zeros(v, v + 1, dtype=torch.bool, device=labels.device)
    membership.scatter_(1, torch.where(ancestors < 0, v, ancestors), True)  # row y: its path
    return membership[labels.clamp_min(0), :v].permute(0, 2, 1) & (labels >= 0).unsqueeze(1)


def _terms(mcl: Tensor, mcm: Tensor, gamma: float, eps: float) -> tuple[Tensor, Tensor]:
    p, one_minus_p = torch.sigmoid(mcl), torch.sigmoid(-mcl)
    q, one_minus_q = torch.sigmoid(mcm), torch.sigmoid(-mcm)
    positive = -torch.log(p + eps)
    negative = -torch.log(one_minus_q + eps)
    if gamma != 0:
        positive = positive * one_minus_p.pow(gamma)
        negative = negative * q.pow(gamma)
    return positive, negative


def _slopes(mcl: Tensor, mcm: Tensor, gamma: float, eps: float) -> tuple[Tensor, Tensor]:
    p, one_minus_p = torch.sigmoid(mcl), torch.sigmoid(-mcl)
    q, one_minus_q = torch.sigmoid(mcm), torch.sigmoid(-mcm)
    positive = p * (gamma * torch.log(p + eps) - one_minus_p / (p + eps))
    negative = one_minus_q * (q / (one_minus_q + eps) - gamma * torch.log(one_minus_q + eps))
    if gamma != 0:
        positive = positive * one_minus_p.pow(gamma)
        negative = negative * q.pow(gamma)
    return positive, negative


def tree_min_forward(
    logits: Tensor, labels: Tensor, ancestors: Tensor, descendants: Tensor, node_weights: Tensor,
    focal_gamma: float, eps: float,
) -> Tensor:
    z = logits.to(compute_dtype(logits))
    mcl, _ = _first_extremum(z, ancestors, largest=False)
    mcm, _ = _first_extremum(z, descendants, largest=True)
    positive, negative = _terms(mcl, mcm, focal_gamma, eps)
    on_path = _on_path(labels, ancestors)
    weights = node_weights.to(z.dtype)[None, :, None]
    loss = (weights * torch.where(on_path, positive, negative)).sum(1)
    return torch.where(labels >= 0, loss, loss.new_zeros(()))


def tree_min_backward(
    grad_loss: Tensor, logits: Tensor, labels: Tensor, ancestors: Tensor, descendants: Tensor,
    node_weights: Tensor, focal_gamma: float, eps: float,
) -> Tensor:
    z = logits.to(compute_dtype(logits))
    mcl, argmin = _first_extremum(z, ancestors, largest=False)
    mcm, argmax = _first_extremum(z, descendants, largest=True)
    positive, negative = _slopes(mcl, mcm, focal_gamma, eps)
    on_path = _on_path(labels, ancestors)
    upstream = grad_loss.to(z.dtype).unsqueeze(1) * node_weights.to(z.dtype)[None, :, None]
    contribution = torch.where(on_path, positive, negative) * upstream
    contribution = torch.where((labels >= 0).unsqueeze(1), contribution, contribution.new_zeros(()))
    grad = torch.zeros_like(z).scatter_add_(1, torch.where(on_path, argmin, argmax), contribution)
    return grad.to(logits.dtype)
