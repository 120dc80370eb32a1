"""The ``cuda`` backend: CUDA C++ kernels of ``csrc/cuda`` on CUDA tensors."""

from __future__ import annotations

import torch

from . import NAMESPACE, bind_kernels, rebuild_hint

_EXTENSION_PROBLEM, IMPLEMENTED = bind_kernels("_C", NAMESPACE, "CUDA", globals())


def unavailable_reason() -> str | None:
    if torch.version.cuda is None:  # no toolkit advice helps here
        return (f"this torch ({torch.__version__}) is a CPU-only build; the cuda backend needs a CUDA build "
                "of torch (and the package rebuilt against it)")
    if _EXTENSION_PROBLEM:
        return _EXTENSION_PROBLEM
    if not IMPLEMENTED.dtypes and not IMPLEMENTED.missing:
        return (
            "protoseg_kernels._C was built without CUDA kernels (no CUDA toolkit found at build "
            f"time, or PROTOSEG_SKIP_CUDA=1); set CUDA_HOME and {rebuild_hint()}"
        )
    return None


def device_reason(device: torch.device) -> str | None:
    if device.type != "cuda":
        return f"the cuda backend serves CUDA tensors only, got {device.type} tensors"
    if not torch.cuda.is_available():
        return "no CUDA device is available"
    return None
