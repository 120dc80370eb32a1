"""The ProtoSeg head step on the fused ops (the "one-pass training head" of the README).

* ``class_scores(..., lse_temperature=τ)`` gives the class scores and, from the
  same pass over the prototypes, lse_i = log Σ_j exp(S_ij/τ) over all C·K.
* ``sinkhorn_assign`` clusters every class's pixels at once (N·K·D work).
* PPC = lse_i − s_t/τ and PPD = (1 − s_t)², where s_t is the similarity to the
  target prototype, a gathered dot product: nothing of size N×C×K is formed.
* ``update_prototypes`` moves the prototypes from the correctly predicted pixels,
  with the Sinkhorn argmax as assignment (what the paper describes).

The backend is whatever ``protoseg_kernels`` resolves (``use_backend`` or
``$PROTOSEG_BACKEND``). ``validate=False`` skips the label range checks, which
read the labels on the host; the benchmark's labels are valid by construction.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

import protoseg_kernels as pk

from .problems import IGNORE_INDEX, HeadInputs
from .step import DEFAULT_CONFIG, HeadConfig, StepOutput


def fused_step(inputs: HeadInputs, config: HeadConfig = DEFAULT_CONFIG) -> StepOutput:
    """Forward of the fused head: the loss (backward not yet run) and new prototypes."""
    num_classes, per_class, dim = inputs.prototypes.shape
    labels = inputs.labels
    x_hat = F.normalize(inputs.x, dim=1)
    prototypes = F.normalize(inputs.prototypes, dim=-1)

    scores, lse = pk.class_scores(
        x_hat, prototypes, normalize=False, lse_temperature=config.ppc_temperature
    )
    seg_logits = F.layer_norm(scores, (num_classes,), inputs.mask_norm_weight, inputs.mask_norm_bias)
    index = pk.sinkhorn_assign(
        x_hat.detach(), prototypes, labels, normalize=False, epsilon=config.epsilon,
        iterations=config.iterations, ignore_index=IGNORE_INDEX, validate=False,
    ).index

    valid = labels != IGNORE_INDEX
    target = torch.where(valid, labels * per_class + index, 0)
    s_t = (x_hat * prototypes.reshape(num_classes * per_class, dim)[target]).sum(1)
    num_valid = valid.sum().clamp_min(1)
    ppc = torch.where(valid, lse - s_t / config.ppc_temperature, 0.0).sum() / num_valid
    ppd = torch.where(valid, (1 - s_t) ** 2, 0.0).sum() / num_valid
    seg_loss = F.cross_entropy(seg_logits, labels, ignore_index=IGNORE_INDEX)
    loss = seg_loss + config.ppc_weight * ppc + config.ppd_weight * ppd

    correct = seg_logits.detach().argmax(1) == labels
    new_prototypes = pk.update_prototypes(
        prototypes, x_hat.detach(), labels, index, mask=correct, momentum=config.momentum,
        normalize=False, ignore_index=IGNORE_INDEX, validate=False,
    ).prototypes
    return StepOutput(loss, seg_loss, ppc, ppd, torch.where(valid, target, IGNORE_INDEX), new_prototypes)
