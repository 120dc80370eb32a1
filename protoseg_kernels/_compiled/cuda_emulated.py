"""The ``cuda_emulated`` backend (tests only): the CUDA kernel sources of
``csrc/cuda`` compiled by the host C++ compiler with the emulation header of
``csrc/emulation`` and run on CPU tensors (docs/spec.md §6). Slow by design."""

from __future__ import annotations

import torch

from . import bind_kernels

NAMESPACE = "protoseg_kernels_emulated"
_EXTENSION_PROBLEM, IMPLEMENTED = bind_kernels("_C_emulated", NAMESPACE, "CPU", globals())


def unavailable_reason() -> str | None:
    if _EXTENSION_PROBLEM:
        return ("not built: a test-only backend, built for the test suite by `make install` "
                "(PROTOSEG_BUILD_EMULATION=1 when building)")
    return None


def device_reason(device: torch.device) -> str | None:
    if device.type != "cpu":
        return f"the cuda_emulated backend runs CUDA kernels on CPU tensors only, got {device.type} tensors"
    return None
