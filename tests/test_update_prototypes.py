"""update_prototypes: reference vs literal docs/spec.md §3.5, options, fused backends."""

from __future__ import annotations

import literal
import pytest
import torch
from conformance import check_update_prototypes
from conftest import fused_shapes
from helpers import RAGGED_SHAPES, assert_bitwise_equal, assert_close, make_case

import protoseg_kernels as pk


@pytest.mark.parametrize("shape", RAGGED_SHAPES, ids=str)
@pytest.mark.parametrize("momentum", [0.999, 0.5, 0.0, 1.0])
@pytest.mark.parametrize("with_mask", [False, True])
def test_reference_matches_literal(shape, momentum, with_mask, reference_backend):
    case = make_case(*shape)
    mask = torch.rand(shape[0], generator=torch.Generator().manual_seed(1)) < 0.6 if with_mask else None
    out = pk.update_prototypes(case.prototypes, case.x, case.labels, case.index, mask=mask,
                               momentum=momentum)
    new, counts = literal.update(case.prototypes, case.x, case.labels, case.index, mask, momentum, -1)
    assert torch.equal(out.counts, counts)
    assert out.prototypes.dtype == torch.float64
    assert_close(out.prototypes, new, 1e-10)


def test_prototypes_stay_unit_norm_and_untouched_ones_only_renormalise(reference_backend):
    case = make_case(300, 16, 5, 4, seed=2)
    index = case.index.clone()
    index[(case.labels == 1) & (index == 2)] = -1  # prototype (1, 2) gets no pixel
    out = pk.update_prototypes(case.prototypes, case.x, case.labels, index, momentum=0.9)
    assert_close(out.prototypes.norm(dim=-1), torch.ones(5, 4, dtype=torch.float64), 1e-12)
    assert int(out.counts[1, 2]) == 0
    expected = case.prototypes[1, 2] / case.prototypes[1, 2].norm()
    assert_close(out.prototypes[1, 2], expected, 1e-15)
    assert not torch.equal(out.prototypes[0], case.prototypes[0] / case.prototypes[0].norm(dim=-1, keepdim=True))


def test_input_is_not_modified(reference_backend):
    case = make_case(100, 8, 3, 2)
    before = case.prototypes.clone()
    out = pk.update_prototypes(case.prototypes, case.x, case.labels, case.index)
    assert torch.equal(case.prototypes, before)
    assert out.prototypes.data_ptr() != case.prototypes.data_ptr()


def test_mixed_dtypes_keep_prototype_dtype(reference_backend):
    case = make_case(100, 8, 3, 2)
    out = pk.update_prototypes(case.prototypes.float(), case.x.half(), case.labels, case.index,
                               momentum=0.5)
    ref = pk.update_prototypes(case.prototypes, case.x.half().double(), case.labels, case.index,
                               momentum=0.5)
    assert out.prototypes.dtype == torch.float32
    assert_close(out.prototypes, ref.prototypes, 1e-6)


def test_unnormalized_uses_inputs_as_given(reference_backend):
    case = make_case(100, 8, 3, 2)
    p = case.prototypes / case.prototypes.norm(dim=-1, keepdim=True)
    x = case.x / case.x.norm(dim=-1, keepdim=True)
    a = pk.update_prototypes(p, x, case.labels, case.index, normalize=False, momentum=0.7)
    b = pk.update_prototypes(p * 3, x * 2, case.labels, case.index, normalize=True, momentum=0.7)
    assert_close(a.prototypes, b.prototypes, 1e-12)


def test_empty_batch(reference_backend):
    case = make_case(0, 8, 3, 2)
    out = pk.update_prototypes(case.prototypes, case.x, case.labels, case.index)
    assert int(out.counts.sum()) == 0
    assert_close(out.prototypes, case.prototypes / case.prototypes.norm(dim=-1, keepdim=True), 1e-15)


def test_deterministic(reference_backend):
    case = make_case(*RAGGED_SHAPES[0], dtype=torch.float32)
    a = pk.update_prototypes(case.prototypes, case.x, case.labels, case.index, momentum=0.5)
    b = pk.update_prototypes(case.prototypes, case.x, case.labels, case.index, momentum=0.5)
    assert_bitwise_equal(a.prototypes, b.prototypes)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("momentum", [0.999, 0.3])
def test_fused_backend_matches_reference(fused_backend, dtype, momentum):
    for i, shape in enumerate(fused_shapes(fused_backend)):
        check_update_prototypes(fused_backend, make_case(*shape, seed=50 + i), dtype,
                                momentum=momentum, with_mask=i % 2 == 0)


def test_fused_backend_unnormalized(fused_backend):
    case = make_case(*fused_shapes(fused_backend)[0], seed=11)
    check_update_prototypes(fused_backend, case, torch.float32, normalize=False, momentum=0.5)


def test_fused_backend_deterministic(fused_backend):
    case = make_case(*fused_shapes(fused_backend)[0], dtype=torch.float32, seed=12)
    with pk.use_backend(fused_backend):
        a = pk.update_prototypes(case.prototypes, case.x, case.labels, case.index, momentum=0.5)
        b = pk.update_prototypes(case.prototypes, case.x, case.labels, case.index, momentum=0.5)
    assert_bitwise_equal(a.prototypes, b.prototypes)
    assert_bitwise_equal(a.counts, b.counts)
