"""The ``triton`` backend: fused Triton kernels for CUDA tensors (docs/spec.md §4).

One module ``<op>.py`` per op it implements defines that op's kernels of the contract in
:mod:`protoseg_kernels._kernel_interface` (the op table, :mod:`protoseg_kernels._op_table`,
finds them there). Shared: the similarity engine on columns [M, D] with optional labels
(``_columns``, ``_tiles`` device helpers, ``_sweep`` the forward row sweep,
``_similarity_grads`` the backward GEMMs), ``_norms``, ``_config`` (block sizes) and
``_host`` (launching).

The kernels serve CUDA tensors (compute capability 8.0+), in float16, bfloat16 and
float32 (``IMPLEMENTED`` says so per op: ``auto`` passes float64 on to another backend).
With ``TRITON_INTERPRET=1`` set before this package is imported, Triton interprets them
on the CPU instead: the backend then also serves CPU tensors, which is how the test suite
runs every kernel without a GPU (slowly: for tests only).
"""

from __future__ import annotations

import torch

from .._op_table import Implemented, collect_python_kernels

MIN_CAPABILITY = (8, 0)

try:
    import triton  # noqa: F401
except Exception as exc:  # a broken install may fail in any way
    _IMPORT_PROBLEM: str | None = (
        f"triton cannot be imported ({type(exc).__name__}: {exc}); install it with "
        f"`pip install triton` (Linux, CUDA GPUs)"
    )
    IMPLEMENTED = Implemented()
else:
    _IMPORT_PROBLEM = None
    from ._host import INTERPRETING, SUPPORTED_DTYPES

    IMPLEMENTED = collect_python_kernels(__name__, globals(), frozenset(SUPPORTED_DTYPES))


def unavailable_reason() -> str | None:
    return _IMPORT_PROBLEM


def device_reason(device: torch.device) -> str | None:
    """Why the kernels cannot run on ``device`` tensors, or None."""
    if _IMPORT_PROBLEM is not None:
        return _IMPORT_PROBLEM
    if device.type == "cpu":
        if INTERPRETING:
            return None
        return ("the triton backend runs on CUDA tensors; CPU tensors only under the Triton interpreter "
                "(TRITON_INTERPRET=1 set before importing protoseg_kernels, for tests). "
                "Use the 'cpu' or 'reference' backend for CPU tensors")
    if device.type != "cuda":
        return f"the triton backend runs on CUDA tensors, not {device.type}"
    if INTERPRETING:
        return None
    if not torch.cuda.is_available():
        return "no CUDA device is available"
    capability = torch.cuda.get_device_capability(device)
    if capability < MIN_CAPABILITY:
        return (f"the triton backend needs a GPU of compute capability {MIN_CAPABILITY[0]}.{MIN_CAPABILITY[1]} "
                f"or newer, this one has {capability[0]}.{capability[1]}; use the 'cuda' backend")
    return None
