"""The ``cpu`` backend: fused C++ kernels of ``csrc/cpu`` on CPU tensors.

The kernels live in one module per instruction-set level (``protoseg_kernels._cpu_<level>``,
cpu_levels.py); this loads the schemas (``_C``), then the best level the CPU runs.
"""

from __future__ import annotations

import importlib.util
from functools import cache

import torch

from .._op_table import Implemented
from . import NAMESPACE, bind_kernels, load_extension
from . import cpu_levels as levels


def built_levels() -> list[str]:
    return [name for name in levels.level_order()
            if importlib.util.find_spec(f"protoseg_kernels._cpu_{name}") is not None]


@cache
def _cpu_features() -> tuple[frozenset[str] | None, str | None]:
    """This CPU's /proc/cpuinfo flags, or (where there are none) torch's capability."""
    flags = levels.cpuinfo_flags()
    return flags, (levels.torch_capability() if flags is None else None)


def cpu_runs(name: str) -> bool:
    level = next((lv for lv in levels.X86_LEVELS if lv.name == name), levels.BASELINE)
    return levels.supports(level, *_cpu_features())


def _load() -> tuple[str | None, str | None, Implemented]:
    """(level, why the backend cannot be used or None, what it implements)."""
    _, reason = load_extension("_C")
    if reason is not None:
        return None, reason, Implemented()
    level, reason = levels.choose(built_levels(), levels.requested_level(), cpu_runs)
    if reason is not None:
        return None, f"the CPU kernels cannot be loaded: {reason}", Implemented()
    problem, implemented = bind_kernels(f"_cpu_{level}", NAMESPACE, "CPU", globals())
    return level, problem, implemented


CPU_LEVEL, _EXTENSION_PROBLEM, IMPLEMENTED = _load()


def level_report() -> str:
    """The level in use and why: what was built, what this CPU runs, what was asked for."""
    built = built_levels()
    runs = [name for name in built if cpu_runs(name)]
    asked = levels.requested_level()
    chosen = CPU_LEVEL or "none"
    return (f"{chosen} (built: {', '.join(built) or 'none'}; this CPU runs: {', '.join(runs) or 'none'}; "
            f"{levels.ENV_CAPABILITY}={asked or 'unset'})")


def unavailable_reason() -> str | None:
    if _EXTENSION_PROBLEM:
        return _EXTENSION_PROBLEM
    if not IMPLEMENTED.dtypes and not IMPLEMENTED.missing:
        return f"protoseg_kernels._cpu_{CPU_LEVEL} registered no CPU kernels; rebuild it"
    return None


def device_reason(device: torch.device) -> str | None:
    if device.type != "cpu":
        return (
            f"the cpu backend serves CPU tensors only; use backend 'auto', 'triton' or 'cuda' "
            f"for {device.type} tensors"
        )
    return None
