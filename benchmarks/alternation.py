"""Time the implementations of a problem in alternation, each in its own persistent process.

Run one after another, two implementations see different machines: a load spike during
one of them lands on one side of every ratio (a naive step timed at 2,260 ms instead of
144 ms under load gave a "17.9× speed-up"). Here all the jobs of one problem (the GEMM
floor, the naive baseline, torch.compile, each backend; head step and per-op rows) get a
worker process each (``python -m benchmarks.worker --serve``), started together; the
driver warms them up one at a time, then runs the plan's rounds round-robin, one process
at a time, the starting process rotating each round, measuring the machine's foreign load
during each round (benchmarks/load.py); last, one at a time, each profiles its cases and
measures its memory and sends its rows. A process that dies or hangs gives error rows for
its job; the others go on.
"""

from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from protoseg_kernels._compiled.cpu_levels import ENV_CAPABILITY

from . import load
from .implementations import cpu_level_of
from .worker import REPLY, Job, failure_row, jobs_to_json

REPO_ROOT = Path(__file__).resolve().parent.parent
Row = dict[str, Any]
RoundReport = Callable[[int, int, list[Job], list[list[float] | None], dict[str, Any]], None]
_EXITED = object()


class WorkerFailed(RuntimeError):
    pass


class WorkerProcess:
    """A ``benchmarks.worker --serve`` process for one job, and its command channel."""

    def __init__(self, job: Job) -> None:
        self.job = job
        self._stderr = tempfile.TemporaryFile(mode="w+")
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        level = cpu_level_of(job.impl)
        if level is not None:
            env[ENV_CAPABILITY] = level
        self._process = subprocess.Popen(
            [sys.executable, "-m", "benchmarks.worker", "--serve", jobs_to_json([job])], cwd=REPO_ROOT, env=env,
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._stderr, text=True)
        self._replies: queue.Queue = queue.Queue()
        threading.Thread(target=self._read_replies, daemon=True).start()
        self.failure: str | None = None

    @property
    def pid(self) -> int:
        return self._process.pid

    def _read_replies(self) -> None:
        assert self._process.stdout is not None
        for line in self._process.stdout:  # other output (library prints) is not a reply
            if line.startswith(REPLY):
                self._replies.put(json.loads(line[len(REPLY):]))
        self._replies.put(_EXITED)

    def _last_error_line(self) -> str:
        self._stderr.seek(0)
        lines = self._stderr.read().strip().splitlines()
        return lines[-1] if lines else "no output"

    def ask(self, command: str | None, timeout_s: float) -> Any:
        """Send ``command`` (None: only wait for the next reply) and return the reply."""
        if self.failure is not None:
            raise WorkerFailed(self.failure)
        try:
            if command is not None:
                assert self._process.stdin is not None
                self._process.stdin.write(command + "\n")
                self._process.stdin.flush()
            reply = self._replies.get(timeout=timeout_s)
        except queue.Empty:
            self.close()
            self.failure = f"error: timed out after {timeout_s:.0f} s"
            raise WorkerFailed(self.failure) from None
        except (BrokenPipeError, OSError):
            reply = _EXITED
        if reply is _EXITED:
            code = self._process.wait()
            self.failure = f"error: worker exited with {code}: {self._last_error_line()}"
            raise WorkerFailed(self.failure)
        return reply

    def close(self) -> None:
        if self._process.poll() is None:
            self._process.kill()
        self._process.wait()
        self._stderr.close()


def _try(worker: WorkerProcess, command: str | None, timeout_s: float) -> Any:
    try:
        return worker.ask(command, timeout_s)
    except WorkerFailed:
        return None


def run_alternating(jobs: list[Job], timeout_s: float,
                    on_round: RoundReport | None = None) -> tuple[list[Row], list[dict[str, Any]]]:
    """The rows of ``jobs`` (one problem's), timed in alternation (module docstring), and the
    load record of each round (benchmarks/load.py). Every row gains ``round_foreign_cores``:
    the foreign load of each round, in cores."""
    workers = [WorkerProcess(job) for job in jobs]  # all start (import, inputs) together
    try:
        for w in workers:
            _try(w, None, timeout_s)  # "ready"
        for w in workers:  # one at a time: compilation and autotuning see a quiet machine
            _try(w, "warm_up", timeout_s)
        meter = load.LoadMeter(lambda: [w.pid for w in workers if w.failure is None])
        rounds = max(job.plan.rounds for job in jobs)
        records = []
        for r in range(rounds):
            order = workers[r % len(workers):] + workers[:r % len(workers)]
            meter.start()
            medians = {id(w): _try(w, "round", timeout_s) for w in order}
            records.append(meter.stop())
            if on_round is not None:
                on_round(r + 1, rounds, jobs, [medians[id(w)] for w in workers], records[-1])
        rows: list[Row] = []
        for w in workers:
            got = _try(w, "finish", timeout_s)
            rows += got if got is not None else [failure_row(w.job, w.failure or "error: no rows")]
    finally:
        for w in workers:
            w.close()
    foreign = [record["foreign_cores"] for record in records]
    for row in rows:
        row["round_foreign_cores"] = foreign
    return rows, records


def problem_sets(jobs: list[Job]) -> list[list[Job]]:
    """The jobs grouped by problem, in the order their problems first appear."""
    sets: dict[tuple, list[Job]] = {}
    for job in jobs:
        sets.setdefault(job.problem.key, []).append(job)
    return list(sets.values())
