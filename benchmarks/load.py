"""How busy the machine was with other work while the benchmarks ran.

A ratio of two timings is only as good as the conditions of both: the alternation of
benchmarks/alternation.py spreads a load spike over every implementation of a problem,
and this module measures what is left to worry about. During each round it counts the
CPU time the whole machine spent busy (``/proc/stat``: user, nice, system, irq, softirq,
steal) minus the CPU time of the benchmark's own processes (``/proc/<pid>/stat``), and
reports the difference as *foreign load*, in cores. On a system without ``/proc`` the
foreign load is unknown (None) and only the load average is recorded.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

# A round is noisy when other work kept more than this share of the machine's cores busy.
NOISY_FOREIGN_SHARE = 0.1
# A row is unstable when its slowest round's median exceeds its fastest's by this factor.
UNSTABLE_ROUND_SPREAD = 1.25

_CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def machine_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def busy_ticks() -> int | None:
    """Clock ticks the machine's CPUs spent on anything but idling, since boot."""
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:9]]
    except (OSError, ValueError):
        return None
    user, nice, system, idle, iowait, irq, softirq, steal = fields + [0] * (8 - len(fields))
    return user + nice + system + irq + softirq + steal


def process_ticks(pid: int) -> int | None:
    """Clock ticks of CPU time of ``pid`` and its reaped children, or None once it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            text = f.read()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2:].split()  # after the command name, which may hold spaces
    return sum(int(v) for v in fields[11:15])  # utime, stime, cutime, cstime


def _ticks_of(pids: Iterable[int]) -> dict[int, int]:
    return {pid: t for pid in pids if (t := process_ticks(pid)) is not None}


@dataclass
class _Start:
    wall: float
    busy: int | None
    ours: dict[int, int]


class LoadMeter:
    """Foreign load over an interval: ``start()``, the work, then ``stop()`` for a record.

    ``pids`` gives the benchmark's own processes (this one is always included)."""

    def __init__(self, pids: Callable[[], Iterable[int]]) -> None:
        self._pids = pids
        self._start: _Start | None = None

    def _own_pids(self) -> set[int]:
        return {os.getpid(), *self._pids()}

    def start(self) -> None:
        self._start = _Start(time.perf_counter(), busy_ticks(), _ticks_of(self._own_pids()))

    def stop(self) -> dict[str, Any]:
        begin = self._start
        if begin is None:
            raise RuntimeError("LoadMeter.stop() before start()")
        seconds = time.perf_counter() - begin.wall
        busy = busy_ticks()
        ours_now = _ticks_of(begin.ours)
        foreign = None
        if begin.busy is not None and busy is not None and seconds > 0:
            ours = sum(ours_now.get(pid, t) - t for pid, t in begin.ours.items())
            foreign = max(busy - begin.busy - ours, 0) / _CLOCK_TICKS / seconds
        return {"seconds": round(seconds, 3), "foreign_cores": None if foreign is None else round(foreign, 3),
                "loadavg_1min": load_average()}


def load_average() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except (OSError, AttributeError):
        return None


def is_noisy(foreign_cores: float | None, cores: int) -> bool:
    """Whether a round's foreign load (None: unknown) exceeds the noise threshold."""
    return foreign_cores is not None and foreign_cores > NOISY_FOREIGN_SHARE * cores


def is_unstable(round_medians_ms: list[float]) -> bool:
    """Whether a row's rounds disagree by more than run-to-run noise explains."""
    return len(round_medians_ms) > 1 and max(round_medians_ms) > UNSTABLE_ROUND_SPREAD * min(round_medians_ms)


def summarize(records: list[dict[str, Any]], cores: int) -> dict[str, Any]:
    """The suite's load record: every round's, the worst, how many were noisy."""
    foreign = [r["foreign_cores"] for r in records if r.get("foreign_cores") is not None]
    return {
        "cores": cores,
        "rounds": len(records),
        "noisy_rounds": sum(is_noisy(r.get("foreign_cores"), cores) for r in records),
        "max_foreign_cores": max(foreign) if foreign else None,
        "noisy_threshold_cores": NOISY_FOREIGN_SHARE * cores,
        "records": records,
    }
