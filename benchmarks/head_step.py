"""The ProtoSeg head step on the fused ops (the README's "The ProtoSeg training step").

* ``class_scores(..., lse_temperature=τ)`` gives the class scores and, from the
  same pass over the prototypes, lse_i = log Σ_j exp(S_ij/τ) over all C·K.
* ``sinkhorn_assign`` clusters every class's pixels at once (N·K·D work).
* ``ppc_ppd_loss(..., lse=lse)``: PPC = lse_i − s_t/τ and PPD = (1 − s_t)², where
  s_t is the cosine to the target prototype (``target_similarity``: a gathered dot
  product, N·D work), as ``ProtoSegHead`` does.

Only public ops: this is the composition a user writes (docs/spec.md §7), 3 similarity
GEMMs per step (the scores' pass forward; its recomputation and dx backward).
* ``update_prototypes`` moves the prototypes from the correctly predicted pixels,
  with the Sinkhorn argmax as assignment (what the paper describes).

Memory: the ops normalise ``x`` themselves (``normalize=True``), so no
normalised copy of x is kept, and the target cosine keeps nothing of size N×D
for backward (it re-gathers the target prototypes in row blocks). What remains
alive across the step is ``x``, O(N·C) scores and O(N) losses; backward adds the
gradient of ``x``.

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
    num_classes, per_class, _ = inputs.prototypes.shape
    x, labels, prototypes = inputs.x, inputs.labels, inputs.prototypes

    scores, lse = pk.class_scores(x, prototypes, lse_temperature=config.ppc_temperature)
    seg_logits = F.layer_norm(scores, (num_classes,), inputs.mask_norm_weight, inputs.mask_norm_bias)
    index = pk.sinkhorn_assign(
        x.detach(), prototypes, labels, epsilon=config.epsilon, iterations=config.iterations,
        ignore_index=IGNORE_INDEX, validate=False,
    ).index

    target = torch.where(labels != IGNORE_INDEX, labels * per_class + index, IGNORE_INDEX)
    ppc, ppd = pk.ppc_ppd_loss(
        x, prototypes, target, lse=lse, temperature=config.ppc_temperature, ignore_index=IGNORE_INDEX,
        validate=False,
    )
    seg_loss = F.cross_entropy(seg_logits, labels, ignore_index=IGNORE_INDEX)
    loss = seg_loss + config.ppc_weight * ppc + config.ppd_weight * ppd

    correct = seg_logits.detach().argmax(1) == labels
    new_prototypes = pk.update_prototypes(
        prototypes, x.detach(), labels, index, mask=correct, momentum=config.momentum,
        ignore_index=IGNORE_INDEX, validate=False,
    ).prototypes
    return StepOutput(loss, seg_loss, ppc, ppd, target, new_prototypes)
