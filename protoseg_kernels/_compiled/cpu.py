"""The ``cpu`` backend: fused C++ kernels of ``csrc/cpu`` on CPU tensors."""

from __future__ import annotations

import torch

from . import NAMESPACE, bind_kernels

_EXTENSION_PROBLEM, IMPLEMENTED = bind_kernels("_C", NAMESPACE, "CPU", globals())


def unavailable_reason() -> str | None:
    if _EXTENSION_PROBLEM:
        return _EXTENSION_PROBLEM
    if not IMPLEMENTED.dtypes and not IMPLEMENTED.missing:
        return "protoseg_kernels._C was built without the CPU kernels; rebuild it"
    return None


def device_reason(device: torch.device) -> str | None:
    if device.type != "cpu":
        return (
            f"the cpu backend serves CPU tensors only; use backend 'auto', 'triton' or 'cuda' "
            f"for {device.type} tensors"
        )
    return None
