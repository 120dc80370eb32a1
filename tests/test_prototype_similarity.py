"""prototype_similarity: reference vs literal docs/spec.md §3.1, gradients, fused backends."""

from __future__ import annotations

import literal
import pytest
import torch
from conformance import check_prototype_similarity
from conftest import fused_shapes
from helpers import RAGGED_SHAPES, SMALL_SHAPES, assert_bitwise_equal, assert_close, make_case

import protoseg_kernels as pk


@pytest.mark.parametrize("shape", RAGGED_SHAPES, ids=str)
@pytest.mark.parametrize("normalize", [True, False])
def test_reference_matches_literal(shape, normalize, reference_backend):
    case = make_case(*shape)
    s = pk.prototype_similarity(case.x, case.prototypes, normalize=normalize)
    assert s.shape == (shape[0], shape[2], shape[3]) and s.dtype == torch.float64
    assert_close(s, literal.similarity(case.x, case.prototypes, normalize), 1e-10)


@pytest.mark.parametrize("shape", SMALL_SHAPES[:3], ids=str)
@pytest.mark.parametrize("normalize", [True, False])
def test_gradcheck(shape, normalize, reference_backend):
    case = make_case(*shape, seed=1)
    x = case.x[:20].clone().requires_grad_()
    p = case.prototypes.clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda x, p: pk.prototype_similarity(x, p, normalize=normalize), (x, p))


def test_gradient_matches_autograd_of_literal(reference_backend):
    case = make_case(30, 8, 4, 3, seed=5)
    weight = torch.randn(30, 4, 3, dtype=torch.float64)
    grads = []
    for fn in (pk.prototype_similarity, literal.similarity):
        x = case.x.clone().requires_grad_()
        p = case.prototypes.clone().requires_grad_()
        (fn(x, p) * weight).sum().backward()
        grads.append((x.grad, p.grad))
    assert_close(grads[0][0], grads[1][0], 1e-10, "dx")
    assert_close(grads[0][1], grads[1][1], 1e-10, "dP")


def test_non_contiguous_inputs(reference_backend):
    case = make_case(40, 10, 3, 4, seed=6)
    x_t = case.x.T.contiguous().T  # same values, transposed strides
    p_nc = case.prototypes.transpose(0, 1).contiguous().transpose(0, 1)
    assert not x_t.is_contiguous() and not p_nc.is_contiguous()
    assert_close(pk.prototype_similarity(x_t, p_nc), pk.prototype_similarity(case.x, case.prototypes), 1e-14)


def test_deterministic(reference_backend):
    case = make_case(*RAGGED_SHAPES[0], dtype=torch.float32)
    a = pk.prototype_similarity(case.x, case.prototypes)
    b = pk.prototype_similarity(case.x, case.prototypes)
    assert_bitwise_equal(a, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("normalize", [True, False])
def test_fused_backend_matches_reference(fused_backend, dtype, normalize):
    for i, shape in enumerate(fused_shapes(fused_backend)):
        check_prototype_similarity(fused_backend, make_case(*shape, seed=20 + i), dtype, normalize)
