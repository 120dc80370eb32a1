"""The op inventory (docs/spec.md §4, §9): the op table (protoseg_kernels/_op_table.py), the kernel
contract (_kernel_interface.py), the C++ schemas (csrc/schemas.h) and what each backend
declares agree; every op has a reference; every kernel a backend declares exists and runs.

Each backend's declaration is checked against its sources: a backend implements an op
exactly when it has the op's source file (reference/<op>.py, triton/<op>.py,
csrc/cpu/<op>.cpp, csrc/cuda/<op>.cu for cuda and cuda_emulated), so a source that forgot
to define or register a kernel fails here; with PROTOSEG_REQUIRE_BACKENDS naming the
backend (make test), an unavailable backend fails instead of skipping.
"""

from __future__ import annotations

import inspect
from pathlib import Path

import conformance
import partial_backend
import pytest
import torch
from conftest import FUSED_CPU_BACKENDS, _required_backends, require_backend
from contrast_cases import make_contrast_case
from helpers import SMALL_SHAPES, make_case

from protoseg_kernels import _backend
from protoseg_kernels._compiled import has_kernel
from protoseg_kernels._kernel_interface import KernelBackend
from protoseg_kernels._op_table import FLOAT_DTYPES, KERNELS, OPS, OPS_BY_NAME

ROOT = Path(__file__).resolve().parent.parent
# Where a backend implements an op: one source file per op.
SOURCES = {
    "reference": "protoseg_kernels/reference/{op}.py",
    "triton": "protoseg_kernels/triton/{op}.py",
    "cpu": "csrc/cpu/{op}.cpp",
    "cuda": "csrc/cuda/{op}.cu",
    "cuda_emulated": "csrc/cuda/{op}.cu",
}
# The compiled backends: (namespace of their schemas, dispatch key of their kernels).
COMPILED = {
    "cpu": ("protoseg_kernels", "CPU"),
    "cuda": ("protoseg_kernels", "CUDA"),
    "cuda_emulated": ("protoseg_kernels_emulated", "CPU"),
}
NOT_KERNELS = {"unavailable_reason", "device_reason"}


def require_loaded(name: str) -> None:
    """Skip (or fail, if required) unless backend ``name`` loads (no device needed)."""
    reason = _backend.unavailable_reason(name)
    if reason is None:
        return
    if name in _required_backends():
        pytest.fail(f"backend {name!r} is required by PROTOSEG_REQUIRE_BACKENDS but unavailable: {reason}")
    pytest.skip(f"backend {name!r} unavailable: {reason}")


def _contract() -> dict[str, inspect.Signature]:
    """The kernels of _kernel_interface.KernelBackend with their signatures (self dropped)."""
    return {
        name: inspect.signature(member)
        for name, member in vars(KernelBackend).items()
        if inspect.isfunction(member) and not name.startswith("_") and name not in NOT_KERNELS
    }


def test_table_lists_each_kernel_of_the_contract_once():
    names = [kernel.name for op in OPS for kernel in op.kernels]
    assert len(names) == len(set(names)), "a kernel is listed under two ops"
    assert set(names) == set(_contract())
    assert len(OPS_BY_NAME) == len(OPS)
    for op in OPS:
        assert op.kernels and op.spec.startswith("docs/spec.md §"), op


def test_every_op_has_a_reference_implementation():
    from protoseg_kernels import reference

    assert reference.IMPLEMENTED.dtypes == {op.name: FLOAT_DTYPES for op in OPS}
    assert not reference.IMPLEMENTED.missing
    for op in OPS:
        for kernel in op.kernels:
            function = getattr(reference, kernel.name)
            assert function.__module__ == f"protoseg_kernels.reference.{op.name}", kernel


@pytest.mark.parametrize("namespace", ["protoseg_kernels", "protoseg_kernels_emulated"])
def test_cpp_schemas_match_the_table_and_the_contract(namespace):
    require_loaded("cpu" if namespace == "protoseg_kernels" else "cuda_emulated")
    prefix = f"{namespace}::"
    registered = {name.removeprefix(prefix) for name in torch._C._dispatch_get_all_op_names()
                  if name.startswith(prefix)}
    assert registered == set(KERNELS)
    for name, signature in _contract().items():
        schema = getattr(getattr(torch.ops, namespace), name).default._schema
        arguments = [a.name for a in schema.arguments]
        assert arguments == list(signature.parameters)[1:], f"{name}: schema {schema} vs contract {signature}"
        assert not schema.overload_name, name


@pytest.mark.parametrize("backend", list(SOURCES))
def test_declaration_matches_the_sources(backend):
    require_loaded(backend)
    implemented = _backend.implemented(backend)
    with_source = {op.name for op in OPS if (ROOT / SOURCES[backend].format(op=op.name)).exists()}
    assert not implemented.missing, f"{backend} has only some kernels of {dict(implemented.missing)}"
    assert set(implemented.dtypes) == with_source, f"{backend}: declared {set(implemented.dtypes)}"
    for op, dtypes in implemented.dtypes.items():
        assert torch.float32 in dtypes and dtypes <= FLOAT_DTYPES, (backend, op, dtypes)


@pytest.mark.parametrize("backend", list(SOURCES))
def test_every_declared_kernel_exists(backend):
    require_loaded(backend)
    module = _backend.get_backend(backend)
    for op in _backend.implemented(backend).dtypes:
        for kernel in OPS_BY_NAME[op].kernels:
            assert callable(getattr(module, kernel.name, None)), f"{backend} declares {op} without {kernel.name}"
            if backend in COMPILED:
                namespace, dispatch_key = COMPILED[backend]
                assert has_kernel(namespace, kernel.name, dispatch_key), (backend, kernel)


def test_triton_declares_no_float64_and_the_compiled_backends_every_float():
    for backend in ("triton", *COMPILED):
        if _backend.unavailable_reason(backend) is None:
            expected = FLOAT_DTYPES - {torch.float64} if backend == "triton" else FLOAT_DTYPES
            assert set(_backend.implemented(backend).dtypes.values()) <= {expected}, backend


def _counting(monkeypatch, module, names: list[str]) -> dict[str, int]:
    """Wrap ``module``'s kernels ``names`` to count their calls."""
    calls = dict.fromkeys(names, 0)
    for name in names:
        function = getattr(module, name)

        def counted(*args, _name=name, _function=function):
            calls[_name] += 1
            return _function(*args)

        monkeypatch.setattr(module, name, counted)
    return calls


def _conformance_case(op: str):
    """The inputs ``check_<op>`` takes: a contrast case (a bank, so that the contrast
    gradient is asked for too) for the pixel contrast, pixels and prototypes otherwise."""
    if op == "pixel_contrast_loss":
        return make_contrast_case(67, 83, 13, 5, "bank", seed=11)
    return make_case(*SMALL_SHAPES[0], seed=11)


@pytest.mark.parametrize("op", list(OPS_BY_NAME))
@pytest.mark.parametrize("backend", FUSED_CPU_BACKENDS)
def test_every_declared_kernel_runs_and_matches_the_reference(monkeypatch, backend, op):
    """Each op's conformance check (tests/conformance.py: forward and backward against the
    float64 reference) calls every kernel of the op on the backend."""
    require_backend(backend, op)
    names = [kernel.name for kernel in OPS_BY_NAME[op].kernels]
    calls = _counting(monkeypatch, _backend.get_backend(backend), names)
    getattr(conformance, f"check_{op}")(backend, _conformance_case(op), torch.float32)
    assert all(calls.values()), f"{backend}: kernels of {op} never called: {calls}"


@pytest.fixture
def partial(monkeypatch):
    monkeypatch.setitem(_backend._MODULES, "cuda_emulated", "partial_backend")
    _backend._load.cache_clear()
    yield "cuda_emulated"
    _backend._load.cache_clear()


def test_a_missing_kernel_fails_and_an_op_not_implemented_skips(partial):
    with pytest.raises(pytest.fail.Exception, match="lacks the kernel.s. momentum_update"):
        require_backend(partial, partial_backend.PARTIAL)
    with pytest.raises(pytest.skip.Exception, match="does not implement sinkhorn_assign"):
        require_backend(partial, partial_backend.NOT_IMPLEMENTED)
    require_backend(partial, "class_scores")


def test_a_required_backend_that_is_missing_fails(monkeypatch):
    monkeypatch.setitem(_backend._MODULES, "cpu", "protoseg_kernels.no_such_module")
    monkeypatch.setenv("PROTOSEG_REQUIRE_BACKENDS", "cpu")
    _backend._load.cache_clear()
    try:
        with pytest.raises(pytest.fail.Exception, match="required by PROTOSEG_REQUIRE_BACKENDS"):
            require_backend("cpu", "class_scores")
        with pytest.raises(pytest.fail.Exception, match="required by PROTOSEG_REQUIRE_BACKENDS"):
            require_loaded("cpu")
    finally:
        _backend._load.cache_clear()
