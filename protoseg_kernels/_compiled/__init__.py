"""The compiled backends (``cpu``, ``cuda``, ``cuda_emulated``) share one adapter.

The C++ extension registers one schema per kernel of the contract in
:mod:`protoseg_kernels._kernel_interface`, named ``<namespace>::_<kernel>`` with
the same arguments, and implementations per dispatch key (CPU kernels in
``csrc/cpu``, CUDA kernels in ``csrc/cuda``). The host-emulation build of the
CUDA sources registers the same schemas in namespace ``protoseg_emulated`` for
CPU tensors. This module loads an extension and binds its kernels as module
functions of a backend.
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

REBUILD_HINT = "rebuild it with `pip install --no-build-isolation -e .` (see README, 'Install')"
BUILD_INFO = Path(__file__).resolve().parent.parent / "_build_info.json"

# Kernels whose last output is d_prototypes: an empty tensor there means "not asked".
_WITH_PROTOTYPE_GRAD = ("similarity_backward", "class_scores_backward", "ppc_ppd_backward")
KERNEL_NAMES = (
    "similarity_forward", "similarity_backward",
    "class_scores_forward", "class_scores_backward",
    "ppc_ppd_forward", "ppc_ppd_backward",
    "sinkhorn_logits", "sinkhorn_class_logsumexp", "sinkhorn_marginals", "sinkhorn_finalize",
    "prototype_sums", "momentum_update",
)


@cache
def load_extension(module_name: str) -> tuple[ModuleType | None, str | None]:
    """Import ``protoseg_kernels.<module_name>``; (module, None) or (None, reason)."""
    try:
        return importlib.import_module(f"protoseg_kernels.{module_name}"), None
    except ImportError as exc:
        return None, (
            f"the compiled extension protoseg_kernels.{module_name} is missing or failed to import "
            f"({exc}); {REBUILD_HINT}"
        )


def build_info() -> dict[str, Any]:
    """Metadata recorded by setup.py when the extension was built ({} if never built)."""
    try:
        return json.loads(BUILD_INFO.read_text())
    except (OSError, ValueError):
        return {}


def has_kernel(namespace: str, kernel: str, dispatch_key: str) -> bool:
    name = f"{namespace}::_{kernel}"
    return torch._C._dispatch_has_kernel_for_dispatch_key(name, dispatch_key)


def _contiguous(arg: Any) -> Any:
    return arg.contiguous() if isinstance(arg, torch.Tensor) else arg


def _bind(namespace: str, kernel: str) -> Callable[..., Any]:
    def call(*args: Any) -> Any:
        op = getattr(getattr(torch.ops, namespace), f"_{kernel}")
        out = op(*(_contiguous(a) for a in args))
        if kernel in _WITH_PROTOTYPE_GRAD:
            grad_x, grad_p = out
            return grad_x, (grad_p if args[-1] else None)
        return out

    call.__name__ = kernel
    call.__doc__ = f"Calls torch.ops.{namespace}._{kernel} (see protoseg_kernels._kernel_interface)."
    return call


def bind_kernels(namespace: str, module_globals: dict[str, Any]) -> None:
    """Define every kernel of the contract as a function of the calling backend module."""
    for kernel in KERNEL_NAMES:
        module_globals[kernel] = _bind(namespace, kernel)
