"""Per-op benchmark cases: each public op against the naive PyTorch it replaces.

The naive versions are the corresponding pieces of :mod:`benchmarks.baseline`:
einsum + amax for the class scores; a matmul to N × C·K logits, cross-entropy
and a boolean-indexed gather for PPC/PPD; an autograd gather of the target
prototypes for the target similarity; the per-class loop with the matrix
Sinkhorn (on each class's own similarities); the per-class masked matmul for
the update. Inputs are l2-normalised beforehand and the ops are called with
``normalize=False``, as in the head step.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

import protoseg_kernels as pk

from .baseline import l2_normalize, matrix_sinkhorn, ppd_loss, update_class_prototypes
from .problems import IGNORE_INDEX, HeadInputs
from .step import HeadConfig

GRAD_OPS = ("class_scores", "ppc_ppd_loss", "target_similarity")
NO_GRAD_OPS = ("sinkhorn_assign", "update_prototypes")
GRAD_MODES = ("fwd", "bwd", "fwd+bwd")


@dataclass
class OpInputs:
    x_hat: Tensor  # [N, D] unit rows, leaf requiring grad
    prototypes: Tensor  # [C, K, D] unit rows
    labels: Tensor  # [N] class or -1
    target: Tensor  # [N] flat prototype c·K + k, or -1
    index: Tensor  # [N] prototype within the class (any value where labels is -1)
    correct: Tensor  # [N] bool, the update mask
    grad_scores: Tensor  # [N, C] upstream gradient of the class scores


def make_op_inputs(head: HeadInputs, seed: int = 1) -> OpInputs:
    g = torch.Generator().manual_seed(seed)
    c, k, _ = head.prototypes.shape
    n, device = head.x.shape[0], head.x.device
    slot = torch.randint(0, k, (n,), generator=g).to(device)
    valid = head.labels != IGNORE_INDEX
    return OpInputs(
        x_hat=l2_normalize(head.x.detach()).requires_grad_(),
        prototypes=head.prototypes.detach(),
        labels=head.labels,
        target=torch.where(valid, head.labels * k + slot, IGNORE_INDEX),
        index=slot,
        correct=(torch.rand(n, generator=g) < 0.7).to(device),
        grad_scores=torch.randn(n, c, generator=g).to(device=device, dtype=head.x.dtype),
    )


# ---- naive (the baseline's way) ----------------------------------------------
def naive_class_scores(o: OpInputs) -> Tensor:
    return torch.amax(torch.einsum("nd,kmd->nmk", o.x_hat, o.prototypes), dim=1)


def naive_ppc_ppd(o: OpInputs) -> Tensor:
    logits = torch.mm(o.x_hat, o.prototypes.view(-1, o.prototypes.shape[-1]).t())
    target = o.target.float()
    ppc = F.cross_entropy(logits, target.long(), ignore_index=IGNORE_INDEX)
    return ppc + ppd_loss(logits, target)


def naive_target_similarity(o: OpInputs) -> Tensor:
    """Σ_i s_i with s_i = ⟨x̂_i, P̂_{t_i}⟩ (autograd keeps the gathered [N, D] rows)."""
    gathered = o.prototypes.view(-1, o.prototypes.shape[-1])[o.target.clamp_min(0)]
    return torch.where(o.target >= 0, (o.x_hat * gathered).sum(1), 0.0).sum()


@torch.no_grad()
def naive_sinkhorn(o: OpInputs, config: HeadConfig) -> Tensor:
    index = torch.full_like(o.labels, -1)
    for k in range(o.prototypes.shape[0]):
        c_k = o.x_hat[o.labels == k]
        if c_k.shape[0] == 0:
            continue
        _, indexs = matrix_sinkhorn(c_k @ o.prototypes[k].t(), config.iterations, config.epsilon, "argmax")
        index[o.labels == k] = indexs
    return index


@torch.no_grad()
def naive_update(o: OpInputs, config: HeadConfig) -> Tensor:
    protos = o.prototypes.clone()
    per_class = protos.shape[1]
    for k in range(protos.shape[0]):
        indexs = o.index[o.labels == k]
        if indexs.shape[0] == 0:
            continue
        q = F.one_hot(indexs, num_classes=per_class).to(protos.dtype)
        update_class_prototypes(protos, k, q, o.correct[o.labels == k], o.x_hat[o.labels == k], config.momentum)
    return l2_normalize(protos)


# ---- fused (protoseg_kernels) -----------------------------------------------
def fused_class_scores(o: OpInputs) -> Tensor:
    return pk.class_scores(o.x_hat, o.prototypes, normalize=False)


def fused_ppc_ppd(o: OpInputs) -> Tensor:
    ppc, ppd = pk.ppc_ppd_loss(o.x_hat, o.prototypes, o.target, normalize=False, validate=False)
    return ppc + ppd


def fused_target_similarity(o: OpInputs) -> Tensor:
    return pk.target_similarity(o.x_hat, o.prototypes, o.target, normalize=False, validate=False).sum()


def fused_sinkhorn(o: OpInputs, config: HeadConfig) -> Tensor:
    return pk.sinkhorn_assign(
        o.x_hat.detach(), o.prototypes, o.labels, normalize=False, epsilon=config.epsilon,
        iterations=config.iterations, validate=False,
    ).index


def fused_update(o: OpInputs, config: HeadConfig) -> Tensor:
    return pk.update_prototypes(
        o.prototypes, o.x_hat.detach(), o.labels, o.index, mask=o.correct,
        momentum=config.momentum, normalize=False, validate=False,
    ).prototypes


NAIVE = {
    "class_scores": naive_class_scores,
    "ppc_ppd_loss": naive_ppc_ppd,
    "target_similarity": naive_target_similarity,
    "sinkhorn_assign": naive_sinkhorn,
    "update_prototypes": naive_update,
}
FUSED = {
    "class_scores": fused_class_scores,
    "ppc_ppd_loss": fused_ppc_ppd,
    "target_similarity": fused_target_similarity,
    "sinkhorn_assign": fused_sinkhorn,
    "update_prototypes": fused_update,
}


def op_modes(op: str) -> tuple[str, ...]:
    return GRAD_MODES if op in GRAD_OPS else ("fwd",)


def forward_fn(op: str, naive: bool, config: HeadConfig) -> Callable[[OpInputs], Tensor]:
    fn = (NAIVE if naive else FUSED)[op]
    if op in NO_GRAD_OPS:
        return lambda o: fn(o, config)
    return fn


def backward(op: str, o: OpInputs, out: Tensor) -> None:
    """Backward of a gradient op's output (the upstream gradient is fixed)."""
    grad = o.grad_scores if op == "class_scores" else None
    torch.autograd.backward(out, grad)
