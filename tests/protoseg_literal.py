"""The original ProtoSeg training step, written literally from docs/spec.md §8 (the test
oracle of ``ProtoSegHead(compat="protoseg")``): full N×C×K similarity tensor, a
Python loop over classes, the matrix Sinkhorn-Knopp, the Gumbel draw, the
per-class momentum update and the losses as separate cross-entropies."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass
class LiteralStep:
    seg: Tensor  # [b, C, h, w]
    target: Tensor  # [N] flat prototype index, -1 unlabelled
    prototypes: Tensor  # [C, K, D] after the update
    ce: Tensor
    ppc: Tensor
    ppd: Tensor
    loss: Tensor


def matrix_sinkhorn(similarity: Tensor, epsilon: float, iterations: int) -> Tensor:
    """docs/spec.md §3.4's matrix algorithm on one class's [n, K] similarities; returns Q [n, K]."""
    e = torch.exp(similarity / epsilon).t()  # K x n
    rows, cols = e.shape
    e = e / e.sum()
    for _ in range(iterations):
        e = e / e.sum(dim=1, keepdim=True) / rows
        e = e / e.sum(dim=0, keepdim=True) / cols
    return (e * cols).t()


def literal_step(
    head, features: Tensor, labels: Tensor, gumbel_noise: Tensor, ignore_index: int,
    ppc_weight: float = 0.01, ppd_weight: float = 0.001,
) -> LiteralStep:
    """One training step of the original code on ``head``'s parameters (not mutated).

    ``gumbel_noise`` [N, K]: the Gumbel(0, 1) draw of each pixel (the rows of a
    class's pixels are that class's draw).
    """
    b, _, h, w = features.shape
    num_classes, per_class, dim = head.prototypes.shape
    # 1. x = l2-normalise(LayerNorm_D(f)); f = the projected features.
    f = head.projection(features).permute(0, 2, 3, 1).reshape(-1, dim)
    x = F.normalize(F.layer_norm(f, (dim,), head.feat_norm.weight, head.feat_norm.bias, head.feat_norm.eps), dim=1)
    # 2. re-normalised prototypes; S [N, C, K].
    prototypes = F.normalize(head.prototypes.detach().clone(), dim=-1)
    similarity = torch.einsum("nd,ckd->nck", x, prototypes)
    # 3. max over K, mask_norm over classes.
    scores = similarity.amax(dim=2)
    seg_flat = F.layer_norm(scores, (num_classes,), head.mask_norm.weight, head.mask_norm.bias, head.mask_norm.eps)
    seg = seg_flat.reshape(b, h, w, num_classes).permute(0, 3, 1, 2)
    # 4. nearest-downsampled labels, correctness mask.
    gt = F.interpolate(labels[:, None].float(), size=(h, w), mode="nearest").reshape(-1)
    correct = seg_flat.argmax(dim=1) == gt
    # 5. per class: Sinkhorn, targets, Gumbel update assignment, momentum update.
    new = prototypes.clone()
    target = torch.full((x.shape[0],), -1, dtype=torch.int64)
    for c in range(num_classes):
        pixels = (gt == c).nonzero()[:, 0]
        if pixels.numel() == 0:
            continue
        q = matrix_sinkhorn(similarity[pixels, c, :].detach(), head.sinkhorn_epsilon, head.sinkhorn_iterations)
        target[pixels] = q.argmax(dim=1) + per_class * c
        drawn = F.one_hot((q + gumbel_noise[pixels]).argmax(dim=1), per_class).to(x.dtype)
        mask = correct[pixels].to(x.dtype)[:, None]
        m_q = drawn * mask
        sums = m_q.t() @ (x[pixels].detach() * mask)
        counts = m_q.sum(dim=0)
        if counts.sum() > 0:
            moved = counts != 0
            new[c, moved] = new[c, moved] * head.momentum + F.normalize(sums, dim=-1)[moved] * (1 - head.momentum)
    new = F.normalize(new, dim=-1)
    # 7. losses.
    logits = similarity.reshape(x.shape[0], num_classes * per_class)
    ppc = F.cross_entropy(logits, target, ignore_index=-1)
    labelled = target != -1
    ppd = (1 - logits[labelled].gather(1, target[labelled][:, None])).pow(2).mean()
    upsampled = F.interpolate(seg, size=labels.shape[-2:], mode="bilinear", align_corners=True)
    ce = F.cross_entropy(upsampled, labels, ignore_index=ignore_index)
    loss = ce + ppc_weight * ppc + ppd_weight * ppd
    return LiteralStep(seg, target, new, ce, ppc, ppd, loss)
