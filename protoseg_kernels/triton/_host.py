"""Host-side helpers shared by the Triton launchers: supported dtypes, the dot
precision, tensor views, and launching (or recording launches for the kernel report)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import triton
from torch import Tensor


def _interpreting() -> bool:
    knobs = getattr(triton, "knobs", None)
    if knobs is not None:
        return bool(knobs.runtime.interpret)
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on")  # Triton without knobs


# The kernels are jitted once, at import: interpreted if TRITON_INTERPRET=1 was set then.
INTERPRETING: bool = _interpreting()

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def check_dtype(op: str, name: str, t: Tensor) -> None:
    """float16, bfloat16 or float32 (float64 is served by the cpu and reference backends)."""
    if t.dtype not in SUPPORTED_DTYPES:
        raise TypeError(
            f"{op}: the triton backend takes {name} as float16, bfloat16 or float32, got {t.dtype}; "
            f"use the 'cuda', 'cpu' or 'reference' backend (pk.use_backend) for float64"
        )


def dot_precision(dtype: torch.dtype) -> dict[str, str]:
    """The PRECISION constexpr of the GEMM kernels: fp32 inputs follow
    ``torch.backends.cuda.matmul.allow_tf32``; 16-bit inputs always run on the tensor
    cores with fp32 accumulation (the setting does not apply to them)."""
    tf32 = dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32 and not INTERPRETING
    return {"PRECISION": "tf32" if tf32 else "ieee"}


def rows_view(t: Tensor) -> Tensor:
    """A [C, K, D] prototype tensor as [C·K, D] (a view when the strides allow)."""
    return t.reshape(-1, t.shape[-1])


def empty_rows(n: int, d: int, like: Tensor) -> Tensor:
    """An fp32 [n, d] work buffer (gradient accumulators)."""
    return torch.empty(n, d, dtype=torch.float32, device=like.device)


@dataclass
class Launch:
    """One kernel launch: kernel[grid](*args, **kwargs)."""

    kernel: Any
    grid: tuple[int, ...]
    args: tuple[Any, ...]
    kwargs: dict[str, Any] = field(default_factory=dict)


_recorders: list[list[Launch]] = []


@contextlib.contextmanager
def recording_launches() -> Iterator[list[Launch]]:
    """Record launches instead of running them (for compiling them ahead of time:
    the backend is then called on meta tensors of the benchmark shapes)."""
    launches: list[Launch] = []
    _recorders.append(launches)
    try:
        yield launches
    finally:
        _recorders.pop()


def _flat(args: tuple[Any, ...]) -> Iterator[Any]:
    """The arguments with tuple arguments (``_columns.ColumnArgs``, an op's tuple) opened."""
    for a in args:
        if isinstance(a, tuple):
            yield from _flat(a)
        else:
            yield a


def launch(kernel: Any, grid: tuple[int, ...], *args: Any, **kwargs: Any) -> None:
    """Run ``kernel[grid](*args, **kwargs)`` on the device of its tensors (a no-op on an
    empty grid), or record it inside :func:`recording_launches`."""
    if _recorders:
        _recorders[-1].append(Launch(kernel, grid, args, kwargs))
        return
    if min(grid) == 0:
        return
    device = next(a.device for a in _flat(args) if isinstance(a, Tensor))
    guard = torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()
    with guard:
        kernel[grid](*args, **kwargs)


def recording() -> bool:
    return bool(_recorders)
