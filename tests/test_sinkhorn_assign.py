"""sinkhorn_assign: the β recurrence vs the literal matrix Sinkhorn of docs/spec.md §3.4,
options, fused backends."""

from __future__ import annotations

import literal
import pytest
import torch
from conformance import check_sinkhorn_assign
from conftest import fused_shapes
from helpers import (
    RAGGED_SHAPES,
    assert_bitwise_equal,
    assert_close,
    assert_index_match,
    make_case,
    top2_gap,
)

import protoseg_kernels as pk


@pytest.mark.parametrize("shape", RAGGED_SHAPES, ids=str)
@pytest.mark.parametrize("iterations", [1, 3, 5])
@pytest.mark.parametrize("epsilon", [0.05, 0.5])
def test_recurrence_matches_matrix_algorithm(shape, iterations, epsilon, reference_backend):
    case = make_case(*shape)
    out = pk.sinkhorn_assign(case.x, case.prototypes, case.labels, epsilon=epsilon,
                             iterations=iterations, return_q=True)
    s = literal.similarity(case.x, case.prototypes)
    index, q = literal.sinkhorn_matrix(s, case.labels, epsilon, iterations, -1)
    assert out.q.dtype == torch.float64 and out.index.dtype == torch.int64
    assert_close(out.q, q, 1e-9, "q")
    assert_index_match(out.index, index, top2_gap(q), 1e-9)
    ignored = case.labels < 0
    assert bool((out.index[ignored] == -1).all()) and bool((out.q[ignored] == 0).all())


def test_zero_iterations_is_plain_argmax(reference_backend):
    case = make_case(*RAGGED_SHAPES[0])
    out = pk.sinkhorn_assign(case.x, case.prototypes, case.labels, iterations=0, return_q=True)
    s = literal.similarity(case.x, case.prototypes)
    index, _ = literal.sinkhorn_matrix(s, case.labels, 0.05, 0, -1)
    own = s[torch.arange(s.shape[0]), case.labels.clamp_min(0)]
    assert_index_match(out.index, index, top2_gap(own), 1e-12)
    valid = case.labels >= 0
    assert_close(out.q[valid], torch.softmax(own[valid] / 0.05, dim=1), 1e-12)


def test_equipartition_within_each_class(reference_backend):
    # After many iterations each prototype of a class gets ~n_c/K of the mass.
    case = make_case(600, 16, 3, 4, seed=3, ignore_fraction=0.0, peaked_fraction=0.0)
    out = pk.sinkhorn_assign(case.x, case.prototypes, case.labels, epsilon=0.5, iterations=50,
                             return_q=True)
    for c in range(3):
        members = case.labels == c
        col = out.q[members].sum(0)
        assert_close(col, torch.full_like(col, float(members.sum()) / 4), 1e-6)


def test_singleton_and_absent_classes(reference_backend):
    case = make_case(200, 10, 6, 3, seed=4)
    out = pk.sinkhorn_assign(case.x, case.prototypes, case.labels, return_q=True)
    single = (case.labels == 4).nonzero().flatten()
    assert single.numel() == 1 and int(out.index[single]) >= 0
    assert_close(out.q[single].sum(), torch.tensor(1.0, dtype=torch.float64), 1e-12)
    assert not bool((case.labels == 5).any())
    assert torch.isfinite(out.q).all()


def test_custom_ignore_index_and_empty_batch(reference_backend):
    case = make_case(80, 8, 4, 3, seed=5)
    labels = torch.where(case.labels < 0, 255, case.labels)
    a = pk.sinkhorn_assign(case.x, case.prototypes, labels, ignore_index=255)
    b = pk.sinkhorn_assign(case.x, case.prototypes, case.labels)
    assert torch.equal(a.index, b.index)
    empty = pk.sinkhorn_assign(case.x[:0], case.prototypes, case.labels[:0], return_q=True)
    assert empty.index.shape == (0,) and empty.q.shape == (0, 3)


def test_unnormalized_large_logits_stay_finite(reference_backend):
    # Dot products of size ~100 with ε = 0.05 give logits ~2000: the log domain must hold.
    case = make_case(300, 12, 4, 5, seed=6, dtype=torch.float32)
    out = pk.sinkhorn_assign(case.x * 5, case.prototypes * 5, case.labels, normalize=False,
                             return_q=True)
    assert torch.isfinite(out.q).all()
    valid = case.labels >= 0
    assert_close(out.q[valid].sum(1), torch.ones(int(valid.sum())), 1e-5)


def test_fp16_input_small_epsilon_does_not_overflow(reference_backend):
    case = make_case(300, 12, 4, 5, seed=7, dtype=torch.float16)
    out = pk.sinkhorn_assign(case.x, case.prototypes, case.labels, epsilon=0.01, return_q=True)
    assert out.q.dtype == torch.float32 and torch.isfinite(out.q).all()


def test_no_gradient_flows(reference_backend):
    case = make_case(50, 8, 3, 2, dtype=torch.float32)
    x = case.x.clone().requires_grad_()
    out = pk.sinkhorn_assign(x, case.prototypes, case.labels, return_q=True)
    assert not out.q.requires_grad


def test_deterministic(reference_backend):
    case = make_case(*RAGGED_SHAPES[0], dtype=torch.float32)
    a = pk.sinkhorn_assign(case.x, case.prototypes, case.labels, return_q=True)
    b = pk.sinkhorn_assign(case.x, case.prototypes, case.labels, return_q=True)
    assert_bitwise_equal(a.index, b.index)
    assert_bitwise_equal(a.q, b.q)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("iterations,epsilon", [(3, 0.05), (0, 0.05), (1, 0.1), (5, 0.02)])
def test_fused_backend_matches_reference(fused_backend, dtype, iterations, epsilon):
    for i, shape in enumerate(fused_shapes(fused_backend)):
        check_sinkhorn_assign(fused_backend, make_case(*shape, seed=40 + i), dtype,
                              epsilon=epsilon, iterations=iterations)


def test_fused_backend_unnormalized(fused_backend):
    case = make_case(*fused_shapes(fused_backend)[0], seed=9)
    check_sinkhorn_assign(fused_backend, case, torch.float32, normalize=False, epsilon=1.0)


def test_fused_backend_deterministic(fused_backend):
    case = make_case(*fused_shapes(fused_backend)[0], dtype=torch.float32, seed=10)
    with pk.use_backend(fused_backend):
        a = pk.sinkhorn_assign(case.x, case.prototypes, case.labels, return_q=True)
        b = pk.sinkhorn_assign(case.x, case.prototypes, case.labels, return_q=True)
    assert_bitwise_equal(a.index, b.index)
    assert_bitwise_equal(a.q, b.q)
