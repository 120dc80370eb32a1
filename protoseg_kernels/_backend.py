"""Backend registry and selection (SPEC §4).

A backend is a module implementing the kernel contract of
:mod:`protoseg_kernels._kernel_interface` plus two functions:

* ``unavailable_reason() -> str | None``: why the backend cannot be used at all
  in this process (missing package or extension), with the fix; ``None`` if usable.
* ``device_reason(device) -> str | None``: why it cannot serve tensors on
  ``device``; ``None`` if it can.

and optionally ``dtype_reason(dtype) -> str | None`` when it serves only some
floating dtypes (triton: no float64).

Selection: ``use_backend(name)`` (innermost wins) overrides the environment
variable ``PROTOSEG_BACKEND``, which overrides ``"auto"``. ``auto`` picks, for
CUDA tensors, triton, else cuda, else reference; for CPU tensors, cpu, else
reference; skipping a backend that does not compute in the inputs' dtype (float64
CUDA tensors go to cuda). A backend named explicitly that cannot serve the device
raises ``RuntimeError``; one that cannot take the dtype, the op's ``TypeError``.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import os
from collections.abc import Iterator
from types import ModuleType

import torch

ENV_VAR = "PROTOSEG_BACKEND"
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

_override_stack: list[str] = []


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
    once, at trace time.
    """
    _override_stack.append(_check_name(name, allow_auto=True))
    try:
        yield
    finally:
        _override_stack.pop()


def requested_backend() -> str:
    """The backend name asked for right now: use_backend, else $PROTOSEG_BACKEND, else auto."""
    if _override_stack:
        return _override_stack[-1]
    name = os.environ.get(ENV_VAR, AUTO).strip() or AUTO
    if name not in (AUTO,) + BACKEND_NAMES:
        raise RuntimeError(
            f"{ENV_VAR}={name!r} is not a backend; use one of {', '.join((AUTO,) + BACKEND_NAMES)}"
        )
    return name


def _serving_reason(name: str, device: torch.device) -> str | None:
    module, reason = _load(name)
    return reason if module is None else module.device_reason(device)


def _dtype_reason(name: str, dtype_name: str) -> str | None:
    module, reason = _load(name)
    if module is None:
        return reason
    check = getattr(module, "dtype_reason", None)
    return None if check is None else check(getattr(torch, dtype_name))


@torch.compiler.assume_constant_result
def _resolve(requested: str, device_type: str, device_index: int, dtype_name: str) -> str:
    device = torch.device(device_type, device_index) if device_index >= 0 else torch.device(device_type)
    if requested == AUTO:
        for name in _AUTO_ORDER.get(device_type, ("reference",)):
            if _serving_reason(name, device) is None and _dtype_reason(name, dtype_name) is None:
                return name
        return "reference"
    reason = _serving_reason(requested, device)
    if reason is not None:
        raise RuntimeError(f"protoseg backend {requested!r} cannot run on {device} tensors: {reason}")
    return requested


def resolve_backend(device: torch.device, dtype: torch.dtype = torch.float32) -> str:
    """The concrete backend to run an op on ``dtype`` tensors of ``device``."""
    index = -1 if device.index is None else device.index
    return _resolve(requested_backend(), device.type, index, str(dtype).removeprefix("torch."))


def get_backend(name: str) -> ModuleType:
    """The module of an already resolved backend."""
    module, reason = _load(name)
    if module is None:
        raise RuntimeError(f"protoseg backend {name!r} is unavailable: {reason}")
    return module
