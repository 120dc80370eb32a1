"""Environment report: ``python -m protoseg_kernels.env``.

Prints the versions of Python, torch, triton and CUDA, the build metadata of the
compiled extension, and for every backend whether it can be used and, if not, why.
"""

from __future__ import annotations

import json
import platform
import sys
from typing import Any

import torch

from . import __version__
from ._backend import BACKEND_NAMES, ENV_VAR, requested_backend, unavailable_reason
from ._compiled import build_info


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
        "requested_backend": f"{requested_backend()} (set by use_backend or ${ENV_VAR})",
        "backends": {name: unavailable_reason(name) or "available" for name in BACKEND_NAMES},
        "extension_build": build_info() or "not built",
    }


def main() -> None:
    report = collect()
    width = max(len(k) for k in report)
    for key, value in report.items():
        if isinstance(value, dict):
            print(f"{key}:")
            for sub, text in value.items():
                shown = json.dumps(text) if not isinstance(text, str) else text
                print(f"  {sub:<{width}} {shown}")
        else:
            print(f"{key:<{width}} {value}")


if __name__ == "__main__":
    main()
