"""target_similarity and ppc_ppd_loss(..., lse=...): the 3-GEMM head of docs/spec.md §3.3/§7.

The op against its float64 reference and autograd through a plain gather; the
lse path of ppc_ppd_loss against the full ppc_ppd_loss and the literal formulas,
on ragged shapes, every reduction, ignored and all-ignored targets, both
gradients; determinism, registration (opcheck) and torch.compile(fullgraph=True).
"""

from __future__ import annotations

import literal
import pytest
import torch
import torch.nn.functional as F
from conformance import _tolerance, plain_ppc_ppd
from conftest import fused_shapes, require_backend
from helpers import (
    RAGGED_SHAPES,
    SMALL_SHAPES,
    assert_bitwise_equal,
    assert_close,
    make_case,
    relative_error,
)

import protoseg_kernels as pk
from protoseg_kernels.reference.target_similarity import target_similarity as reference_similarity
from protoseg_kernels.target_similarity import ROW_BLOCKS

F64 = torch.float64
ops = torch.ops.protoseg


def _grads(out: torch.Tensor, inputs, seed: int = 0):
    upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=F64).to(out.dtype)
    return torch.autograd.grad(out, inputs, upstream, allow_unused=True)


def _leaves(case, dtype=F64):
    return case.x.to(dtype).requires_grad_(), case.prototypes.to(dtype).requires_grad_()


@pytest.mark.parametrize("shape", RAGGED_SHAPES + [(ROW_BLOCKS + 3, 5, 2, 2), (1, 3, 1, 1)], ids=str)
@pytest.mark.parametrize("normalize", [True, False])
def test_matches_reference_and_its_autograd(shape, normalize):
    case = make_case(*shape, seed=sum(shape))
    x, p = _leaves(case)
    xr, pr = _leaves(case)
    ours = pk.target_similarity(x, p, case.target, normalize=normalize)
    ref = reference_similarity(xr, pr, case.target, normalize)
    assert ours.dtype == F64
    assert_close(ours, ref, 1e-12, "s")
    assert bool((ours[case.target < 0] == 0).all())
    for got, want, name in zip(_grads(ours, (x, p)), _grads(ref, (xr, pr)), ("dx", "dP")):
        assert_close(got, want, 1e-12, name)


def test_reference_is_the_literal_cosine():
    case = make_case(*SMALL_SHAPES[0], seed=4)
    flat = F.normalize(case.prototypes, dim=-1).reshape(-1, case.x.shape[1])
    expected = (F.normalize(case.x, dim=1) * flat[case.target.clamp_min(0)]).sum(1)
    expected = torch.where(case.target >= 0, expected, 0.0)
    assert_close(reference_similarity(case.x, case.prototypes, case.target, True), expected, 1e-14)


def test_norm_below_the_clamp_uses_the_other_gradient_branch():
    case = make_case(40, 9, 3, 2, seed=5)
    x0 = case.x.clone()
    x0[0] *= 1e-14  # below F.normalize's ε: the clamp is constant there
    x, xr = x0.clone().requires_grad_(), x0.clone().requires_grad_()
    ours = pk.target_similarity(x, case.prototypes, case.target)
    ref = reference_similarity(xr, case.prototypes, case.target, True)
    assert_close(_grads(ours, (x,))[0], _grads(ref, (xr,))[0], 1e-12, "dx")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_low_precision_inputs_compute_in_fp32(dtype):
    case = make_case(*RAGGED_SHAPES[0], seed=6)
    x, p = case.x.to(dtype).requires_grad_(), case.prototypes.to(dtype).requires_grad_()
    ours = pk.target_similarity(x, p, case.target)
    assert ours.dtype == torch.float32
    # The reference on the same (rounded) inputs, in float64.
    xr, pr = x.detach().double().requires_grad_(), p.detach().double().requires_grad_()
    ref = reference_similarity(xr, pr, case.target, True)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert_close(ours, ref, 1e-5, "s")
    dx, dp = _grads(ours, (x, p))
    assert dx.dtype == dtype and dp.dtype == dtype
    for got, want, name in zip((dx, dp), _grads(ref, (xr, pr)), ("dx", "dP")):
        assert_close(got, want, tol, name)


@pytest.mark.parametrize("normalize", [True, False])
def test_gradcheck(normalize):
    case = make_case(*SMALL_SHAPES[0], seed=7)
    x, p = _leaves(case)
    assert torch.autograd.gradcheck(
        lambda x, p: pk.target_similarity(x, p, case.target, normalize=normalize), (x, p)
    )


def test_prototype_gradient_is_deterministic():
    case = make_case(*RAGGED_SHAPES[0], dtype=torch.float32, seed=8)

    def run():
        x, p = _leaves(case, torch.float32)
        s = pk.target_similarity(x, p, case.target)
        return (s, *_grads(s, (x, p)))

    for a, b in zip(run(), run()):
        assert_bitwise_equal(a, b)


def test_no_prototype_gradient_unless_required():
    case = make_case(*SMALL_SHAPES[0], seed=9)
    x = case.x.clone().requires_grad_()
    s = pk.target_similarity(x, case.prototypes, case.target)
    s.sum().backward()
    assert case.prototypes.grad is None and x.grad is not None


def test_validation_and_ignore_index():
    case = make_case(*SMALL_SHAPES[0], seed=10)
    bad = case.target.clone()
    bad[3] = case.prototypes.shape[0] * case.prototypes.shape[1]
    with pytest.raises(ValueError, match="target_similarity: target must hold flat prototype indices"):
        pk.target_similarity(case.x, case.prototypes, bad)
    lenient = pk.target_similarity(case.x, case.prototypes, bad, validate=False)
    assert lenient[3] == 0
    custom = torch.where(case.target < 0, 5, case.target)  # 5 marks ignored, though a valid prototype
    out = pk.target_similarity(case.x, case.prototypes, custom, ignore_index=5)
    assert bool((out[custom == 5] == 0).all())
    with pytest.raises(TypeError, match="target_similarity: target must be an integer tensor"):
        pk.target_similarity(case.x, case.prototypes, case.target.float())
    with pytest.raises(ValueError, match="target_similarity: prototypes must have the embedding size"):
        pk.target_similarity(case.x, case.prototypes[..., :-1], case.target)


def test_opcheck():
    case = make_case(37, 9, 4, 3, dtype=torch.float32, seed=11)
    x, p = _leaves(case, torch.float32)
    grad = torch.randn(37)
    for normalize in (True, False):
        torch.library.opcheck(ops.target_similarity.default, (x, p, case.target, normalize, -1, True))
        for need_p in (True, False):
            torch.library.opcheck(ops.target_similarity_backward.default,  # backward of backward: none
                                  (grad, x.detach(), p.detach(), case.target, normalize, -1, need_p))


# ----------------------------------------------------------------------------- ppc_ppd_loss(lse=...)


def _lse_losses(x, p, target, temperature, reduction, normalize=True, **kw):
    _, lse = pk.class_scores(x, p, normalize=normalize, lse_temperature=temperature)
    return pk.ppc_ppd_loss(x, p, target, lse=lse, normalize=normalize, temperature=temperature,
                           reduction=reduction, **kw)


def _loss_and_grads(fn, case, dtype=F64, **kw):
    x, p = _leaves(case, dtype)
    ppc, ppd = fn(x, p, case.target, **kw)
    dx, dp = torch.autograd.grad(ppc.double().sum() + 0.3 * ppd.double().sum(), (x, p))
    return ppc.detach(), ppd.detach(), dx, dp


@pytest.mark.parametrize("shape", RAGGED_SHAPES, ids=str)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("temperature", [1.0, 0.1])
def test_lse_path_matches_full_loss_and_literal(shape, reduction, temperature, reference_backend):
    case = make_case(*shape, seed=12 + shape[0])
    ours = _loss_and_grads(_lse_losses, case, temperature=temperature, reduction=reduction)
    full = _loss_and_grads(pk.ppc_ppd_loss, case, temperature=temperature, reduction=reduction)
    for got, want, name in zip(ours, full, ("ppc", "ppd", "dx", "dP")):
        assert_close(got, want, 1e-12, name)
    ppc_ref, ppd_ref = literal.ppc_ppd(literal.similarity(case.x, case.prototypes), case.target, temperature, -1)
    if reduction != "none":
        count = 1 if reduction == "sum" else max(int((case.target >= 0).sum()), 1)
        ppc_ref, ppd_ref = ppc_ref.sum() / count, ppd_ref.sum() / count
    assert_close(ours[0], ppc_ref, 1e-10, "ppc vs literal")
    assert_close(ours[1], ppd_ref, 1e-10, "ppd vs literal")


def test_lse_path_unnormalized_and_custom_ignore_index(reference_backend):
    case = make_case(*SMALL_SHAPES[0], seed=13)
    case.x = case.x * 0.3
    case.target = torch.where(case.target < 0, 7, case.target)  # 7 marks ignored pixels
    kw = {"temperature": 2.0, "reduction": "none", "normalize": False, "ignore_index": 7}
    ours = _loss_and_grads(_lse_losses, case, **kw)
    full = _loss_and_grads(pk.ppc_ppd_loss, case, **kw)
    for got, want, name in zip(ours, full, ("ppc", "ppd", "dx", "dP")):
        assert_close(got, want, 1e-12, name)
    assert bool((ours[0][case.target == 7] == 0).all())


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("n", [0, 17])
def test_lse_path_all_ignored_gives_zero_loss_and_zero_gradient(reduction, n, reference_backend):
    x = torch.randn(n, 6, requires_grad=True)
    p = torch.randn(3, 2, 6, requires_grad=True)
    ppc, ppd = _lse_losses(x, p, torch.full((n,), -1), 1.0, reduction)
    assert bool((ppc == 0).all()) and bool((ppd == 0).all())
    (ppc.sum() + ppd.sum()).backward()
    assert bool((x.grad == 0).all()) and bool((p.grad == 0).all())


def test_lse_path_gradcheck(reference_backend):
    case = make_case(*SMALL_SHAPES[0], seed=14)
    x, p = _leaves(case)
    x, p = x.detach()[:25].requires_grad_(), p
    assert torch.autograd.gradcheck(
        lambda x, p: tuple(_lse_losses(x, p, case.target[:25], 0.5, "none")), (x, p)
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_lse_path_on_fused_backends(fused_backend, dtype):
    low_precision = dtype in (torch.float16, torch.bfloat16)
    for i, shape in enumerate(fused_shapes(fused_backend)):
        case = make_case(*shape, seed=40 + i)
        with pk.use_backend(fused_backend):
            ours = _loss_and_grads(_lse_losses, case, dtype, temperature=0.1, reduction="none")
        with pk.use_backend("reference"):
            ref = _loss_and_grads(pk.ppc_ppd_loss, case, F64, temperature=0.1, reduction="none")
        plain = _loss_and_grads(lambda x, p, t: plain_ppc_ppd(x, p, t, True, 0.1), case, dtype) \
            if low_precision else (None,) * 4
        for got, want, same_dtype, name in zip(ours, ref, plain, ("ppc", "ppd", "dx", "dP")):
            bar = _tolerance(dtype, None if same_dtype is None else relative_error(same_dtype, want))
            assert_close(got, want, bar, f"{name} {shape}")


def test_lse_path_is_deterministic(fused_backend):
    case = make_case(*fused_shapes(fused_backend)[0], dtype=torch.float32, seed=15)
    with pk.use_backend(fused_backend):
        first = _loss_and_grads(_lse_losses, case, torch.float32, temperature=0.1, reduction="mean")
        second = _loss_and_grads(_lse_losses, case, torch.float32, temperature=0.1, reduction="mean")
    for a, b in zip(first, second):
        assert_bitwise_equal(a, b)


def test_lse_is_validated(reference_backend):
    case = make_case(*SMALL_SHAPES[0], dtype=torch.float32, seed=16)
    _, lse = pk.class_scores(case.x, case.prototypes, lse_temperature=1.0)
    with pytest.raises(ValueError, match=r"ppc_ppd_loss: lse must have shape \[N\] = \(67,\), got shape \(66,\)"):
        pk.ppc_ppd_loss(case.x, case.prototypes, case.target, lse=lse[1:])
    with pytest.raises(TypeError, match="ppc_ppd_loss: lse must have dtype torch.float32"):
        pk.ppc_ppd_loss(case.x, case.prototypes, case.target, lse=lse.double())
    with pytest.raises(TypeError, match="ppc_ppd_loss: lse must have dtype torch.float32"):
        pk.ppc_ppd_loss(case.x.half(), case.prototypes, case.target, lse=lse.half())
    with pytest.raises(ValueError, match="ppc_ppd_loss: lse must be on the same device as x"):
        pk.ppc_ppd_loss(case.x, case.prototypes, case.target, lse=lse.to("meta"))
    with pytest.raises(TypeError, match="ppc_ppd_loss: lse must be a torch.Tensor"):
        pk.ppc_ppd_loss(case.x, case.prototypes, case.target, lse=[1.0] * 67)
    with pytest.raises(ValueError, match="target must hold flat prototype indices"):
        pk.ppc_ppd_loss(case.x, case.prototypes, case.target + 1000, lse=lse)


def _head(x, prototypes, target):
    """The 3-GEMM head: scores and lse from one pass, PPC/PPD from the gathered target."""
    scores, lse = pk.class_scores(x, prototypes, lse_temperature=0.1)
    ppc, ppd = pk.ppc_ppd_loss(x, prototypes, target, lse=lse, temperature=0.1, validate=False)
    return scores.logsumexp(dim=1).mean() + ppc + ppd


@pytest.mark.parametrize("backend", ("reference", "cpu"))
def test_torch_compile_fullgraph(backend):
    if backend != "reference":
        require_backend(backend)
    case = make_case(150, 16, 5, 4, dtype=torch.float32, seed=17)
    with pk.use_backend(backend):
        compiled = torch.compile(_head, fullgraph=True)
        got = _loss_and_grads(lambda x, p, t: (compiled(x, p, t), torch.zeros(())), case, torch.float32)
        want = _loss_and_grads(lambda x, p, t: (_head(x, p, t), torch.zeros(())), case, torch.float32)
    for a, b, name in zip(got, want, ("loss", "_", "dx", "dP")):
        assert_close(a, b, 1e-6, name)
