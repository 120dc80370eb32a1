"""The Triton similarity engine on columns [M, D] with labels, M not C·K: a test-side
client (``triton_columns_client``) checked against plain PyTorch in float64 (docs/spec.md §5)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import require_backend
from helpers import F64, assert_bitwise_equal, assert_close

FP32_TOL = 1e-5
# (N, D, M, labels): ragged, N and M crossing several interpreter tiles (16), one column, no rows.
SHAPES = [(45, 20, 37, 3), (33, 17, 1, 2), (19, 33, 50, 7), (0, 9, 5, 2)]


@pytest.fixture(autouse=True)
def _triton():
    require_backend("triton")


def _inputs(n, d, m, num_labels, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=F64) * (0.5 + torch.rand(n, 1, generator=g, dtype=F64))
    bank = torch.randn(m, d, generator=g, dtype=F64)
    labels = torch.randint(0, num_labels, (m,), generator=g)
    row_labels = torch.randint(-1, num_labels, (n,), generator=g)
    grad = torch.randn(n, generator=g, dtype=F64)
    return x, bank, labels, row_labels, grad


def _reference(x, bank, labels, row_labels, temperature, normalize):
    if normalize:
        x, bank = F.normalize(x, dim=1), F.normalize(bank, dim=1)
    z = (x @ bank.T) / temperature
    return torch.where(labels[None, :] != row_labels[:, None], z, -math.inf).logsumexp(dim=1)


def _reference_and_grads(x, bank, labels, row_labels, grad, temperature, normalize):
    x, bank = x.clone().requires_grad_(), bank.clone().requires_grad_()
    lse = _reference(x, bank, labels, row_labels, temperature, normalize)
    has_negative = torch.isfinite(lse)
    (lse[has_negative] * grad[has_negative]).sum().backward()
    return lse.detach(), x.grad, bank.grad


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("temperature", [1.0, 0.1])
def test_negative_logsumexp_and_gradients_match_float64(shape, normalize, temperature):
    from triton_columns_client import negative_logsumexp, negative_logsumexp_backward

    x, bank, labels, row_labels, grad = _inputs(*shape)
    ref, ref_dx, ref_dw = _reference_and_grads(x, bank, labels, row_labels, grad, temperature, normalize)
    x32, bank32 = x.float(), bank.float()
    lse = negative_logsumexp(x32, bank32, labels, row_labels, temperature, normalize)
    finite = torch.isfinite(ref)
    assert torch.equal(torch.isfinite(lse), finite)  # -inf exactly where a row has no other label
    assert_close(lse[finite], ref[finite], FP32_TOL, "lse")
    dx, dw = negative_logsumexp_backward(torch.where(finite, grad, 0.0), x32, bank32, labels, row_labels, lse,
                                         temperature, normalize)
    assert_close(dx, ref_dx, FP32_TOL, "dx")
    assert_close(dw, ref_dw, FP32_TOL, "dW")


@pytest.mark.parametrize("layout", ["flat", "class", "whole_classes"])
def test_grouped_columns_with_labels_in_every_tile_layout(layout):
    """Groups of 3 columns with labels of their own (not the group): the class layouts
    reach every column once, so the gradients are those of the flat layout."""
    from triton_columns_client import negative_logsumexp, negative_logsumexp_backward

    group = 3
    x, bank, labels, row_labels, grad = _inputs(41, 19, 7 * group, 4, seed=1)
    ref, ref_dx, ref_dw = _reference_and_grads(x, bank, labels, row_labels, grad, 0.5, True)
    lse = negative_logsumexp(x.float(), bank.float(), labels, row_labels, 0.5, True, group=group)
    finite = torch.isfinite(ref)
    assert_close(lse[finite], ref[finite], FP32_TOL, "lse")
    dx, dw = negative_logsumexp_backward(torch.where(finite, grad, 0.0), x.float(), bank.float(), labels,
                                         row_labels, lse, 0.5, True, group=group, layout=layout)
    assert_close(dx, ref_dx, FP32_TOL, "dx")
    assert_close(dw, ref_dw, FP32_TOL, "dW")


def test_unlabelled_columns_take_their_group_as_label():
    """Without labels, column j belongs to group j // group (prototypes: its class)."""
    from triton_columns_client import negative_logsumexp

    group = 4
    x, bank, _, _, _ = _inputs(23, 10, 5 * group, 5, seed=2)
    row_labels = torch.randint(0, 5, (23,))
    ref = _reference(x, bank, torch.arange(5 * group) // group, row_labels, 1.0, True)
    lse = negative_logsumexp(x.float(), bank.float(), None, row_labels, 1.0, True, group=group)
    assert_close(lse, ref, FP32_TOL, "lse")


def test_row_without_other_labels_gets_minus_inf_and_no_gradient():
    from triton_columns_client import negative_logsumexp, negative_logsumexp_backward

    x, bank, _, _, grad = _inputs(20, 12, 18, 2, seed=3)
    labels = torch.full((18,), 2)
    row_labels = torch.where(torch.arange(20) % 3 == 0, 2, 0)
    lse = negative_logsumexp(x.float(), bank.float(), labels, row_labels, 0.2, True)
    lonely = row_labels == 2
    assert bool((lse[lonely] == -math.inf).all()) and bool(torch.isfinite(lse[~lonely]).all())
    dx, dw = negative_logsumexp_backward(torch.where(lonely, 0.0, grad), x.float(), bank.float(), labels,
                                         row_labels, lse, 0.2, True)
    assert bool((dx[lonely] == 0).all()) and bool(torch.isfinite(dw).all())


def test_bitwise_reproducible():
    from triton_columns_client import negative_logsumexp, negative_logsumexp_backward

    x, bank, labels, row_labels, grad = (t.float() if t.is_floating_point() else t for t in _inputs(45, 20, 37, 3))
    runs = []
    for _ in range(2):
        lse = negative_logsumexp(x, bank, labels, row_labels, 0.1, True)
        runs.append((lse, *negative_logsumexp_backward(grad.clamp(-1, 1), x, bank, labels, row_labels, lse, 0.1,
                                                       True)))
    for a, b, what in zip(*runs, ("lse", "dx", "dW")):
        assert_bitwise_equal(a, b, what)


def test_bad_column_descriptions_are_refused():
    from protoseg_kernels.triton._columns import Columns

    bank = torch.randn(10, 4)
    with pytest.raises(ValueError, match="group must divide M"):
        Columns(bank, group=3)
    with pytest.raises(ValueError, match="labels must be a contiguous int64"):
        Columns(bank, labels=torch.zeros(10, dtype=torch.int32))
    with pytest.raises(ValueError, match="labels must be a contiguous int64"):
        Columns(bank, labels=torch.zeros(9, dtype=torch.int64))
    with pytest.raises(ValueError, match="values must be"):
        Columns(torch.randn(2, 5, 4))
