"""The instruction-set levels the CPU kernels are built for, and which one a CPU runs.

The CPU kernels (csrc/cpu) are loops the compiler vectorises, so their speed depends on
the instructions they are compiled for, and a binary compiled for newer instructions
dies with SIGILL on an older CPU. A default build therefore compiles them once per level
into its own module, ``protoseg_kernels._cpu_<level>``, and the ``cpu`` backend loads the
best level the running CPU supports (docs/backends.md):

* ``baseline``: the compiler's default target (x86-64: SSE2), runs everywhere;
* ``avx2``: ``-march=x86-64-v3`` (AVX2, FMA, BMI1/2, F16C, LZCNT, MOVBE), x86-64 only;
* ``avx512``: ``-march=x86-64-v4`` (v3 and AVX-512 F/BW/CD/DQ/VL), x86-64 only.

``PROTOSEG_CPU_ARCH=<arch>`` at build time replaces them with one ``custom`` level built
with ``-march=<arch>`` (``native``: this machine only), loaded unconditionally.
``PROTOSEG_CPU_CAPABILITY=<level>`` at run time picks a lower built level (e.g. to test it).

This file imports nothing from the package: setup.py reads it by path, so that the build
and the loader share one list of levels.
"""

from __future__ import annotations

import os
import platform
from collections.abc import Callable, Iterable
from dataclasses import dataclass

CUSTOM = "custom"
ENV_CAPABILITY = "PROTOSEG_CPU_CAPABILITY"

# /proc/cpuinfo flags of the x86-64 micro-architecture levels (the psABI's definition).
_X86_64_V2 = frozenset({"cx16", "lahf_lm", "popcnt", "sse4_1", "sse4_2", "ssse3"})
_X86_64_V3 = _X86_64_V2 | {"avx", "avx2", "bmi1", "bmi2", "f16c", "fma", "abm", "movbe", "xsave"}
_X86_64_V4 = _X86_64_V3 | {"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"}


@dataclass(frozen=True)
class Level:
    name: str
    compile_flags: tuple[str, ...]  # added to the CPU kernels' compiler flags
    cpu_flags: frozenset[str]  # /proc/cpuinfo flags a CPU must show to run it
    torch_capabilities: frozenset[str]  # torch.backends.cpu.get_cpu_capability() values that imply it

    @property
    def module(self) -> str:
        return f"_cpu_{self.name}"


BASELINE = Level("baseline", (), frozenset(), frozenset())
X86_LEVELS = (
    BASELINE,
    Level("avx2", ("-march=x86-64-v3",), _X86_64_V3, frozenset({"AVX2", "AVX512"})),
    Level("avx512", ("-march=x86-64-v4",), _X86_64_V4, frozenset({"AVX512"})),
)


def is_x86_64(machine: str | None = None) -> bool:
    return (machine or platform.machine()).lower() in ("x86_64", "amd64")


def build_levels(custom_arch: str | None = None, machine: str | None = None) -> tuple[Level, ...]:
    """The levels a build compiles, lowest first: ``custom`` alone when an -march is given."""
    if custom_arch:
        return (Level(CUSTOM, (f"-march={custom_arch}",), frozenset(), frozenset()),)
    return X86_LEVELS if is_x86_64(machine) else (BASELINE,)


def cpuinfo_flags(path: str = "/proc/cpuinfo") -> frozenset[str] | None:
    """The flags of the first CPU in /proc/cpuinfo, or None where there is none (not Linux)."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        return None
    return frozenset()


def torch_capability() -> str | None:
    try:
        import torch

        return torch.backends.cpu.get_cpu_capability()
    except (ImportError, AttributeError, RuntimeError):
        return None


def supports(level: Level, flags: frozenset[str] | None, capability: str | None) -> bool:
    """Whether a CPU with these /proc/cpuinfo ``flags`` (None: unknown, then torch's
    ``capability`` decides) can run ``level``."""
    if level.name in (BASELINE.name, CUSTOM):
        return True
    if flags is not None:
        return level.cpu_flags <= flags
    return capability in level.torch_capabilities


def choose(built: Iterable[str], requested: str | None,
           runs: Callable[[str], bool]) -> tuple[str | None, str | None]:
    """(level, None) to load, or (None, why not). ``built``: the levels whose modules exist,
    ``requested``: PROTOSEG_CPU_CAPABILITY or None, ``runs(name)``: whether this CPU runs it."""
    built = list(built)
    if not built:
        return None, "no CPU kernel module (protoseg_kernels._cpu_<level>) was built"
    if requested:
        if requested not in built:
            return None, f"{ENV_CAPABILITY}={requested!r}: built levels are {', '.join(built)}"
        if not runs(requested):
            return None, f"{ENV_CAPABILITY}={requested!r}: this CPU lacks its instructions"
        return requested, None
    usable = [name for name in built if runs(name)]
    if not usable:
        return None, f"this CPU runs none of the built levels ({', '.join(built)})"
    return usable[-1], None


def level_order() -> tuple[str, ...]:
    """Every level name the loader may find, lowest first."""
    return tuple(level.name for level in X86_LEVELS) + (CUSTOM,)


def requested_level() -> str | None:
    return os.environ.get(ENV_CAPABILITY, "").strip() or None
