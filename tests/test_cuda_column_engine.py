"""The CUDA column engine (csrc/cuda/similarity_*.cuh) serves clients beyond the
prototype ops: tests/column_engine_probe.cpp writes a label-masked per-row log-sum-exp
over a labelled column set against the engine's headers alone, built here through the
host emulation; it must match float64 torch, forward and backward to rows and columns,
for arbitrary M (ragged, one column, many column tiles), column labels with ignored
entries, raw and normalised similarities, and the in-batch case (columns = rows)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
IGNORE = -1
TEMPERATURE = 0.2
# (rows, columns, features): ragged edges of the 64-wide tiles and 16-deep slices,
# a single column, several column tiles.
SHAPES = [(37, 131, 19), (70, 5, 77), (1, 1, 3), (129, 200, 8)]


@pytest.fixture(scope="module")
def probe(tmp_path_factory):
    if (os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")) is None:
        pytest.skip("no C++ compiler to build the column engine probe")
    from torch.utils.cpp_extension import load

    return load(
        "column_engine_probe", [str(ROOT / "tests" / "column_engine_probe.cpp")],
        extra_cflags=["-O1", "-DPROTOSEG_EMULATION", "-pthread", "-Wno-unknown-pragmas"],
        extra_include_paths=[str(ROOT / "csrc")], build_directory=str(tmp_path_factory.mktemp("engine")),
    )


def reference(x, columns, row_label, column_label, normalize):
    """lse_i over the columns the label mask admits (-inf where none is), differentiable."""
    if normalize:
        x, columns = torch.nn.functional.normalize(x, dim=1), torch.nn.functional.normalize(columns, dim=1)
    logits = x @ columns.T / TEMPERATURE
    admitted = (column_label[None, :] != IGNORE) & (column_label[None, :] != row_label[:, None])
    return torch.logsumexp(logits.masked_fill(~admitted, float("-inf")), dim=1)


def run_case(probe, x, columns, row_label, column_label, normalize, generator):
    x_ref = x.double().requires_grad_()
    columns_ref = x_ref if columns is x else columns.double().requires_grad_()
    expected = reference(x_ref, columns_ref, row_label, column_label, normalize)
    has_terms = torch.isfinite(expected)
    upstream = torch.where(has_terms, torch.randn(x.shape[0], generator=generator, dtype=torch.float64), 0.0)
    (expected[has_terms] * upstream[has_terms]).sum().backward()

    lse = probe.forward(x, columns, row_label, column_label, IGNORE, normalize, TEMPERATURE)
    grad_x, grad_columns = probe.backward(upstream.float(), lse, x, columns, row_label, column_label, IGNORE,
                                          normalize, TEMPERATURE)
    assert torch.equal(torch.isfinite(lse), has_terms)
    torch.testing.assert_close(lse[has_terms].double(), expected[has_terms].detach(), atol=1e-4, rtol=1e-4)
    if columns is x:  # in-batch: the rows receive the gradient of both roles
        torch.testing.assert_close((grad_x + grad_columns).double(), x_ref.grad, atol=1e-4, rtol=1e-3)
    else:
        torch.testing.assert_close(grad_x.double(), x_ref.grad, atol=1e-4, rtol=1e-3)
        torch.testing.assert_close(grad_columns.double(), columns_ref.grad, atol=1e-4, rtol=1e-3)
    return lse, grad_x, grad_columns


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_labelled_column_client_matches_float64(probe, shape, normalize):
    n, m, d = shape
    generator = torch.Generator().manual_seed(n * 1000 + m)
    x = torch.randn(n, d, generator=generator)
    columns = torch.randn(m, d, generator=generator)
    row_label = torch.randint(0, 3, (n,), generator=generator)
    column_label = torch.randint(IGNORE, 3, (m,), generator=generator)  # some ignored columns
    first = run_case(probe, x, columns, row_label, column_label, normalize, torch.Generator().manual_seed(1))
    again = run_case(probe, x, columns, row_label, column_label, normalize, torch.Generator().manual_seed(1))
    for a, b in zip(first, again):  # fixed reduction orders: reproducible bit for bit
        assert torch.equal(a, b)


def test_in_batch_client_with_rows_as_columns(probe):
    generator = torch.Generator().manual_seed(7)
    x = torch.randn(90, 21, generator=generator)
    labels = torch.randint(0, 4, (90,), generator=generator)
    labels[::11] = IGNORE  # ignored rows take no part as columns
    run_case(probe, x, x, labels, labels, True, generator)


def test_labelled_column_client_runs_on_tensor_cores_in_tf32(probe):
    """The same client on the tensor-core tiles (TF32 allowed) with nothing changed in it:
    tf32-accurate, and not the FMA result."""
    n, m, d = SHAPES[-1]
    generator = torch.Generator().manual_seed(77)
    x, columns = torch.randn(n, d, generator=generator), torch.randn(m, d, generator=generator)
    row_label = torch.randint(0, 3, (n,), generator=generator)
    column_label = torch.randint(IGNORE, 3, (m,), generator=generator)
    upstream = torch.randn(n, generator=generator)
    before = torch.backends.cuda.matmul.allow_tf32
    results = {}
    try:
        for allow in (False, True):
            torch.backends.cuda.matmul.allow_tf32 = allow
            lse = probe.forward(x, columns, row_label, column_label, IGNORE, True, TEMPERATURE)
            finite = torch.isfinite(lse)
            grads = probe.backward(torch.where(finite, upstream, 0.0), lse, x, columns, row_label, column_label,
                                   IGNORE, True, TEMPERATURE)
            results[allow] = (torch.where(finite, lse, 0.0), *grads)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before
    for fma, tf32 in zip(results[False], results[True]):
        scale = float(fma.abs().max())
        assert float((tf32 - fma).abs().max()) <= 1e-2 * scale  # tf32: 10 mantissa bits
        assert not torch.equal(tf32, fma)
