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

    # ---- pixel_contrast_loss (docs/spec.md §10.1) ------------------------------------
    # Rows are anchors [A, D], columns the contrast set [M, D] (the same tensor as the
    # anchors when ``in_batch``: then column i is never contrasted with row i). Labels
    # arrive sanitised: int64 class ids >= 0, or -1 for an entry that takes no part.
    # ℓ_ij = ⟨â_i, ĉ_j⟩/τ; P(i) = labelled j with z_j = y_i, N(i) = labelled j with
    # z_j ≠ y_i (both empty for an ignored anchor). A fused backend sweeps column tiles
    # per row tile keeping only the per-anchor scalars below (online max-shifted sums),
    # and recomputes ℓ in backward: nothing of size A·M is ever allocated.
    def pixel_contrast_forward(
        self, anchors: Tensor, anchor_labels: Tensor, contrast: Tensor, contrast_labels: Tensor,
        in_batch: bool, normalize: bool, temperature: float, base_temperature: float,
        supcon: bool,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(loss [A], positives [A] int64 = |P(i)|, log_norm [A], log_b [A] or empty), all
        but positives in the compute dtype; s = τ/τ_b.

        ``supcon=False`` (ContrastiveSeg): log_norm_i = log N_i = log Σ_{k∈N(i)} e^{ℓ_ik}
        (-inf when N(i) is empty), log_b_i = log Σ_{p∈P(i)} 1/(e^{ℓ_ip} + N_i) (-inf when
        P(i) is empty), loss_i = (s/|P(i)|)·Σ_p [log(e^{ℓ_ip} + N_i) − ℓ_ip]. Two sweeps:
        log N_i needs every negative before any positive's term can be taken.

        ``supcon=True``: log_norm_i = log Σ_{j∈P(i)∪N(i)} e^{ℓ_ij} (-inf when empty),
        loss_i = s·(log_norm_i − mean_{p∈P(i)} ℓ_ip), log_b empty. One sweep.

        loss_i = 0 where |P(i)| = 0 (ignored anchors included); log_norm and log_b are
        unspecified for ignored anchors. NaN in a taking-part entry gives NaN out."""

    def pixel_contrast_backward(
        self, grad_loss: Tensor, anchors: Tensor, anchor_labels: Tensor, contrast: Tensor,
        contrast_labels: Tensor, positives: Tensor, log_norm: Tensor, log_b: Tensor,
        in_batch: bool, normalize: bool, temperature: float, base_temperature: float,
        supcon: bool, need_contrast_grad: bool,
    ) -> tuple[Tensor, Tensor | None]:
        """(d anchors [A, D], d contrast [M, D] or None) in the inputs' dtype, for the
        upstream gradient grad_loss [A] (compute dtype) and the forward's statistics.

        With w_i = g_i·s/|P(i)| (0 where |P(i)| = 0), dℓ_ij is, for ContrastiveSeg,
        −w_i·sigmoid(log_norm_i − ℓ_ij) on P(i) and w_i·exp(ℓ_ij + log_b_i) on N(i); for
        SupCon, g_i·s·exp(ℓ_ij − log_norm_i) on P(i) ∪ N(i), minus w_i on P(i); 0 elsewhere.
        Every exponent is ≤ log |P(i)|: no overflow at small τ. Then d â = dℓ·ĉ/τ,
        d ĉ = dℓᵀ·â/τ (only when ``need_contrast_grad``), each through the normalisation.
        In-batch (``need_contrast_grad`` is then False) d anchors holds both roles of each
        anchor, dℓ·â/τ + dℓᵀ·â/τ, added in the compute dtype before the normalisation.
        The dℓᵀ products must come from a column sweep (or another fixed-order reduction),
        not float atomics."""

    # ---- tree_min_loss (docs/spec.md §11.1) ------------------------------------------
    # Logits z [B, V, P] arrive as a view of the caller's tensor, with any strides (the
    # [N, V] layout is [1, V, N] with node stride 1); a kernel reads them in place and never
    # copies them. Labels [B, P] int64 arrive sanitised: a leaf in [0, C) or -1 (ignored).
    # The tree is three small tables (protoseg_kernels/hierarchy.py): ancestors [V, L] (row v:
    # v and its ancestors), descendants [V, S] (row v: v and its descendants), both int64 in
    # ascending node order padded with -1, and node_weights [V] float64 (scale/|level(v)|).
    # A kernel treats a table entry outside [0, V) as padding and a label outside [0, V) as
    # ignored, so no call addresses memory out of bounds.
    def tree_min_forward(
        self, logits: Tensor, labels: Tensor, ancestors: Tensor, descendants: Tensor,
        node_weights: Tensor, focal_gamma: float, eps: float,
    ) -> Tensor:
        """loss [B, P] in the compute dtype: Σ_v w_v·t_iv for a labelled pixel, 0 for an
        ignored one, with MCL_v the min of z over row v of ``ancestors`` and MCM_v the max
        over row v of ``descendants`` (NaN wins both), p = σ(MCL_v), q = σ(MCM_v) and
        t_iv = −(1 − p)^γ·log(p + ε) when v is in row y_i of ``ancestors``, else
        −q^γ·log(1 − q + ε); 1 − σ(m) is computed as σ(−m). One read of the logits."""

    def tree_min_backward(
        self, grad_loss: Tensor, logits: Tensor, labels: Tensor, ancestors: Tensor,
        descendants: Tensor, node_weights: Tensor, focal_gamma: float, eps: float,
    ) -> Tensor:
        """d logits [B, V, P] in the logits' dtype (any strides; dense), for grad_loss
        [B, P] (compute dtype). Each node v of a labelled pixel adds g_i·w_v·∂t_iv to the
        first (smallest-index) arg-min of its MCL when positive, to the first arg-max of its
        MCM when negative: ∂t/∂MCL = p(1 − p)^γ·[γ·log(p + ε) − (1 − p)/(p + ε)],
        ∂t/∂MCM = q^γ(1 − q)·[q/(1 − q + ε) − γ·log(1 − q + ε)]. Every element is written
        (0 for ignored pixels) by the one writer that owns its pixel: no atomics. One read
        of the logits; nothing allocated but the gradient."""
