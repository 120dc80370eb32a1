"""The kernel contract: what each kernel of a backend computes.

The public ops (one module each in this package) validate arguments, register
with ``torch.library`` and own autograd; a backend only supplies kernels. Which
kernels belong to which op is the op table, :mod:`protoseg_kernels._op_table`; a
backend implements an op by supplying all of that op's kernels below, and declares
so in ``IMPLEMENTED``. Conventions shared by all of them:

* ``x`` is [N, D], ``prototypes`` is [C, K, D], both of the same floating dtype
  and device. ``normalize=True`` means x̂ = x / max(‖x‖, 1e-12) row-wise and the
  same per prototype; ``False`` uses the raw vectors.
* Accumulation is in the *compute dtype*: float64 for float64 inputs, float32
  otherwise. Similarity-shaped outputs (S, scores) are in the input dtype;
  losses, log-sum-exps, Sinkhorn logits and sums are in the compute dtype.
* Index arguments arrive sanitised (:func:`protoseg_kernels._checks.sanitize_index`):
  int64, either -1 (ignored) or a valid index. Kernels must still never address
  memory with a negative index.
* Backward kernels receive ``None`` for an output gradient that autograd did not
  produce, and return ``None`` for ``d_prototypes`` when ``need_prototype_grad``
  is False.
* Results are deterministic: the same inputs give bitwise the same outputs.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import Tensor

from ._op_table import Implemented


class KernelBackend(Protocol):
    # The ops it has all the kernels of, with their input dtypes (and the ops it lacks
    # some kernels of): read by backend selection, the env report and the tests.
    IMPLEMENTED: Implemented

    def unavailable_reason(self) -> str | None: ...

    def device_reason(self, device: torch.device) -> str | None: ...

    # ---- prototype_similarity ------------------------------------------------
    def similarity_forward(self, x: Tensor, prototypes: Tensor, normalize: bool) -> Tensor:
        """S [N, C, K] = ⟨x̂_i, P̂_ck⟩ in the input dtype."""

    def similarity_backward(
        self, grad: Tensor, x: Tensor, prototypes: Tensor, normalize: bool,
        need_prototype_grad: bool,
    ) -> tuple[Tensor, Tensor | None]:
        """dx̂ = dS·P̂, dP̂ = dSᵀ·x̂, then through the normalisation (if any)."""

    # ---- class_scores --------------------------------------------------------
    def class_scores_forward(
        self, x: Tensor, prototypes: Tensor, normalize: bool, reduction: str,
        temperature: float, lse_temperature: float | None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """(scores [N, C] input dtype, index [N, C] int64 first argmax over K,
        lse [N] compute dtype = log Σ_j exp(S_ij/τ') over all C·K, or an empty
        tensor when ``lse_temperature`` is None).

        ``reduction="max"``: scores = max_k S; ``"logsumexp"``: τ·log Σ_k exp(S/τ).
        """

    def class_scores_backward(
        self, grad_scores: Tensor | None, grad_lse: Tensor | None, x: Tensor,
        prototypes: Tensor, index: Tensor, lse: Tensor, normalize: bool, reduction: str,
        temperature: float, lse_temperature: float | None, need_prototype_grad: bool,
    ) -> tuple[Tensor, Tensor | None]:
        """dS_ick = g_ic·[k = index_ic] (max) or g_ic·softmax_k(S_ic/τ) (logsumexp),
        plus g_lse_i·softmax_j(S_i/τ')/τ'; then as similarity_backward."""

    # ---- ppc_ppd_loss --------------------------------------------------------
    def ppc_ppd_forward(
        self, x: Tensor, prototypes: Tensor, target: Tensor, normalize: bool,
        temperature: float,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Per pixel (ppc [N], ppd [N], lse [N]), compute dtype, with
        lse_i = log Σ_j exp(S_ij/τ), ppc_i = lse_i − S_it/τ, ppd_i = (1 − S_it)²;
        ppc = ppd = 0 where target is -1 (lse is unspecified there)."""

    def ppc_ppd_backward(
        self, grad_ppc: Tensor | None, grad_ppd: Tensor | None, x: Tensor,
        prototypes: Tensor, target: Tensor, lse: Tensor, normalize: bool,
        temperature: float, need_prototype_grad: bool,
    ) -> tuple[Tensor, Tensor | None]:
        """dS_ij = g_ppc_i·(softmax_j(S_i/τ) − [j = t_i])/τ − 2·g_ppd_i·(1 − S_it)·[j = t_i]
        on valid pixels (0 elsewhere); then as similarity_backward."""

    # ---- sinkhorn_assign (the β recurrence, orchestrated by sinkhorn_assign.py)
    def sinkhorn_logits(
        self, x: Tensor, prototypes: Tensor, segment: Tensor, normalize: bool, epsilon: float,
    ) -> Tensor:
        """L [N, K] compute dtype: S[i, segment_i, :]/ε, zero rows where segment is -1."""

    def sinkhorn_class_logsumexp(
        self, logits: Tensor, segment: Tensor, num_classes: int,
    ) -> tuple[Tensor, Tensor]:
        """Per class c and prototype k over the pixels of c: (m [C, K] = max_i L_ik,
        -inf for an empty class; s [C, K] = Σ_i exp(L_ik − m_ck), 0 for an empty class)."""

    def sinkhorn_marginals(self, logits: Tensor, segment: Tensor, beta: Tensor) -> Tensor:
        """u [C, K] = Σ_{i in c} softmax_k(L_i + β_c)."""

    def sinkhorn_finalize(
        self, logits: Tensor, segment: Tensor, beta: Tensor, return_q: bool,
    ) -> tuple[Tensor, Tensor]:
        """(index [N] int64 = first argmax_k (L_i + β_c), -1 where segment is -1;
        q [N, K] = softmax_k(L_i + β_c), zero rows where ignored, or an empty
        tensor when ``return_q`` is False)."""

    # ---- update_prototypes ---------------------------------------------------
    def prototype_sums(
        self, x: Tensor, key: Tensor, num_prototypes: int, normalize: bool,
    ) -> tuple[Tensor, Tensor]:
        """(sums [C·K, D] compute dtype = Σ_{i: key_i = j} x̂_i, counts [C·K] int64),
        skipping key -1, in a fixed summation order."""

    def momentum_update(
        self, prototypes: Tensor, sums: Tensor, counts: Tensor, momentum: float,
        normalize: bool,
    ) -> Tensor:
        """New [C, K, D] in prototypes' dtype: normalize(γ·P̂ + (1−γ)·normalize(s))
        where count > 0, else P̂ (P̂ = P when ``normalize`` is False)."""
