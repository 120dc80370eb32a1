"""The naive ProtoSeg head step (docs/spec.md §8): the baseline every number is compared with.

Written the way the original code does it, on purpose: the similarities are
computed twice (an einsum for the class scores, a matmul for the contrast
logits), a Python loop over classes runs the matrix Sinkhorn-Knopp on each
class's pixels with boolean indexing (a host synchronisation each time), the
prototype update is a masked matmul per class, PPC is a cross-entropy over
N × C·K logits and PPD gathers from them after boolean indexing. The prototype
update runs with autograd recording, as in the original. The Sinkhorn runs under
``no_grad``, as in SwAV where it comes from (the copy in the ProtoSeg repository
records autograd for nothing, and ``torch.compile`` rejects that: its in-place
divisions overwrite a tensor saved for backward). Do not optimise this file: it
is what users run today.

``assignment="gumbel"`` draws the update assignment as the original does
(``F.gumbel_softmax`` on the Sinkhorn probabilities); ``"argmax"`` uses the
Sinkhorn argmax, as our head does, so the two can be compared exactly.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .problems import IGNORE_INDEX, HeadInputs
from .step import DEFAULT_CONFIG, HeadConfig, StepOutput

ASSIGNMENTS = ("gumbel", "argmax")


def l2_normalize(x: Tensor) -> Tensor:
    return F.normalize(x, p=2, dim=-1)


def momentum_update(old_value: Tensor, new_value: Tensor, momentum: float) -> Tensor:
    return old_value * momentum + new_value * (1 - momentum)


@torch.no_grad()
def matrix_sinkhorn(
    out: Tensor, iterations: int, epsilon: float, assignment: str
) -> tuple[Tensor, Tensor]:
    """Sinkhorn-Knopp on one class's [n, K] similarities; returns (q one-hot, argmax)."""
    L = torch.exp(out / epsilon).t()  # K x n
    B = L.shape[1]
    K = L.shape[0]
    L /= torch.sum(L)
    for _ in range(iterations):
        L /= torch.sum(L, dim=1, keepdim=True)
        L /= K
        L /= torch.sum(L, dim=0, keepdim=True)
        L /= B
    L *= B
    L = L.t()
    index = torch.argmax(L, dim=1)
    if assignment == "gumbel":
        q = F.gumbel_softmax(L, tau=0.5, hard=True)
    else:
        q = F.one_hot(index, num_classes=K).to(L.dtype)
    return q, index


def update_class_prototypes(
    protos: Tensor, k: int, q: Tensor, m_k: Tensor, c_k: Tensor, momentum: float
) -> None:
    """Move (in place) the prototypes of class k that got correctly predicted pixels:
    q [n, K] one-hot assignment, m_k [n] correct, c_k [n, D] embeddings."""
    per_class, dim = protos.shape[1:]
    m_q = q * m_k.unsqueeze(1).expand(-1, per_class)
    c_q = c_k * m_k.unsqueeze(1).expand(-1, dim)
    f = m_q.transpose(0, 1) @ c_q
    n = torch.sum(m_q, dim=0)
    if torch.sum(n) > 0:
        f = F.normalize(f, p=2, dim=-1)
        new_value = momentum_update(protos[k, n != 0, :], f[n != 0, :], momentum)
        protos[k, n != 0, :] = new_value


def prototype_learning(
    x_hat: Tensor, seg_logits: Tensor, gt_seg: Tensor, masks: Tensor, prototypes: Tensor,
    config: HeadConfig, assignment: str,
) -> tuple[Tensor, Tensor, Tensor]:
    """Contrast logits [N, C·K], contrast targets [N] (float, -1 ignored), new prototypes."""
    num_classes, per_class, dim = prototypes.shape
    pred_seg = torch.max(seg_logits, 1)[1]
    mask = gt_seg == pred_seg.view(-1)

    proto_logits = torch.mm(x_hat, prototypes.view(-1, dim).t())
    proto_target = gt_seg.clone().float()

    protos = prototypes.data.clone()
    for k in range(num_classes):
        init_q = masks[..., k]
        init_q = init_q[gt_seg == k, ...]
        if init_q.shape[0] == 0:
            continue
        q, indexs = matrix_sinkhorn(init_q, config.iterations, config.epsilon, assignment)

        m_k = mask[gt_seg == k]
        c_k = x_hat[gt_seg == k, ...]
        update_class_prototypes(protos, k, q, m_k, c_k, config.momentum)

        proto_target[gt_seg == k] = indexs.float() + (per_class * k)

    return proto_logits, proto_target, l2_normalize(protos).detach()


def ppd_loss(contrast_logits: Tensor, contrast_target: Tensor) -> Tensor:
    contrast_logits = contrast_logits[contrast_target != IGNORE_INDEX, :]
    contrast_target = contrast_target[contrast_target != IGNORE_INDEX]
    logits = torch.gather(contrast_logits, 1, contrast_target[:, None].long())
    return (1 - logits).pow(2).mean()


def baseline_step(
    inputs: HeadInputs, config: HeadConfig = DEFAULT_CONFIG, assignment: str = "gumbel"
) -> StepOutput:
    """Forward of the naive head: the loss (backward not yet run) and new prototypes."""
    if assignment not in ASSIGNMENTS:
        raise ValueError(f"assignment must be one of {ASSIGNMENTS}, got {assignment!r}")
    if config.ppc_temperature != 1.0:
        raise ValueError("the original code has no PPC temperature: ppc_temperature must be 1.0")
    num_classes = inputs.prototypes.shape[0]
    x_hat = l2_normalize(inputs.x)
    prototypes = l2_normalize(inputs.prototypes)

    # n: pixels, k: classes, m: prototypes per class
    masks = torch.einsum("nd,kmd->nmk", x_hat, prototypes)
    out_seg = torch.amax(masks, dim=1)
    out_seg = F.layer_norm(out_seg, (num_classes,), inputs.mask_norm_weight, inputs.mask_norm_bias)

    gt_seg = inputs.labels.float()
    contrast_logits, contrast_target, new_prototypes = prototype_learning(
        x_hat, out_seg, gt_seg, masks, prototypes, config, assignment
    )

    seg_loss = F.cross_entropy(out_seg, inputs.labels, ignore_index=IGNORE_INDEX)
    ppc = F.cross_entropy(contrast_logits, contrast_target.long(), ignore_index=IGNORE_INDEX)
    ppd = ppd_loss(contrast_logits, contrast_target)
    loss = seg_loss + config.ppc_weight * ppc + config.ppd_weight * ppd
    return StepOutput(loss, seg_loss, ppc, ppd, contrast_target.long(), new_prototypes)
