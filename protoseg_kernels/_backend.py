"""Backend registry and selection (docs/spec.md §4).

A backend is a module implementing kernels of the contract of
:mod:`protoseg_kernels._kernel_interface`, plus:

* ``IMPLEMENTED`` (:class:`protoseg_kernels._op_table.Implemented`): the ops of the op
  table it has all the kernels of, each with the input dtypes it computes in, and the
  ops it has only some kernels of.
* ``unavailable_reason() -> str | None``: why the backend cannot be used at all
  in this process (missing package or extension), with the fix; ``None`` if usable.
* ``device_reason(device) -> str | None``: why it cannot serve tensors on
  ``device``; ``None`` if it can.

Selection: ``use_backend(name)`` (innermost wins) overrides the environment
variable ``PROTOSEG_BACKEND``, which overrides ``"auto"``. The ``use_backend`` choice
is a context variable: it holds for the thread (or asyncio task) that entered the
``with`` block, and a new thread starts without it. ``auto`` picks, for
CUDA tensors, triton, else cuda, else reference; for CPU tensors, cpu, else
reference; always among the backends that implement the op in the inputs' dtype
(float64 CUDA tensors go to cuda: triton does not compute in float64). A backend
named explicitly that cannot serve the device or lacks the op raises
``RuntimeError``; one that implements the op but not in the dtype, ``TypeError``.

``auto`` never degrades silently: when it serves a device from ``reference`` because a
compiled backend for that device failed to load (a missing extension, or one built against
another torch), it warns once per backend with the reason and the rebuild command, or raises
with ``PROTOSEG_FALLBACK=error`` (``PROTOSEG_FALLBACK=silent``: neither). An op or dtype a
backend does not implement is served by another without a warning: that is by design.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import importlib
import os
import warnings
from collections.abc import Iterator
from types import ModuleType

import torch

from ._op_table import DTYPE_NAMES, Implemented, get_op

ENV_VAR = "PROTOSEG_BACKEND"
FALLBACK_VAR = "PROTOSEG_FALLBACK"
FALLBACK_POLICIES = ("warn", "error", "silent")
AUTO = "auto"

# name -> module implementing it. cuda_emulated runs the CUDA kernel sources on CPU
# tensors through the host emulation build; it exists for the tests.
_MODULES = {
    "reference": "protoseg_kernels.reference",
    "cpu": "protoseg_kernels._compiled.cpu",
    "triton": "protoseg_kernels.triton",
    "cuda": "protoseg_kernels._compiled.cuda",
    "cuda_emulated": "protoseg_kernels._compiled.cuda_emulated",
}
BACKEND_NAMES = tuple(_MODULES)

_AUTO_ORDER = {
    "cuda": ("triton", "cuda", "reference"),
    "cpu": ("cpu", "reference"),
}

class BackendFallbackWarning(UserWarning):
    """``auto`` serves tensors from the reference because a compiled backend failed to load."""


_warned_fallbacks: set[str] = set()  # backends whose fallback was reported (once each)

# The use_backend choices in force, innermost last: per thread and per asyncio task.
_overrides: contextvars.ContextVar[tuple[str, ...]] = contextvars.ContextVar("protoseg_backend", default=())
# Its mirror for torch.compile on torch before 2.14 (_current_overrides).
_traced_overrides: tuple[str, ...] = ()
_DYNAMO_TRACES_CONTEXTVARS = tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2]) >= (2, 14)
_is_compiling = getattr(torch.compiler, "is_compiling", lambda: False)


@functools.cache
def _load(name: str) -> tuple[ModuleType | None, str | None]:
    """Import a backend once; return (module, None) or (None, reason)."""
    try:
        module = importlib.import_module(_MODULES[name])
    except Exception as exc:  # an optional dependency may fail in any way
        return None, f"importing {_MODULES[name]} failed: {type(exc).__name__}: {exc}"
    reason = module.unavailable_reason()
    return (None, reason) if reason else (module, None)


def unavailable_reason(name: str) -> str | None:
    """Why backend ``name`` cannot be used in this process, or None."""
    _check_name(name, allow_auto=False)
    return _load(name)[1]


def available_backends() -> list[str]:
    """Names of the backends usable in this process (on some device)."""
    return [name for name in BACKEND_NAMES if _load(name)[0] is not None]


def _check_name(name: object, *, allow_auto: bool) -> str:
    names = ((AUTO,) if allow_auto else ()) + BACKEND_NAMES
    if name not in names:
        raise ValueError(f"backend must be one of {', '.join(map(repr, names))}, got {name!r}")
    return name  # type: ignore[return-value]


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Run the ops inside the ``with`` block on backend ``name`` (or ``"auto"``).

    The choice is read when an op is called; under ``torch.compile`` it is read
    once, at trace time (and a change recompiles). It applies to the calling thread (or
    asyncio task) only; compiled code on torch before 2.14 sees the block entered last.
    """
    global _traced_overrides
    token = _overrides.set(_overrides.get() + (_check_name(name, allow_auto=True),))
    outer, _traced_overrides = _traced_overrides, _overrides.get()
    try:
        yield
    finally:
        _overrides.reset(token)
        _traced_overrides = outer


def _current_overrides() -> tuple[str, ...]:
    """The use_backend stack of this thread; while Dynamo traces on a torch that cannot
    trace ``ContextVar.get`` (before 2.14), the stack of the block entered last, a module
    global that Dynamo guards on (a changed backend recompiles)."""
    if not _DYNAMO_TRACES_CONTEXTVARS and _is_compiling():
        return _traced_overrides
    return _overrides.get()


def requested_backend() -> str:
    """The backend name asked for right now: use_backend, else $PROTOSEG_BACKEND, else auto."""
    overrides = _current_overrides()
    if overrides:
        return overrides[-1]
    name = os.environ.get(ENV_VAR, AUTO).strip() or AUTO
    if name not in (AUTO,) + BACKEND_NAMES:
        raise RuntimeError(
            f"{ENV_VAR}={name!r} is not a backend; use one of {', '.join((AUTO,) + BACKEND_NAMES)}"
        )
    return name


def _serving_reason(name: str, device: torch.device) -> str | None:
    module, reason = _load(name)
    return reason if module is None else module.device_reason(device)


def implemented(name: str) -> Implemented:
    """What backend ``name`` declares it implements (nothing when it is unavailable)."""
    module, _ = _load(name)
    return Implemented() if module is None else module.IMPLEMENTED


def _dtype_list(dtypes: frozenset[torch.dtype]) -> str:
    return ", ".join(DTYPE_NAMES[d] for d in DTYPE_NAMES if d in dtypes) or "no dtype"


def op_reason(name: str, op: str) -> str | None:
    """Why backend ``name`` does not implement ``op`` (at all, or some kernel is missing), or None."""
    module, reason = _load(name)
    if module is None:
        return reason
    if op in module.IMPLEMENTED.dtypes:
        return None
    get_op(op)  # an op outside the table is a programming error, not a missing kernel
    missing = module.IMPLEMENTED.missing.get(op)
    if missing:
        return f"the {name} backend lacks the kernel(s) {', '.join(missing)} of {op}"
    return f"the {name} backend does not implement {op}"


def op_dtype_reason(name: str, op: str, dtype: torch.dtype) -> str | None:
    """Why backend ``name`` cannot compute ``op`` on ``dtype`` inputs (op or dtype), or None."""
    reason = op_reason(name, op)
    if reason is not None:
        return reason
    dtypes = implemented(name).dtypes[op]
    if dtype in dtypes:
        return None
    return f"the {name} backend computes {op} in {_dtype_list(dtypes)}, not {dtype}"


def _assume_constant_result(fn):
    """Marks ``fn`` as ``torch.compiler.assume_constant_result`` does (dynamo then treats a call
    as a constant, so the backend choice costs a compiled graph nothing), without importing
    ``torch._dynamo``, which that function does and which would add about 1.5 s to
    ``import protoseg_kernels``. tests/test_backend_selection.py checks that torch still marks
    functions this way."""
    fn._dynamo_marked_constant = True
    return fn


@_assume_constant_result
def _resolve(
    op: str, requested: str, device_type: str, device_index: int, dtype_name: str, argument: str = "x",
) -> str:
    get_op(op)  # an op outside the table is a programming error, whichever backend is asked for
    device = torch.device(device_type, device_index) if device_index >= 0 else torch.device(device_type)
    dtype = getattr(torch, dtype_name)
    if requested == AUTO:
        failed = []  # compiled backends for this device that did not load
        for name in _AUTO_ORDER.get(device_type, ("reference",)):
            if _load(name)[0] is None:
                failed.append(name)
            elif _serving_reason(name, device) is None and op_dtype_reason(name, op, dtype) is None:
                if name == "reference" and failed:
                    _report_fallback(failed, device_type)
                return name
        return "reference"
    reason = _serving_reason(requested, device)
    if reason is not None:
        raise RuntimeError(f"protoseg backend {requested!r} cannot run on {device} tensors: {reason}")
    reason = op_reason(requested, op)
    if reason is not None:
        raise RuntimeError(
            f"protoseg backend {requested!r} cannot run {op}: {reason}; use backend 'auto' or 'reference'"
        )
    reason = op_dtype_reason(requested, op, dtype)
    if reason is not None:
        raise TypeError(
            f"{op}: {argument} is {dtype_name}, but {reason}; use backend 'auto' (pk.use_backend) "
            "to pick one that does"
        )
    return requested


def _fallback_policy() -> str:
    policy = os.environ.get(FALLBACK_VAR, "warn").strip() or "warn"
    if policy not in FALLBACK_POLICIES:
        raise RuntimeError(f"{FALLBACK_VAR}={policy!r} is not a policy; use one of {', '.join(FALLBACK_POLICIES)}")
    return policy


def _report_fallback(failed: list[str], device_type: str) -> None:
    """Warn once per backend (or raise) that ``auto`` serves ``device_type`` tensors from the
    reference because ``failed`` did not load."""
    policy = _fallback_policy()
    if policy == "silent" or (policy == "warn" and all(name in _warned_fallbacks for name in failed)):
        return
    reasons = "; ".join(f"{name}: {_load(name)[1]}" for name in failed)
    message = (f"protoseg: backend 'auto' runs {device_type} tensors on the slow 'reference' backend because "
               f"{' and '.join(map(repr, failed))} did not load ({reasons}). Set {FALLBACK_VAR}=error to make "
               f"this an error, or {FALLBACK_VAR}=silent to accept it.")
    if policy == "error":
        raise RuntimeError(message)
    _warned_fallbacks.update(failed)
    warnings.warn(message, BackendFallbackWarning, stacklevel=4)


def backend_for(tensor: torch.Tensor, op: str = "class_scores") -> str:
    """The backend that public op ``op`` would run on for inputs like ``tensor`` (its device
    and dtype) under the current selection (``use_backend``, ``$PROTOSEG_BACKEND``, ``auto``).
    Raises as the op would when the requested backend cannot serve them."""
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"backend_for: tensor must be a torch.Tensor, got {type(tensor).__name__}")
    return resolve_backend(op, tensor.device, tensor.dtype, argument="tensor")


def auto_backend(op: str, device_type: str, dtype: torch.dtype) -> str:
    """The backend ``auto`` picks for ``op`` on ``dtype`` tensors of device type ``device_type``."""
    return _resolve(op, AUTO, device_type, -1, str(dtype).removeprefix("torch."))


def resolve_backend(
    op: str, device: torch.device, dtype: torch.dtype = torch.float32, argument: str = "x",
) -> str:
    """The concrete backend to run public op ``op`` on ``dtype`` tensors of ``device``.

    ``argument`` names the input whose dtype ``dtype`` is, for the error raised when an
    explicitly requested backend does not compute the op in it.
    """
    index = -1 if device.index is None else device.index
    return _resolve(op, requested_backend(), device.type, index, str(dtype).removeprefix("torch."), argument)


def get_backend(name: str) -> ModuleType:
    """The module of an already resolved backend."""
    module, reason = _load(name)
    if module is None:
        raise RuntimeError(f"protoseg backend {name!r} is unavailable: {reason}")
    return module
