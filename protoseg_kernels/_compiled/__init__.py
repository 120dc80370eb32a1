"""The compiled backends (``cpu``, ``cuda``, ``cuda_emulated``) share one adapter.

The C++ extension defines one schema per kernel of the op table
(:mod:`protoseg_kernels._op_table`), named ``protoseg_kernels::<kernel>`` with the
arguments of :mod:`protoseg_kernels._kernel_interface`; each kernel source registers its
implementations for its dispatch key (``csrc/cpu``: CPU, ``csrc/cuda``: CUDA). The host
emulation build of the CUDA sources defines the same schemas in namespace
``protoseg_kernels_emulated`` and registers them for CPU tensors. This module loads an
extension and binds, as functions of a backend module, the kernels registered for the
backend's dispatch key, from which the backend's declaration (``IMPLEMENTED``) follows.
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Callable
from functools import cache
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

from .._op_table import FLOAT_DTYPES, KERNELS, Implemented, Kernel, implemented_from


def rebuild_hint() -> str:
    """How to rebuild the extension, for the way this package was installed."""
    root = Path(__file__).resolve().parents[2]
    if (root / "setup.py").is_file() and (root / "csrc").is_dir():  # a source checkout (editable)
        return (f"rebuild it in the source checkout: `pip install --no-build-isolation -e {root}` "
                "(or `make install` there; see README, 'Install')")
    return ("reinstall the package so that it compiles against this torch: "
            "`pip install --no-build-isolation --force-reinstall --no-deps protoseg-kernels` "
            "(from the same source; see README, 'Install')")


BUILD_INFO = Path(__file__).resolve().parent.parent / "_build_info.json"

NAMESPACE = "protoseg_kernels"  # the real extension's kernel schemas (the emulation's: cuda_emulated.py)


def running_torch() -> dict[str, Any]:
    """What an extension must have been built against to load into this process."""
    return {"torch": torch.__version__, "cxx11_abi": bool(torch._C._GLIBCXX_USE_CXX11_ABI),
            "torch_cuda": torch.version.cuda}


def build_mismatch(info: dict[str, Any] | None = None) -> str | None:
    """How the recorded build (``_build_info.json``) differs from the running torch, naming
    both sides; None when they match or nothing was recorded. An extension built against
    another torch either fails to import with an undefined symbol or, worse, imports and
    crashes on its first call, so it is refused before it is imported."""
    info = build_info() if info is None else info
    if not info:
        return None
    running = running_torch()
    differences = [f"{key} {info.get(key)!r} (built) vs {value!r} (running)"
                   for key, value in running.items() if key in info and info[key] != value]
    if not differences:
        return None
    return ("the compiled extension was built against another torch: " + "; ".join(differences)
            + f"; {rebuild_hint()}")


@cache
def load_extension(module_name: str) -> tuple[ModuleType | None, str | None]:
    """Import ``protoseg_kernels.<module_name>``; (module, None) or (None, reason). A build
    for another torch (version, C++ ABI, CUDA) is refused without importing it."""
    mismatch = build_mismatch()
    if mismatch is not None:
        return None, f"protoseg_kernels.{module_name}: {mismatch}"
    try:
        return importlib.import_module(f"protoseg_kernels.{module_name}"), None
    except ImportError as exc:
        return None, (
            f"the compiled extension protoseg_kernels.{module_name} is missing or failed to import "
            f"({exc}); {rebuild_hint()}"
        )


def build_info() -> dict[str, Any]:
    """Metadata recorded by setup.py when the extension was built ({} if never built)."""
    try:
        return json.loads(BUILD_INFO.read_text())
    except (OSError, ValueError):
        return {}


def has_kernel(namespace: str, kernel: str, dispatch_key: str) -> bool:
    """Whether the dispatcher has an implementation of ``<namespace>::<kernel>`` for ``dispatch_key``
    (False also when the extension defines no such schema, e.g. one built before the kernel)."""
    name = f"{namespace}::{kernel}"
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key(name, dispatch_key)
    except RuntimeError:  # "operator ... does not exist"
        return False


def _contiguous(arg: Any) -> Any:
    return arg.contiguous() if isinstance(arg, torch.Tensor) else arg


def _bind(namespace: str, kernel: Kernel) -> Callable[..., Any]:
    def call(*args: Any) -> Any:
        op = getattr(getattr(torch.ops, namespace), kernel.name)
        out = op(*(_contiguous(a) for a in args))
        if kernel.prototype_grad:
            grad_x, grad_p = out
            return grad_x, (grad_p if args[-1] else None)
        return out

    call.__name__ = kernel.name
    call.__doc__ = f"Calls torch.ops.{namespace}.{kernel.name} (see protoseg_kernels._kernel_interface)."
    return call


def bind_kernels(
    extension: str, namespace: str, dispatch_key: str, module_globals: dict[str, Any],
) -> tuple[str | None, Implemented]:
    """Load ``protoseg_kernels.<extension>`` and define, as functions of the calling backend
    module, the kernels of the op table it registered for ``dispatch_key`` in ``namespace``.

    Returns (why the extension cannot be used, or None; what the backend implements). The
    compiled kernels take every floating dtype.
    """
    _, reason = load_extension(extension)
    if reason is not None:
        return reason, Implemented()
    present = {name for name in KERNELS if has_kernel(namespace, name, dispatch_key)}
    for name in present:
        module_globals[name] = _bind(namespace, KERNELS[name])
    return None, implemented_from(present, FLOAT_DTYPES)
