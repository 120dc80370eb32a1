"""torch.library registration: opcheck on every op (and backward op), and
torch.compile(fullgraph=True) of a head step chaining the ops (docs/spec.md §4)."""

from __future__ import annotations

import pytest
import torch
from conftest import FUSED_CPU_BACKENDS, require_backend
from helpers import assert_close, make_case

import protoseg_kernels as pk

ops = torch.ops.protoseg


def _case():
    return make_case(37, 9, 4, 3, dtype=torch.float32, seed=3)


def _forward_cases(backend: str):
    c = _case()
    x = c.x.clone().requires_grad_()
    p = c.prototypes.clone().requires_grad_()
    return [
        (ops.prototype_similarity.default, (x, p, True, backend)),
        (ops.class_scores.default, (x, p, True, "max", 1.0, None, backend)),
        (ops.class_scores.default, (x, p, False, "logsumexp", 0.5, 0.1, backend)),
        (ops.ppc_ppd_loss.default, (x, p, c.target, True, 0.1, -1, True, backend)),
        (ops.sinkhorn_assign.default, (c.x, c.prototypes, c.labels, True, 0.05, 3, -1, True, True, backend)),
        (ops.sinkhorn_assign.default, (c.x, c.prototypes, c.labels, True, 0.05, 0, -1, False, False, backend)),
        (ops.update_prototypes.default, (c.prototypes, c.x, c.labels, c.index, None, 0.9, True, -1, True, backend)),
        (ops.update_prototypes.default,
         (c.prototypes, c.x, c.labels, c.index, c.labels >= 1, 0.9, False, -1, True, backend)),
    ]


def _backward_cases(backend: str):
    c = _case()
    n, (cc, k, _) = c.x.shape[0], c.prototypes.shape
    scores, index, lse = ops.class_scores(c.x, c.prototypes, True, "max", 1.0, 0.2, backend)
    ppc, ppd, lse_ppc = ops.ppc_ppd_loss(c.x, c.prototypes, c.target, True, 0.1, -1, True, backend)
    return [
        (ops.prototype_similarity_backward.default, (torch.randn(n, cc, k), c.x, c.prototypes, True, True, backend)),
        (ops.class_scores_backward.default,
         (torch.randn(n, cc), torch.randn(n), c.x, c.prototypes, index, lse, True, "max", 1.0, 0.2, True, backend)),
        (ops.class_scores_backward.default,
         (torch.randn(n, cc), None, c.x, c.prototypes, index, lse, True, "max", 1.0, 0.2, False, backend)),
        (ops.ppc_ppd_loss_backward.default,
         (torch.randn(n), torch.randn(n), c.x, c.prototypes, c.target, lse_ppc, True, 0.1, -1, True, backend)),
    ]


@pytest.mark.parametrize("backend", ("reference",) + FUSED_CPU_BACKENDS)
def test_opcheck_every_op(backend):
    if backend != "reference":
        require_backend(backend)
    for op, args in _forward_cases(backend) + _backward_cases(backend):
        torch.library.opcheck(op, args)


def head_step(x, prototypes, labels):
    """A ProtoSeg-style step: class scores with the PPC normaliser, Sinkhorn,
    prototype update and the losses."""
    k = prototypes.shape[1]
    out = pk.class_scores(x, prototypes, return_index=True, lse_temperature=0.1)
    assignment = pk.sinkhorn_assign(x, prototypes, labels)
    target = torch.where(labels >= 0, labels * k + assignment.index.clamp_min(0), -1)
    predicted = out.scores.argmax(dim=1)
    update = pk.update_prototypes(prototypes, x, labels, assignment.index, mask=predicted == labels, momentum=0.9)
    ppc, ppd = pk.ppc_ppd_loss(x, prototypes, target, temperature=0.1)
    loss = out.scores.logsumexp(dim=1).mean() + out.lse.mean() + ppc + ppd
    return loss, update.prototypes, assignment.index


@pytest.mark.parametrize("backend", ("reference", "cpu"))
def test_torch_compile_fullgraph_head_step(backend):
    if backend != "reference":
        require_backend(backend)
    c = make_case(150, 16, 5, 4, dtype=torch.float32, seed=9)
    with pk.use_backend(backend):
        compiled = torch.compile(head_step, fullgraph=True)
        x1 = c.x.clone().requires_grad_()
        loss_c, protos_c, index_c = compiled(x1, c.prototypes, c.labels)
        loss_c.backward()
        x2 = c.x.clone().requires_grad_()
        loss_e, protos_e, index_e = head_step(x2, c.prototypes, c.labels)
        loss_e.backward()
    assert torch.equal(index_c, index_e)
    assert_close(loss_c, loss_e, 1e-6, "loss")
    assert_close(protos_c, protos_e, 1e-6, "prototypes")
    assert_close(x1.grad, x2.grad, 1e-6, "dx")
