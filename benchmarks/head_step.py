"""The ProtoSeg head step on the fused ops (the "one-pass training head" of the README).

* ``class_scores(..., lse_temperature=τ)`` gives the class scores and, from the
  same pass over the prototypes, lse_i = log Σ_j exp(S_ij/τ) over all C·K.
* ``sinkhorn_assign`` clusters every class's pixels at once (N·K·D work).
* PPC = lse_i − s_t/τ and PPD = (1 − s_t)², where s_t is the cosine to the
  target prototype: a gathered dot product, nothing of size N×C×K.
* ``update_prototypes`` moves the prototypes from the correctly predicted pixels,
  with the Sinkhorn argmax as assignment (what the paper describes).

Memory: the ops normalise ``x`` themselves (``normalize=True``), so no
normalised copy of x is kept, and the target cosine is an autograd function that
keeps nothing of size N×D for backward (it re-gathers the target prototypes in
row blocks). What remains alive across the step is ``x``, O(N·C) scores and
O(N) losses; backward adds the gradient of ``x``.

The backend is whatever ``protoseg_kernels`` resolves (``use_backend`` or
``$PROTOSEG_BACKEND``). ``validate=False`` skips the label range checks, which
read the labels on the host; the benchmark's labels are valid by construction.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

import protoseg_kernels as pk

from .problems import IGNORE_INDEX, HeadInputs
from .step import DEFAULT_CONFIG, HeadConfig, StepOutput

NORM_EPS = 1e-12  # as F.normalize
MAX_BLOCKS = 8  # row blocks of the gathered prototypes: temporaries of at most N·D/8 elements


def _row_blocks(n: int) -> list[slice]:
    rows = max(1, -(-n // MAX_BLOCKS))
    return [slice(start, min(start + rows, n)) for start in range(0, n, rows)]


class _TargetCosine(torch.autograd.Function):
    """s_i = ⟨x_i/max(‖x_i‖, ε), p_{t_i}⟩ for given unit prototypes p [C·K, D].

    Backward: dx_i = g_i·(p_t − s_i·x̂_i)/‖x_i‖, or g_i·p_t/ε where the norm is
    clamped (the gradient of F.normalize). Both passes gather p_t block by block
    into one reused buffer and keep nothing of size N×D for backward.
    """

    @staticmethod
    def forward(ctx, x: Tensor, flat_prototypes: Tensor, target: Tensor) -> Tensor:
        norm = x.norm(dim=1).clamp_min(NORM_EPS)
        dot = x.new_empty(x.shape[0])
        blocks = _row_blocks(x.shape[0])
        buffer = x.new_empty(blocks[0].stop if blocks else 0, x.shape[1])
        for rows in blocks:
            p_t = torch.index_select(flat_prototypes, 0, target[rows], out=buffer[: rows.stop - rows.start])
            torch.sum(p_t.mul_(x[rows]), dim=1, out=dot[rows])
        s = dot / norm
        ctx.save_for_backward(x, flat_prototypes, target, norm, s)
        return s

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None]:
        x, flat_prototypes, target, norm, s = ctx.saved_tensors
        radial = torch.where(norm > NORM_EPS, s / norm, 0.0).unsqueeze(1)  # x̂ component: s·x/‖x‖
        scale = (grad / norm).unsqueeze(1)
        dx = torch.empty_like(x)
        blocks = _row_blocks(x.shape[0])
        buffer = x.new_empty(blocks[0].stop if blocks else 0, x.shape[1])
        for rows in blocks:
            p_t = torch.index_select(flat_prototypes, 0, target[rows], out=buffer[: rows.stop - rows.start])
            torch.addcmul(p_t, x[rows], radial[rows], value=-1, out=dx[rows])
            dx[rows].mul_(scale[rows])
        return dx, None, None


def fused_step(inputs: HeadInputs, config: HeadConfig = DEFAULT_CONFIG) -> StepOutput:
    """Forward of the fused head: the loss (backward not yet run) and new prototypes."""
    num_classes, per_class, dim = inputs.prototypes.shape
    x, labels, prototypes = inputs.x, inputs.labels, inputs.prototypes

    scores, lse = pk.class_scores(x, prototypes, lse_temperature=config.ppc_temperature)
    seg_logits = F.layer_norm(scores, (num_classes,), inputs.mask_norm_weight, inputs.mask_norm_bias)
    index = pk.sinkhorn_assign(
        x.detach(), prototypes, labels, epsilon=config.epsilon, iterations=config.iterations,
        ignore_index=IGNORE_INDEX, validate=False,
    ).index

    valid = labels != IGNORE_INDEX
    target = torch.where(valid, labels * per_class + index, 0)
    unit_prototypes = F.normalize(prototypes.detach(), dim=-1).reshape(num_classes * per_class, dim)
    s_t = _TargetCosine.apply(x, unit_prototypes, target)
    num_valid = valid.sum().clamp_min(1)
    ppc = torch.where(valid, lse - s_t / config.ppc_temperature, 0.0).sum() / num_valid
    ppd = torch.where(valid, (1 - s_t) ** 2, 0.0).sum() / num_valid
    seg_loss = F.cross_entropy(seg_logits, labels, ignore_index=IGNORE_INDEX)
    loss = seg_loss + config.ppc_weight * ppc + config.ppd_weight * ppd

    correct = seg_logits.detach().argmax(1) == labels
    new_prototypes = pk.update_prototypes(
        prototypes, x.detach(), labels, index, mask=correct, momentum=config.momentum,
        ignore_index=IGNORE_INDEX, validate=False,
    ).prototypes
    return StepOutput(loss, seg_loss, ppc, ppd, torch.where(valid, target, IGNORE_INDEX), new_prototypes)
