"""A deliberately wrong backend for test_conformance_harness.py: the reference with
one kernel perturbed (chosen by ``BREAK``), to show the conformance checks fail."""

from __future__ import annotations

import torch

from protoseg_kernels import reference
from protoseg_kernels.reference import *  # noqa: F401,F403  (every other kernel unchanged)

BREAK = ""


def unavailable_reason() -> str | None:
    return None


def device_reason(device: torch.device) -> str | None:
    return None


def class_scores_forward(x, prototypes, normalize, reduction, temperature, lse_temperature):
    scores, index, lse = reference.class_scores_forward(x, prototypes, normalize, reduction, temperature,
                                                        lse_temperature)
    if BREAK == "scores":
        scores = scores * (1 + 1e-4)
    if BREAK == "unwritten":
        scores = scores.clone()
        scores[-1, -1] = torch.empty(1, dtype=scores.dtype)[0]  # poisoned memory left unwritten
    return scores, index, lse


def class_scores_backward(*args):
    grad_x, grad_p = reference.class_scores_backward(*args)
    if BREAK == "grad":
        grad_x = grad_x + 1e-3 * grad_x.roll(1, 0)
    return grad_x, grad_p


def sinkhorn_finalize(logits, segment, beta, return_q):
    index, q = reference.sinkhorn_finalize(logits, segment, beta, return_q)
    if BREAK == "index":
        index = torch.where(index > 0, index - 1, index)
    return index, q


def momentum_update(prototypes, sums, counts, momentum, normalize):
    new = reference.momentum_update(prototypes, sums, counts, momentum, normalize)
    return new.flip(0) if BREAK == "update" else new
