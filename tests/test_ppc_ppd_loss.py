"""ppc_ppd_loss: reference vs literal docs/spec.md §3.3, reductions, empty and all-ignored
batches, gradients, fused backends."""

from __future__ import annotations

import literal
import pytest
import torch
from conformance import check_ppc_ppd_loss
from conftest import fused_shapes
from helpers import RAGGED_SHAPES, SMALL_SHAPES, assert_bitwise_equal, assert_close, make_case

import protoseg_kernels as pk


@pytest.mark.parametrize("shape", RAGGED_SHAPES, ids=str)
@pytest.mark.parametrize("temperature", [1.0, 0.1])
def test_reference_matches_literal(shape, temperature, reference_backend):
    case = make_case(*shape)
    s = literal.similarity(case.x, case.prototypes)
    ppc_ref, ppd_ref = literal.ppc_ppd(s, case.target, temperature, -1)
    valid = int((case.target >= 0).sum())
    none = pk.ppc_ppd_loss(case.x, case.prototypes, case.target, temperature=temperature, reduction="none")
    assert_close(none.ppc, ppc_ref, 1e-10, "ppc")
    assert_close(none.ppd, ppd_ref, 1e-10, "ppd")
    total = pk.ppc_ppd_loss(case.x, case.prototypes, case.target, temperature=temperature, reduction="sum")
    assert_close(total.ppc, ppc_ref.sum(), 1e-10)
    mean = pk.ppc_ppd_loss(case.x, case.prototypes, case.target, temperature=temperature)
    assert_close(mean.ppc, ppc_ref.sum() / max(valid, 1), 1e-10)
    assert_close(mean.ppd, ppd_ref.sum() / max(valid, 1), 1e-10)


def test_custom_ignore_index_inside_range(reference_backend):
    case = make_case(100, 12, 5, 4, seed=2)
    target = case.target.clone()
    target[(target == 7) | (target == -1)] = 3  # 3 marks ignored pixels, though a valid prototype
    out = pk.ppc_ppd_loss(case.x, case.prototypes, target, ignore_index=3, reduction="none")
    s = literal.similarity(case.x, case.prototypes)
    ppc_ref, _ = literal.ppc_ppd(s, target, 1.0, 3)
    assert_close(out.ppc, ppc_ref, 1e-10)
    assert bool((out.ppc[target == 3] == 0).all())


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("n", [0, 17])
def test_all_ignored_gives_zero_loss_and_zero_gradient(reduction, n, reference_backend):
    x = torch.randn(n, 6, requires_grad=True)
    p = torch.randn(3, 2, 6, requires_grad=True)
    ppc, ppd = pk.ppc_ppd_loss(x, p, torch.full((n,), -1), reduction=reduction)
    assert not torch.isnan(ppc).any() and not torch.isnan(ppd).any()
    assert bool((ppc == 0).all()) and bool((ppd == 0).all())
    (ppc.sum() + ppd.sum()).backward()
    assert bool((x.grad == 0).all()) and bool((p.grad == 0).all())


def test_loss_dtype(reference_backend):
    case = make_case(30, 8, 3, 2)
    for dtype, expected in [(torch.float16, torch.float32), (torch.float32, torch.float32),
                            (torch.float64, torch.float64)]:
        out = pk.ppc_ppd_loss(case.x.to(dtype), case.prototypes.to(dtype), case.target)
        assert out.ppc.dtype == expected and out.ppd.dtype == expected


@pytest.mark.parametrize("shape", SMALL_SHAPES[:3], ids=str)
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_gradcheck(shape, normalize, reduction, reference_backend):
    case = make_case(*shape, seed=1)
    x = case.x[:20].clone().requires_grad_()
    p = case.prototypes.clone().requires_grad_()

    def fn(x, p):
        return tuple(pk.ppc_ppd_loss(x, p, case.target[:20], normalize=normalize, temperature=0.5,
                                     reduction=reduction))

    assert torch.autograd.gradcheck(fn, (x, p))


def test_deterministic(reference_backend):
    case = make_case(*RAGGED_SHAPES[0], dtype=torch.float32)

    def run():
        x = case.x.clone().requires_grad_()
        p = case.prototypes.clone().requires_grad_()
        ppc, ppd = pk.ppc_ppd_loss(x, p, case.target, temperature=0.1)
        (ppc + ppd).backward()
        return ppc, ppd, x.grad, p.grad

    for a, b in zip(run(), run()):
        assert_bitwise_equal(a, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("temperature", [1.0, 0.1])
def test_fused_backend_matches_reference(fused_backend, dtype, temperature):
    for i, shape in enumerate(fused_shapes(fused_backend)):
        check_ppc_ppd_loss(fused_backend, make_case(*shape, seed=30 + i), dtype,
                           temperature=temperature, prototype_grad=i % 2 == 0)


def test_fused_backend_unnormalized(fused_backend):
    case = make_case(*fused_shapes(fused_backend)[0], seed=7)
    check_ppc_ppd_loss(fused_backend, case, torch.float32, normalize=False, temperature=4.0)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_fused_backend_all_ignored(fused_backend, reduction):
    x = torch.randn(23, 6, requires_grad=True)
    p = torch.randn(3, 2, 6, requires_grad=True)
    with pk.use_backend(fused_backend):
        ppc, ppd = pk.ppc_ppd_loss(x, p, torch.full((23,), -1), reduction=reduction)
    (ppc + ppd).backward()
    assert float(ppc.detach()) == 0 and float(ppd.detach()) == 0
    assert bool((x.grad == 0).all()) and bool((p.grad == 0).all())


def test_fused_backend_deterministic(fused_backend):
    case = make_case(*fused_shapes(fused_backend)[0], dtype=torch.float32, seed=8)

    def run():
        x = case.x.clone().requires_grad_()
        p = case.prototypes.clone().requires_grad_()
        with pk.use_backend(fused_backend):
            ppc, ppd = pk.ppc_ppd_loss(x, p, case.target, temperature=0.1)
        (ppc + ppd).backward()
        return ppc, ppd, x.grad, p.grad

    for a, b in zip(run(), run()):
        assert_bitwise_equal(a, b)
