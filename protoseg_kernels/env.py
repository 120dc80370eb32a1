"""Environment report: ``python -m protoseg_kernels.env``.

Prints the versions of Python, torch, triton and CUDA, the build metadata of the
compiled extension, for every backend whether it can be used and, if not, why, and the
op × backend table: which backend implements which op in which dtypes (or why not), and
which backend ``auto`` picks for each op per device (docs/spec.md §4).
"""

from __future__ import annotations

import json
import platform
import sys
from typing import Any

import torch

from . import __version__
from ._backend import (
    BACKEND_NAMES,
    ENV_VAR,
    auto_backend,
    get_backend,
    implemented,
    op_reason,
    requested_backend,
    unavailable_reason,
)
from ._compiled import build_info, build_mismatch
from ._op_table import DTYPE_NAMES, OPS


def _triton_version() -> str:
    try:
        import triton
    except Exception as exc:  # any import failure is worth reporting, not raising
        return f"not importable ({type(exc).__name__}: {exc})"
    return triton.__version__


def collect() -> dict[str, Any]:
    """The report as a dict (also used by the benchmarks to stamp their results)."""
    return {
        "protoseg_kernels": __version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "machine": platform.machine(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "cuda_devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
        "triton": _triton_version(),
        "threads": torch.get_num_threads(),
        "requested_backend": _requested(),
        "backends": {name: backend_status(name) for name in BACKEND_NAMES},
        "ops": op_table(),
        "extension_build": build_info() or "not built",
        "extension_matches_torch": build_mismatch() or ("yes" if build_info() else "not built"),
        "cpu_kernel_level": _cpu_kernel_level(),
    }


def _cpu_kernel_level() -> str:
    from ._compiled import cpu

    return cpu.level_report()


def _requested() -> str:
    try:
        return f"{requested_backend()} (set by use_backend or ${ENV_VAR})"
    except RuntimeError as exc:  # a bad $PROTOSEG_BACKEND: report it, the ops will raise it
        return f"invalid: {exc}"


def backend_status(name: str) -> str:
    """"available for <devices> tensors" (among this machine's devices), "loaded" and why it
    serves none of them, or why the backend cannot run here at all."""
    reason = unavailable_reason(name)
    if reason is not None:
        return reason
    module = get_backend(name)
    present = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    served = [device for device in present if module.device_reason(torch.device(device)) is None]
    if served:
        return f"available for {' and '.join(served)} tensors"
    return f"loaded, but no device here it serves ({module.device_reason(torch.device('cuda'))})"


def _served(name: str, op: str) -> str:
    """The dtypes backend ``name`` computes ``op`` in, or why it does not."""
    reason = op_reason(name, op)
    if reason is not None:
        return f"no: {reason}"
    dtypes = implemented(name).dtypes[op]
    return " ".join(short for dtype, short in DTYPE_NAMES.items() if dtype in dtypes)


def _auto_choice(op: str, device_type: str) -> str:
    """The backend auto picks for ``op`` on ``device_type`` tensors, per dtype where it differs."""
    picks = {short: auto_backend(op, device_type, dtype) for dtype, short in DTYPE_NAMES.items()}
    common = max(set(picks.values()), key=list(picks.values()).count)
    others = ", ".join(f"{short}: {name}" for short, name in picks.items() if name != common)
    return f"{common} ({others})" if others else common


def op_table() -> dict[str, dict[str, str]]:
    """Per op of the table: its spec section, per backend the dtypes it serves (or why
    not), and auto's choice on CPU tensors (and CUDA tensors, with a GPU)."""
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    table = {}
    for op in OPS:
        row = {"spec": op.spec}
        row |= {name: _served(name, op.name) for name in BACKEND_NAMES}
        row |= {f"auto ({device})": _auto_choice(op.name, device) for device in devices}
        table[op.name] = row
    return table


def _print_op_table(table: dict[str, dict[str, str]]) -> None:
    """One line per op and backend (an unavailable backend's reason is printed once, above)."""
    print("op × backend (input dtypes computed, or why not):")
    width = max(len(column) for row in table.values() for column in row) + 2
    for op, row in table.items():
        print(f"  {op} ({row['spec']})")
        for column, text in row.items():
            if column == "spec":
                continue
            if column in BACKEND_NAMES and unavailable_reason(column):
                text = "unavailable (see backends)"
            print(f"    {column:<{width}}{text}")


def main() -> None:
    report = collect()
    ops = report.pop("ops")
    width = max(len(k) for k in report)
    for key, value in report.items():
        if isinstance(value, dict):
            print(f"{key}:")
            for sub, text in value.items():
                shown = json.dumps(text) if not isinstance(text, str) else text
                print(f"  {sub:<{width}} {shown}")
        else:
            print(f"{key:<{width}} {value}")
    _print_op_table(ops)


if __name__ == "__main__":
    main()
