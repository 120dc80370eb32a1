"""Test configuration shared by every test file.

* Deterministic algorithms are switched on with uninitialised-memory filling, so
  every ``torch.empty`` (in Python, Triton launchers or C++ ``at::empty``) starts
  as NaN / INT_MAX: an element a kernel forgets to write shows up as a failure
  (docs/spec.md §5, "poison outputs").
* ``PROTOSEG_REQUIRE_BACKENDS=cpu,triton,...`` (set by ``make test``) turns the
  skip of an unavailable backend into a failure, so CI cannot go green on a
  kernel that was never run.
* ``fused_backend`` in ``tests/test_<op>.py`` runs only on the backends that implement
  the op (the op table, protoseg_kernels._op_table); a backend that has only some of the
  op's kernels fails. That what each backend declares matches its sources is
  tests/test_op_inventory.py's job.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

# Without a GPU, the triton backend runs its kernels through Triton's interpreter on
# CPU tensors (read when the backend is imported, so it is set before anything loads it).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import protoseg_kernels as pk  # noqa: E402
from protoseg_kernels._backend import get_backend, implemented, op_reason, unavailable_reason  # noqa: E402
from protoseg_kernels._op_table import OPS_BY_NAME  # noqa: E402

# Backends besides the reference that can run on CPU tensors here; each is compared
# with the reference by the op test files.
FUSED_CPU_BACKENDS = ("cpu", "triton", "cuda_emulated")


@pytest.fixture(autouse=True)
def _poison_uninitialised_memory():
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    yield
    torch.use_deterministic_algorithms(previous)


def _required_backends() -> set[str]:
    value = os.environ.get("PROTOSEG_REQUIRE_BACKENDS", "")
    return {name.strip() for name in value.split(",") if name.strip()}


def require_backend(name: str, op: str | None = None) -> None:
    """Skip (or fail, if required) when backend ``name`` cannot run on CPU tensors; with
    ``op``, also skip when the backend does not implement the op, and fail when it has
    only some of its kernels."""
    _require_available(name)
    if op is None or op_reason(name, op) is None:
        return
    if op in implemented(name).missing:
        pytest.fail(op_reason(name, op))
    pytest.skip(op_reason(name, op))


def _require_available(name: str) -> None:
    reason = unavailable_reason(name)
    if reason is None:
        reason = get_backend(name).device_reason(torch.device("cpu"))
        if reason is None:
            return
        if torch.cuda.is_available():  # e.g. triton, compiled for the GPU here: its GPU tests cover it
            pytest.skip(f"backend {name!r} runs on the GPU here, not on CPU tensors: {reason}")
    if name in _required_backends():
        pytest.fail(f"backend {name!r} is required by PROTOSEG_REQUIRE_BACKENDS but unavailable: {reason}")
    pytest.skip(f"backend {name!r} unavailable: {reason}")


@pytest.fixture(params=FUSED_CPU_BACKENDS)
def fused_backend(request) -> str:
    """A fused backend that runs on CPU tensors here; in tests/test_<op>.py, one that implements <op>."""
    op = request.module.__name__.removeprefix("test_")
    require_backend(request.param, op if op in OPS_BY_NAME else None)
    return request.param


@pytest.fixture
def reference_backend():
    with pk.use_backend("reference"):
        yield "reference"


# Ragged shapes (N, D, C, K) each fused backend is compared on. The interpreted and
# emulated backends run on smaller (still ragged) shapes to keep the suite fast.
def fused_shapes(backend: str) -> list[tuple[int, int, int, int]]:
    from helpers import RAGGED_SHAPES, SMALL_SHAPES

    if backend == "triton":  # interpreted: also one shape with D over several 16-wide blocks
        return SMALL_SHAPES + [(45, 40, 6, 3)]
    return SMALL_SHAPES if backend == "cuda_emulated" else RAGGED_SHAPES
