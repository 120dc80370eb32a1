"""``sinkhorn_assign``: online clustering of each class's pixels onto its K
prototypes, all classes at once (docs/spec.md §3.4).

For class c with pixels I_c and logits L_i = S[i, c, :]/ε, the matrix
Sinkhorn-Knopp of the original code equals the per-class offset recurrence

    β⁽¹⁾_ck   = −log Σ_{i∈I_c} exp(L_ik)
    β⁽ᵗ⁺¹⁾_ck = β⁽ᵗ⁾_ck − log Σ_{i∈I_c} softmax(L_i + β⁽ᵗ⁾_c)_k
    Q_i       = softmax(L_i + β⁽ᵀ⁾_c)

so each iteration is one streaming pass over [N, K] logits with a segmented
reduction into [C, K]. The logits are computed once (N·K·D work: each pixel
against its own class's prototypes only). With ``process_group`` the [C, K]
sums are all-reduced after each pass. Computed in fp32 (fp64 for fp64 inputs)
in the log domain. ``iterations=0`` gives Q = softmax(L_i) and the plain argmax.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any, NamedTuple

import torch
from torch import Tensor

from ._backend import get_backend, resolve_backend
from ._checks import (
    IGNORE_INDEX,
    check_bool,
    check_features_and_prototypes,
    check_index_range,
    check_index_tensor,
    check_int,
    check_positive_finite,
    sanitize_index,
)
from ._distributed import NO_GROUP, Reducer, group_name, merge_logsumexp
from ._op_utils import compute_dtype

OP = "sinkhorn_assign"


class SinkhornResult(NamedTuple):
    index: Tensor
    q: Tensor | None


def run_sinkhorn(
    kernels: ModuleType, x: Tensor, prototypes: Tensor, labels: Tensor, normalize: bool,
    epsilon: float, iterations: int, ignore_index: int, return_q: bool, validate: bool,
    reducer: Reducer,
) -> tuple[Tensor, Tensor]:
    """The β recurrence on backend ``kernels``; returns (index, q or empty)."""
    num_classes = prototypes.shape[0]
    if validate:
        # collective under a group: every rank raises, before any rank all-reduces
        check_index_range(OP, "labels", labels, num_classes, ignore_index, "class indices", reducer.group)
    segment = sanitize_index(labels, num_classes, ignore_index)
    logits = kernels.sinkhorn_logits(x, prototypes, segment, normalize, epsilon)
    # An infinite logit (a ±inf similarity, or S/ε overflowing) has no meaningful assignment:
    # it becomes NaN, so it invalidates its class exactly as a NaN similarity does (docs/spec.md
    # §3, "Non-finite inputs"), on every backend alike. One pass over [N, K].
    logits = logits.masked_fill_(logits.isinf(), float("nan"))
    beta = logits.new_zeros(num_classes, prototypes.shape[1])
    if iterations >= 1:
        m, s = merge_logsumexp(reducer, *kernels.sinkhorn_class_logsumexp(logits, segment, num_classes))
        # s = 0 / u = 0: a (class, prototype) without pixels keeps β. A NaN (from a NaN
        # similarity of the class) must pass: `s > 0` would turn it into a silent 0.
        beta = torch.where(s == 0, 0.0, -(m + torch.log(s)))
        for _ in range(iterations - 1):
            u = reducer.sum(kernels.sinkhorn_marginals(logits, segment, beta))
            beta = torch.where(u == 0, beta, beta - torch.log(u))
    return kernels.sinkhorn_finalize(logits, segment, beta, return_q)


@torch.library.custom_op("protoseg::sinkhorn_assign", mutates_args=())
def _sinkhorn_op(
    x: Tensor, prototypes: Tensor, labels: Tensor, normalize: bool, epsilon: float,
    iterations: int, ignore_index: int, return_q: bool, validate: bool, backend: str,
    group: str = NO_GROUP,
) -> tuple[Tensor, Tensor]:
    # ``group``: the process group's name ("" for none); its all-reduces run in here.
    return run_sinkhorn(
        get_backend(backend), x, prototypes, labels, normalize, epsilon, iterations,
        ignore_index, return_q, validate, Reducer(group),
    )


@_sinkhorn_op.register_fake
def _(x, prototypes, labels, normalize, epsilon, iterations, ignore_index, return_q, validate,
      backend, group=NO_GROUP):
    n, k = x.shape[0], prototypes.shape[1]
    q = x.new_empty(n, k, dtype=compute_dtype(x.dtype)) if return_q else x.new_empty(0, dtype=compute_dtype(x.dtype))
    return x.new_empty(n, dtype=torch.int64), q


def sinkhorn_assign(
    x: Tensor,
    prototypes: Tensor,
    labels: Tensor,
    *,
    normalize: bool = True,
    epsilon: float = 0.05,
    iterations: int = 3,
    ignore_index: int = IGNORE_INDEX,
    return_q: bool = False,
    process_group: Any | None = None,
    validate: bool = True,
) -> SinkhornResult:
    """Assign each labelled pixel to one of its class's K prototypes by Sinkhorn-Knopp.

    Args:
        x: [N, D] pixel embeddings.
        prototypes: [C, K, D].
        labels: [N] integer class of each pixel, or ``ignore_index``.
        normalize: l2-normalise ``x`` and ``prototypes`` inside the op.
        epsilon: entropic regularisation ε > 0 (logits are S/ε).
        iterations: Sinkhorn iterations T >= 0 (0: argmax of the similarities).
        ignore_index: label of pixels to skip (index -1, zero q row).
        return_q: also return the soft assignment q [N, K].
        process_group: a ``torch.distributed`` group: the clustering then runs on
            the pixels of all its ranks (global equipartition); None: per process.
            Its all-reduces run inside the custom op (also under ``torch.compile``).
        validate: raise ``ValueError`` on labels outside [0, C) that are not
            ``ignore_index``; with ``False`` they are ignored. With ``process_group``
            the check is collective: every rank raises the same error, naming the rank
            the value was found on (one extra small all-reduce per call).

    Returns:
        ``SinkhornResult(index [N] int64, q [N, K] fp32/fp64 or None)``. No gradient.
    """
    x, prototypes = check_features_and_prototypes(OP, x, prototypes)
    labels = check_index_tensor(OP, "labels", labels, x.shape[0], x.device)
    normalize = check_bool(OP, "normalize", normalize)
    epsilon = check_positive_finite(OP, "epsilon", epsilon, x.dtype)
    iterations = check_int(OP, "iterations", iterations, minimum=0)
    ignore_index = check_int(OP, "ignore_index", ignore_index)
    return_q = check_bool(OP, "return_q", return_q)
    validate = check_bool(OP, "validate", validate)
    group = group_name(OP, process_group)
    x, prototypes = x.detach(), prototypes.detach()
    backend = resolve_backend(OP, x.device, x.dtype)
    index, q = _sinkhorn_op(
        x, prototypes, labels, normalize, epsilon, iterations, ignore_index, return_q, validate,
        backend, group,
    )
    return SinkhornResult(index, q if return_q else None)
