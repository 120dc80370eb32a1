"""How a benchmark case is measured: time, host synchronisations, memory.

A *case* is a pair ``prepare() -> state`` (untimed: e.g. clearing gradients, or
the forward pass before a backward-only timing) and ``run(state)`` (measured).

* Time: wall clock of ``run`` after warm-up; on CUDA, CUDA events around it.
  The statistics are the median and the 20th/80th percentiles.
* Host synchronisations: ``run`` once under the PyTorch profiler and count the
  outermost calls of operators that make the host wait for the data
  (``item``/``bool``/``int`` via ``_local_scalar_dense``, ``nonzero`` — which
  boolean indexing calls —, ``unique``, ``masked_select``, ``equal``). Nested
  calls (``masked_select`` calling ``item``) count once. On a CPU nothing
  waits, but the same call is a device→host round trip on a GPU.
* Peak extra memory, two ways:
  - *allocator*: every tensor allocation and free during ``run`` as reported by
    PyTorch's allocator to the profiler; the peak of the running total, i.e. the
    most bytes held by tensors created during the step (inputs and anything
    alive before it are excluded). On CUDA, ``max_memory_allocated`` minus the
    memory allocated before ``run``.
  - *RSS* (CPU only): growth of the process's peak resident set during ``run``
    (``VmHWM`` reset through ``/proc/self/clear_refs``), with glibc told to hand
    large blocks straight back to the system, so that it also sees memory that
    does not go through PyTorch's allocator (BLAS buffers, C++ scratch).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile

SYNC_OPS = frozenset({
    "aten::_local_scalar_dense",
    "aten::nonzero",
    "aten::_unique",
    "aten::_unique2",
    "aten::unique_dim",
    "aten::unique_consecutive",
    "aten::unique_dim_consecutive",
    "aten::masked_select",
    "aten::equal",
})


@dataclass
class Case:
    prepare: Callable[[], Any]
    run: Callable[[Any], Any]


@dataclass(frozen=True)
class TimingPlan:
    """Warm-up runs, then at least ``min_runs`` and at most ``max_runs`` timed runs,
    stopping once ``target_seconds`` of timed runs are collected.

    With ``rounds`` > 1 the timed runs come in that many rounds, each with its share of
    the runs and seconds: the suites alternate the implementations of a problem round by
    round (benchmarks/alternation.py), so that a load spike lands on all of them. (The
    first run of a round may find caches the other processes evicted; the median over
    the rounds' runs absorbs it.)"""

    warmup: int = 2
    min_runs: int = 5
    max_runs: int = 30
    target_seconds: float = 3.0
    rounds: int = 1

    def round_share(self) -> tuple[int, int, float]:
        """(min runs, max runs, target seconds) of one round."""
        min_runs = -(-self.min_runs // self.rounds)
        return min_runs, max(min_runs, -(-self.max_runs // self.rounds)), self.target_seconds / self.rounds


@dataclass
class Timing:
    median_ms: float
    p20_ms: float
    p80_ms: float
    runs: int


def _percentile(sorted_values: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    position = q * (len(sorted_values) - 1)
    low = int(position)
    high = min(low + 1, len(sorted_values) - 1)
    return sorted_values[low] + (sorted_values[high] - sorted_values[low]) * (position - low)


def summarize(seconds: list[float]) -> Timing:
    values = sorted(s * 1e3 for s in seconds)
    return Timing(statistics.median(values), _percentile(values, 0.2), _percentile(values, 0.8), len(values))


def _time_once(case: Case, device: torch.device) -> float:
    state = case.prepare()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        case.run(state)
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    begin = time.perf_counter()
    case.run(state)
    return time.perf_counter() - begin


def warm_up(case: Case, device: torch.device, plan: TimingPlan) -> None:
    for _ in range(plan.warmup):
        _time_once(case, device)


def timed_round(case: Case, device: torch.device, plan: TimingPlan) -> list[float]:
    """The seconds of one round's timed runs."""
    min_runs, max_runs, target = plan.round_share()
    seconds: list[float] = []
    while len(seconds) < min_runs or (len(seconds) < max_runs and sum(seconds) < target):
        seconds.append(_time_once(case, device))
    return seconds


def _is_outermost_sync(event: Any) -> bool:
    if event.name not in SYNC_OPS:
        return False
    parent = event.cpu_parent
    while parent is not None:
        if parent.name in SYNC_OPS:
            return False
        parent = parent.cpu_parent
    return True


@dataclass
class ProfileResult:
    host_syncs: int
    peak_bytes: int  # most bytes held by tensors allocated during the run
    allocated_bytes: int  # total bytes allocated during the run


def _memory_stream(prof: profile, device_type: str) -> list[int]:
    """Signed sizes of the allocations (+) and frees (−) on ``device_type``, in order."""
    events = [
        e for e in prof.profiler.kineto_results.events()
        if e.name() == "[memory]" and e.device_type().name.lower() == device_type
    ]
    events.sort(key=lambda e: e.start_ns())  # stable: same-time events keep their order
    return [e.nbytes() for e in events]


def profile_case(case: Case, device: torch.device) -> ProfileResult:
    """Host synchronisations and allocator-tracked memory of one run."""
    state = case.prepare()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities, profile_memory=True) as prof:
        case.run(state)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    syncs = sum(1 for e in prof.events() if _is_outermost_sync(e))
    held = peak = allocated = 0
    for nbytes in _memory_stream(prof, device.type):
        held += nbytes
        peak = max(peak, held)
        allocated += max(nbytes, 0)
    return ProfileResult(syncs, peak, allocated)


def cuda_peak_bytes(case: Case, device: torch.device) -> int:
    """max_memory_allocated during one run, minus what was allocated before it."""
    state = case.prepare()
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    case.run(state)
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - before


def cuda_sync_calls(case: Case, device: torch.device) -> int:
    """Synchronising CUDA calls of one run, as flagged by torch's sync debug mode."""
    import warnings

    state = case.prepare()
    torch.cuda.synchronize(device)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            case.run(state)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum(1 for w in caught if "synchroniz" in str(w.message).lower())


# ---- RSS (CPU) -------------------------------------------------------------
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_SMALL_BLOCK = 128 * 1024


def _status_bytes(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{key} not in /proc/self/status")


@contextlib.contextmanager
def _glibc_returns_large_blocks():
    """Make glibc unmap every block ≥ 128 KiB on free and trim the heap now, so the
    resident set follows the live allocations. Changes the process for good:
    run it last."""
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    if not (libc.mallopt(_M_MMAP_THRESHOLD, _SMALL_BLOCK) and libc.mallopt(_M_TRIM_THRESHOLD, _SMALL_BLOCK)):
        raise OSError("mallopt refused the thresholds")
    libc.malloc_trim(0)
    yield


def physical_memory_bytes() -> int | None:
    """The machine's physical memory, or None where the OS does not say."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def rss_peak_bytes(case: Case) -> int | None:
    """Growth of the peak resident set during one run (Linux with glibc), else None."""
    try:
        with _glibc_returns_large_blocks():
            state = case.prepare()
            ctypes.CDLL(ctypes.util.find_library("c")).malloc_trim(0)
            before = _status_bytes("VmRSS:")
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # reset VmHWM to the current RSS
            case.run(state)
            return max(_status_bytes("VmHWM:") - before, 0)
    except (OSError, RuntimeError, AttributeError, TypeError):
        return None
