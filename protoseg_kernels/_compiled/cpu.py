"""The ``cpu`` backend: fused C++ kernels of ``csrc/cpu`` on CPU tensors."""

from __future__ import annotations

import torch

from . import bind_kernels, has_kernel, load_extension

bind_kernels("protoseg", globals())


def unavailable_reason() -> str | None:
    _, reason = load_extension("_C")
    if reason:
        return reason
    if not has_kernel("protoseg", "class_scores_forward", "CPU"):
        return "protoseg_kernels._C was built without the CPU kernels; rebuild it"
    return None


def device_reason(device: torch.device) -> str | None:
    if device.type != "cpu":
        return (
            f"the cpu backend serves CPU tensors only; use backend 'auto', 'triton' or 'cuda' "
            f"for {device.type} tensors"
        )
    return None
