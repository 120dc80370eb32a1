"""class_scores: reference vs the literal docs/spec.md §3.2, gradients, determinism, and
every fused backend vs the reference (docs/spec.md §5)."""

from __future__ import annotations

import literal
import pytest
import torch
from conformance import check_class_scores
from conftest import fused_shapes
from helpers import (
    RAGGED_SHAPES,
    SMALL_SHAPES,
    assert_bitwise_equal,
    assert_close,
    assert_index_match,
    make_case,
    top2_gap,
)

import protoseg_kernels as pk

REDUCTIONS = ["max", "logsumexp"]


@pytest.mark.parametrize("shape", RAGGED_SHAPES, ids=str)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_reference_matches_literal(shape, reduction, reference_backend):
    case = make_case(*shape)
    out = pk.class_scores(case.x, case.prototypes, reduction=reduction, temperature=0.3,
                          return_index=True, lse_temperature=0.1)
    s = literal.similarity(case.x, case.prototypes)
    scores, index = literal.class_scores(s, reduction, 0.3)
    assert out.scores.dtype == torch.float64 and out.index.dtype == torch.int64
    assert_close(out.scores, scores, 1e-10, "scores")
    assert_index_match(out.index, index, top2_gap(s), 1e-10)
    assert_close(out.lse, literal.logsumexp_all(s, 0.1), 1e-10, "lse")


def test_unnormalized_uses_plain_dot_products(reference_backend):
    case = make_case(50, 9, 4, 3)
    out = pk.class_scores(case.x, case.prototypes, normalize=False, return_index=True)
    s = literal.similarity(case.x, case.prototypes, normalize=False)
    assert_close(out.scores, s.amax(-1), 1e-12)


def test_return_forms(reference_backend):
    case = make_case(20, 6, 3, 2)
    assert isinstance(pk.class_scores(case.x, case.prototypes), torch.Tensor)
    scores, index = pk.class_scores(case.x, case.prototypes, return_index=True)
    assert index.shape == scores.shape == (20, 3)
    scores, lse = pk.class_scores(case.x, case.prototypes, lse_temperature=0.5)
    assert lse.shape == (20,)
    out = pk.class_scores(case.x, case.prototypes, return_index=True, lse_temperature=0.5)
    assert out._fields == ("scores", "index", "lse")


def test_max_gradient_goes_to_first_argmax_only(reference_backend):
    # Two identical prototypes: torch.amax would split the gradient, we route it to k = 0.
    x = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    p = torch.randn(1, 1, 4, dtype=torch.float64).repeat(1, 2, 1).requires_grad_()
    pk.class_scores(x, p).sum().backward()
    assert p.grad[0, 1].abs().max() == 0 and p.grad[0, 0].abs().max() > 0


@pytest.mark.parametrize("shape", SMALL_SHAPES[:3], ids=str)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("lse_temperature", [None, 0.7])
def test_gradcheck(shape, reduction, normalize, lse_temperature, reference_backend):
    case = make_case(*shape, seed=1)
    x = case.x[:20].clone().requires_grad_()
    p = case.prototypes.clone().requires_grad_()

    def fn(x, p):
        out = pk.class_scores(x, p, normalize=normalize, reduction=reduction, temperature=0.5,
                              lse_temperature=lse_temperature)
        return out if lse_temperature is None else (out.scores, out.lse)

    assert torch.autograd.gradcheck(fn, (x, p))


def test_gradcheck_without_prototype_grad(reference_backend):
    case = make_case(20, 7, 3, 4, seed=2)
    x = case.x.clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda x: pk.class_scores(x, case.prototypes, lse_temperature=0.5).lse, (x,))


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_deterministic(reduction, reference_backend):
    case = make_case(*RAGGED_SHAPES[0], dtype=torch.float32)

    def run():
        x = case.x.clone().requires_grad_()
        p = case.prototypes.clone().requires_grad_()
        out = pk.class_scores(x, p, reduction=reduction, return_index=True, lse_temperature=0.1)
        (out.scores.sum() + out.lse.sum()).backward()
        return out.scores, out.index, out.lse, x.grad, p.grad

    for a, b in zip(run(), run()):
        assert_bitwise_equal(a, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize(
    "reduction,lse_temperature", [("max", None), ("max", 0.1), ("logsumexp", None), ("logsumexp", 0.2)]
)
def test_fused_backend_matches_reference(fused_backend, dtype, reduction, lse_temperature):
    for i, shape in enumerate(fused_shapes(fused_backend)):
        case = make_case(*shape, seed=10 + i)
        check_class_scores(fused_backend, case, dtype, reduction=reduction,
                           lse_temperature=lse_temperature, prototype_grad=i % 2 == 0)


def test_fused_backend_unnormalized(fused_backend):
    case = make_case(*fused_shapes(fused_backend)[0], seed=3)
    check_class_scores(fused_backend, case, torch.float32, normalize=False, lse_temperature=5.0)


def test_fused_backend_deterministic(fused_backend):
    case = make_case(*fused_shapes(fused_backend)[0], dtype=torch.float32, seed=4)

    def run():
        x = case.x.clone().requires_grad_()
        p = case.prototypes.clone().requires_grad_()
        with pk.use_backend(fused_backend):
            out = pk.class_scores(x, p, return_index=True, lse_temperature=0.1)
        (out.scores.sum() + out.lse.sum()).backward()
        return out.scores, out.index, out.lse, x.grad, p.grad

    for a, b in zip(run(), run()):
        assert_bitwise_equal(a, b)
