"""Backend conformance: run an op on a backend and on the float64 reference with
the same inputs and compare by the rules of docs/spec.md §5.

* fp32 (and fp64): relative error ≤ 1e-5.
* fp16 / bf16: relative error ≤ 2 × (error of the same computation done by plain
  PyTorch at that dtype) + 1e-6, at least the dtype's unit roundoff; the plain
  computations are the ``plain_*`` functions below.
* Indices agree except where the reference's top-two gap is within the tolerance.

Every op's test file calls these for each fused backend, forward and backward.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
import torch.nn.functional as F
from helpers import (
    F64,
    Case,
    assert_close,
    assert_index_match,
    max_abs_difference,
    relative_error,
    top2_gap,
)
from torch import Tensor

import protoseg_kernels as pk

FP32_TOL = 1e-5


def _tolerance(dtype: torch.dtype, plain_error: float | None) -> float:
    if dtype in (torch.float32, torch.float64) or plain_error is None:
        return FP32_TOL
    return max(2 * plain_error + 1e-6, torch.finfo(dtype).eps)


def _leaf(t: Tensor, dtype: torch.dtype, grad: bool = True) -> Tensor:
    return t.detach().to(dtype).requires_grad_(grad)


def _upstream(shape: tuple[int, ...], seed: int, device: torch.device) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=F64).to(device)


def _grads(outputs: list[Tensor], weights: list[Tensor], inputs: list[Tensor]) -> list[Tensor | None]:
    loss = sum((o.to(F64) * w).sum() for o, w in zip(outputs, weights))
    return list(torch.autograd.grad(loss, inputs, allow_unused=True))


def _compare_all(
    dtype: torch.dtype, outs: dict[str, Tensor], refs: dict[str, Tensor],
    plains: dict[str, Tensor] | None,
) -> None:
    for name, ref in refs.items():
        plain_error = None if plains is None else relative_error(plains[name], ref)
        assert_close(outs[name], ref, _tolerance(dtype, plain_error), name)


def _normalized(t: Tensor, normalize: bool) -> Tensor:
    return F.normalize(t, dim=-1) if normalize else t


def plain_similarity(x: Tensor, prototypes: Tensor, normalize: bool) -> Tensor:
    """Plain PyTorch at the inputs' dtype: [N, C·K]."""
    c, k, d = prototypes.shape
    return _normalized(x, normalize) @ _normalized(prototypes.reshape(c * k, d), normalize).T


# ---- prototype_similarity --------------------------------------------------------

def check_prototype_similarity(backend: str, case: Case, dtype: torch.dtype, normalize: bool = True) -> None:
    n, _, c, k = case.shape
    weight = _upstream((n, c, k), 1, case.x.device)

    def run(name: str, dt: torch.dtype):
        x, p = _leaf(case.x.to(dtype), dt), _leaf(case.prototypes.to(dtype), dt)
        with pk.use_backend(name):
            s = pk.prototype_similarity(x, p, normalize=normalize)
        return {"S": s, **dict(zip(("dx", "dP"), _grads([s], [weight], [x, p])))}

    refs = run("reference", F64)
    outs = run(backend, dtype)
    plains = None
    if dtype in (torch.float16, torch.bfloat16):
        x, p = _leaf(case.x, dtype), _leaf(case.prototypes, dtype)
        s = plain_similarity(x, p, normalize).reshape(n, c, k)
        plains = {"S": s, **dict(zip(("dx", "dP"), _grads([s], [weight], [x, p])))}
    _compare_all(dtype, outs, refs, plains)


# ---- class_scores ----------------------------------------------------------------

def plain_class_scores(
    x: Tensor, prototypes: Tensor, normalize: bool, reduction: str, temperature: float,
    lse_temperature: float | None,
) -> tuple[Tensor, Tensor | None, Tensor]:
    c, k, _ = prototypes.shape
    flat = plain_similarity(x, prototypes, normalize)
    s = flat.reshape(-1, c, k)
    if reduction == "max":
        scores = s.amax(-1)
    else:
        scores = temperature * torch.logsumexp(s / temperature, -1)
    lse = None if lse_temperature is None else torch.logsumexp(flat / lse_temperature, -1)
    return scores, lse, s


def check_class_scores(
    backend: str, case: Case, dtype: torch.dtype, *, reduction: str = "max",
    lse_temperature: float | None = None, normalize: bool = True, temperature: float = 0.5,
    prototype_grad: bool = True,
) -> None:
    n, _, c, _ = case.shape
    w_scores, w_lse = _upstream((n, c), 2, case.x.device), _upstream((n,), 3, case.x.device)

    def run(name: str, dt: torch.dtype):
        x = _leaf(case.x.to(dtype), dt)
        p = _leaf(case.prototypes.to(dtype), dt, prototype_grad)
        with pk.use_backend(name):
            out = pk.class_scores(
                x, p, normalize=normalize, reduction=reduction, temperature=temperature,
                return_index=True, lse_temperature=lse_temperature,
            )
        outputs, weights = [out.scores], [w_scores]
        result = {"scores": out.scores}
        if lse_temperature is not None:
            outputs.append(out.lse)
            weights.append(w_lse)
            result["lse"] = out.lse
        inputs = [x, p] if prototype_grad else [x]
        result.update(zip(("dx", "dP"), _grads(outputs, weights, inputs)))
        return result, out.index

    refs, ref_index = run("reference", F64)
    outs, index = run(backend, dtype)
    with pk.use_backend("reference"):
        s_ref = pk.prototype_similarity(case.x.to(dtype).to(F64), case.prototypes.to(dtype).to(F64),
                                        normalize=normalize)
    plains = None
    index_tol = FP32_TOL
    if dtype in (torch.float16, torch.bfloat16):
        x = _leaf(case.x, dtype)
        p = _leaf(case.prototypes, dtype, prototype_grad)
        scores, lse, s = plain_class_scores(x, p, normalize, reduction, temperature, lse_temperature)
        outputs, weights = [scores], [w_scores]
        plains = {"scores": scores}
        if lse is not None:
            outputs.append(lse)
            weights.append(w_lse)
            plains["lse"] = lse
        inputs = [x, p] if prototype_grad else [x]
        plains.update(zip(("dx", "dP"), _grads(outputs, weights, inputs)))
        index_tol = 2 * max_abs_difference(s, s_ref) + 1e-6
    assert index.dtype == torch.int64
    assert_index_match(index, ref_index, top2_gap(s_ref), index_tol)
    _compare_all(dtype, outs, refs, plains)


# ---- ppc_ppd_loss ----------------------------------------------------------------

def plain_ppc_ppd(x: Tensor, prototypes: Tensor, target: Tensor, normalize: bool, temperature: float):
    flat = plain_similarity(x, prototypes, normalize)
    valid = target >= 0
    st = flat.gather(1, target.clamp_min(0).unsqueeze(1)).squeeze(1)
    ppc = torch.where(valid, torch.logsumexp(flat / temperature, -1) - st / temperature, 0)
    ppd = torch.where(valid, (1 - st) ** 2, 0)
    return ppc, ppd


def check_ppc_ppd_loss(
    backend: str, case: Case, dtype: torch.dtype, *, temperature: float = 0.1,
    normalize: bool = True, prototype_grad: bool = True,
) -> None:
    n = case.shape[0]
    w_ppc, w_ppd = _upstream((n,), 4, case.x.device), _upstream((n,), 5, case.x.device)

    def run(name: str, dt: torch.dtype):
        x = _leaf(case.x.to(dtype), dt)
        p = _leaf(case.prototypes.to(dtype), dt, prototype_grad)
        with pk.use_backend(name):
            ppc, ppd = pk.ppc_ppd_loss(x, p, case.target, normalize=normalize,
                                       temperature=temperature, reduction="none")
        inputs = [x, p] if prototype_grad else [x]
        grads = _grads([ppc, ppd], [w_ppc, w_ppd], inputs)
        return {"ppc": ppc, "ppd": ppd, **dict(zip(("dx", "dP"), grads))}

    refs = run("reference", F64)
    outs = run(backend, dtype)
    plains = None
    if dtype in (torch.float16, torch.bfloat16):
        x = _leaf(case.x, dtype)
        p = _leaf(case.prototypes, dtype, prototype_grad)
        ppc, ppd = plain_ppc_ppd(x, p, case.target, normalize, temperature)
        inputs = [x, p] if prototype_grad else [x]
        grads = _grads([ppc, ppd], [w_ppc, w_ppd], inputs)
        plains = {"ppc": ppc, "ppd": ppd, **dict(zip(("dx", "dP"), grads))}
    for name in ("ppc", "ppd"):
        expected = torch.float64 if dtype == torch.float64 else torch.float32
        assert outs[name].dtype == expected, f"{name} dtype {outs[name].dtype}"
    _compare_all(dtype, outs, refs, plains)


# ---- sinkhorn_assign -------------------------------------------------------------

def check_sinkhorn_assign(
    backend: str, case: Case, dtype: torch.dtype, *, epsilon: float = 0.05, iterations: int = 3,
    normalize: bool = True,
) -> None:
    x, p = case.x.to(dtype), case.prototypes.to(dtype)
    kwargs = dict(normalize=normalize, epsilon=epsilon, iterations=iterations, return_q=True)
    with pk.use_backend("reference"):
        ref = pk.sinkhorn_assign(x.to(F64), p.to(F64), case.labels, **kwargs)
    with pk.use_backend(backend):
        out = pk.sinkhorn_assign(x, p, case.labels, **kwargs)
    tol = FP32_TOL
    if dtype in (torch.float16, torch.bfloat16):
        # Plain PyTorch at this dtype: similarities at the dtype, recurrence in fp32.
        plain_q = _plain_sinkhorn_q(x, p, case.labels, normalize, epsilon, iterations)
        tol = _tolerance(dtype, relative_error(plain_q, ref.q))
    assert out.index.dtype == torch.int64
    assert out.q.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert_close(out.q, ref.q, tol, "q")
    # argmax of q: near-ties (within the q tolerance scale) may flip.
    assert_index_match(out.index, ref.index, top2_gap(ref.q), tol * 4 + 1e-6, "index")


def _plain_sinkhorn_q(
    x: Tensor, prototypes: Tensor, labels: Tensor, normalize: bool, epsilon: float, iterations: int
) -> Tensor:
    """The reference recurrence fed with similarities computed at the inputs' dtype."""
    from protoseg_kernels import reference
    from protoseg_kernels._distributed import LOCAL
    from protoseg_kernels.sinkhorn_assign import run_sinkhorn

    def low_precision_logits(x, prototypes, segment, normalize, epsilon):
        c, k, _ = prototypes.shape
        s = plain_similarity(x, prototypes, normalize).float().reshape(-1, c, k)
        own = s.gather(1, segment.clamp_min(0).view(-1, 1, 1).expand(-1, 1, k)).squeeze(1)
        return torch.where((segment >= 0).unsqueeze(1), own / epsilon, 0.0)

    kernels = SimpleNamespace(
        sinkhorn_logits=low_precision_logits,
        sinkhorn_class_logsumexp=reference.sinkhorn_class_logsumexp,
        sinkhorn_marginals=reference.sinkhorn_marginals,
        sinkhorn_finalize=reference.sinkhorn_finalize,
    )
    return run_sinkhorn(kernels, x, prototypes, labels, normalize, epsilon, iterations, -1, True,
                        False, LOCAL)[1]


# ---- update_prototypes -----------------------------------------------------------

def check_update_prototypes(
    backend: str, case: Case, dtype: torch.dtype, *, momentum: float = 0.9, normalize: bool = True,
    with_mask: bool = True,
) -> None:
    x, p = case.x.to(dtype), case.prototypes.to(dtype)
    mask = None
    if with_mask:
        mask = (torch.rand(case.shape[0], generator=torch.Generator().manual_seed(6)) < 0.7).to(case.x.device)
    kwargs = dict(mask=mask, momentum=momentum, normalize=normalize)
    with pk.use_backend("reference"):
        ref = pk.update_prototypes(p.to(F64), x.to(F64), case.labels, case.index, **kwargs)
    with pk.use_backend(backend):
        out = pk.update_prototypes(p, x, case.labels, case.index, **kwargs)
    assert out.prototypes.dtype == dtype
    assert torch.equal(out.counts, ref.counts), "counts differ"
    tol = FP32_TOL
    if dtype in (torch.float16, torch.bfloat16):
        # Plain PyTorch at this dtype rounds the result to the dtype at least.
        tol = _tolerance(dtype, relative_error(ref.prototypes.to(dtype), ref.prototypes))
    assert_close(out.prototypes, ref.prototypes, tol, "prototypes")


# ---- pixel_contrast_loss ---------------------------------------------------------

def plain_pixel_contrast(
    anchors: Tensor, anchor_labels: Tensor, contrast: Tensor | None, contrast_labels: Tensor | None,
    normalize: bool, temperature: float, base_temperature: float, supcon: bool,
) -> Tensor:
    """Per-anchor loss by plain PyTorch at the inputs' dtype (dense logits and masks)."""
    in_batch = contrast is None
    c, z = (anchors, anchor_labels) if in_batch else (contrast, contrast_labels)
    a, c = _normalized(anchors, normalize), _normalized(c, normalize)
    logits = a @ c.T / temperature
    taking_part = (anchor_labels >= 0).unsqueeze(1) & (z >= 0).unsqueeze(0)
    if in_batch:
        taking_part &= ~torch.eye(len(anchor_labels), dtype=torch.bool, device=a.device)
    same = anchor_labels.unsqueeze(1) == z.unsqueeze(0)
    positive, negative = taking_part & same, taking_part & ~same
    row_max = logits.max(1, keepdim=True).values if logits.shape[1] else logits.new_zeros(len(logits), 1)
    shifted = logits - row_max.detach()
    e = torch.exp(shifted)
    if supcon:
        log_prob = shifted - torch.log((e * (positive | negative)).sum(1, keepdim=True))
    else:
        log_prob = shifted - torch.log(e + (e * negative).sum(1, keepdim=True))
    count = positive.sum(1)
    mean = torch.where(positive, log_prob, 0).sum(1) / count.clamp_min(1)
    return torch.where(count > 0, -(temperature / base_temperature) * mean, 0)


def check_pixel_contrast_loss(
    backend: str, case, dtype: torch.dtype, *, denominator: str = "contrastiveseg",
    normalize: bool = True, temperature: float = 0.1, base_temperature: float = 0.07,
    contrast_grad: bool = True,
) -> None:
    """``case`` is a tests/contrast_cases.py ContrastCase; compares the per-anchor loss, d
    anchors and (bank with ``contrast_grad``) d contrast with the float64 reference."""
    kw = dict(normalize=normalize, temperature=temperature, base_temperature=base_temperature,
              denominator=denominator)
    weight = _upstream((case.anchors.shape[0],), 8, case.anchors.device)
    bank = case.contrast is not None

    def leaves(dt: torch.dtype) -> list[Tensor]:
        out = [_leaf(case.anchors.to(dtype), dt)]
        if bank:
            out.append(_leaf(case.contrast.to(dtype), dt, contrast_grad))
        return out

    def named(loss: Tensor, inputs: list[Tensor]) -> dict[str, Tensor]:
        grads = _grads([loss], [weight], inputs if contrast_grad else inputs[:1])
        return {"loss": loss, **dict(zip(("d anchors", "d contrast"), grads))}

    def run(name: str, dt: torch.dtype) -> dict[str, Tensor]:
        inputs = leaves(dt)
        with pk.use_backend(name):
            loss = pk.pixel_contrast_loss(inputs[0], case.anchor_labels, inputs[1] if bank else None,
                                          case.contrast_labels, **kw, reduction="none")
        return named(loss, inputs)

    refs = run("reference", F64)
    outs = run(backend, dtype)
    plains = None
    if dtype in (torch.float16, torch.bfloat16):
        inputs = leaves(dtype)
        loss = plain_pixel_contrast(inputs[0], case.anchor_labels, inputs[1] if bank else None,
                                    case.contrast_labels, normalize, temperature, base_temperature,
                                    denominator == "supcon")
        plains = named(loss, inputs)
    expected = torch.float64 if dtype == torch.float64 else torch.float32
    assert outs["loss"].dtype == expected, f"loss dtype {outs['loss'].dtype}"
    assert outs["d anchors"].dtype == dtype
    _compare_all(dtype, outs, refs, plains)


# ---- tree_min_loss ---------------------------------------------------------------

def hierarchy_for(num_leaves: int) -> pk.Hierarchy:
    """Leaves in pairs under superclasses, the superclasses in pairs under roots: three
    levels (two for a single leaf)."""
    if num_leaves == 1:
        return pk.Hierarchy.flat(1)
    groups = [range(start, min(start + 2, num_leaves)) for start in range(0, num_leaves, 2)]
    supers, roots = num_leaves + len(groups), (len(groups) + 1) // 2
    parents = [num_leaves + leaf // 2 for leaf in range(num_leaves)]
    parents += [supers + g // 2 for g in range(len(groups))] + [-1] * roots
    return pk.Hierarchy(parents)


def check_tree_min_loss(backend: str, case: Case, dtype: torch.dtype, *, focal_gamma: float | None = 2.0,
                        image: bool = False) -> None:
    """Per-pixel loss and d logits against the float64 reference, on [N, V] logits (or, with
    ``image``, the same pixels as a [1, V, 1, N] map)."""
    n, _, c, _ = case.shape
    hierarchy = hierarchy_for(c)
    g = torch.Generator().manual_seed(12)
    z = (2 * torch.randn(n, hierarchy.num_nodes, generator=g, dtype=F64)).to(case.x.device)
    labels = case.labels
    if image:
        z, labels = z.t().reshape(1, hierarchy.num_nodes, 1, n), labels.reshape(1, 1, n)
    weights = _upstream(tuple(labels.shape), 13, case.x.device)

    def run(on: str, logits: Tensor) -> tuple[Tensor, Tensor]:
        leaf = _leaf(logits, logits.dtype)
        with pk.use_backend(on):
            loss = pk.tree_min_loss(leaf, labels, hierarchy, focal_gamma=focal_gamma, reduction="none")
        (grad,) = _grads([loss], [weights], [leaf])
        return loss, grad

    ref_loss, ref_grad = run("reference", z.to(dtype).to(F64))
    loss, grad = run(backend, z.to(dtype))
    assert grad.dtype == dtype and grad.shape == z.shape
    plain = None
    if dtype in (torch.float16, torch.bfloat16):
        plain = {"loss": ref_loss.float(), "d logits": ref_grad.to(dtype)}  # one rounding to the dtype
    _compare_all(dtype, {"loss": loss, "d logits": grad}, {"loss": ref_loss, "d logits": ref_grad}, plain)
