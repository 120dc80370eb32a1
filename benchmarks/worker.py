"""Measure implementations in a fresh process.

Two ways to run:

* ``python -m benchmarks.worker JOBS_JSON OUT_JSON``: each job in turn, whole (build the
  inputs, warm up, time every case, profile it: host synchronisations, allocator memory;
  when the process runs a single job, its resident-set growth last, on a CPU); writes the
  rows to OUT_JSON. The smoke suite batches its jobs into one such process to stay fast,
  and then reports no RSS.
* ``python -m benchmarks.worker --serve JOB_JSON``: one job held by a persistent process
  that the alternation driver (benchmarks/alternation.py) steps through warm-up, rounds of
  timed runs and the final profile, interleaved with the other implementations of the
  same problem, each in its own process: the memory numbers stay independent (no
  allocator state, compiled graphs or BLAS buffers carried over from another
  implementation) and a load spike lands on every implementation's rounds alike.

A failing case gives a row with ``status`` "error: ..." instead of stopping the suite.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from . import contrast_cases, contrast_step, flops, hssn_cases, implementations, measure, op_cases
from .measure import Case, TimingPlan
from .problems import Problem, make_head_inputs
from .step import HeadConfig

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
HEAD, OPS, FLOOR, CONTRAST, STEP = "head", "ops", "floor", "contrast", "contrast_step"
HIERARCHY = "hierarchy"
HEAD_OP, HEAD_MODE = "head_step", "step"


@dataclass(frozen=True)
class Job:
    group: str  # HEAD, OPS, FLOOR, CONTRAST, STEP or HIERARCHY
    problem: Problem
    impl: str
    device: str = "cpu"
    dtype: str = "float32"
    plan: TimingPlan = TimingPlan()
    seed: int = 0
    threads: int | None = None  # torch intra-op threads; None: torch's default
    tf32: bool = False  # CUDA matmuls in TF32 (torch.backends.cuda.matmul.allow_tf32)

    @staticmethod
    def from_dict(raw: dict[str, Any]) -> Job:
        fields = dict(raw, problem=Problem(**raw["problem"]), plan=TimingPlan(**raw["plan"]))
        return Job(**fields)


def _base_row(job: Job, op: str, mode: str) -> dict[str, Any]:
    p = job.problem
    return {
        "group": job.group, "preset": p.name, "n": p.n, "d": p.d, "c": p.c, "k": p.k, "m": p.m,
        "contrast": p.contrast, "op": op, "mode": mode, "impl": job.impl, "device": job.device, "dtype": job.dtype,
    }


def failure_row(job: Job, status: str) -> dict[str, Any]:
    """The one row of a job whose process failed as a whole (crashed, hung, never replied)."""
    return dict(_base_row(job, "-", "-"), status=status)


def _cases(job: Job) -> list[tuple[str, str, Case]]:
    """(op, mode, case) of every row of the job."""
    device = torch.device(job.device)
    backend = implementations.backend_of(job.impl)
    if job.group == STEP:
        return contrast_step.cases(backend, job.problem, device, DTYPES[job.dtype], job.seed)
    if job.group == HIERARCHY:
        return hssn_cases.cases(backend, job.problem, device, DTYPES[job.dtype], job.seed)
    if job.problem.contrast:
        return contrast_cases.cases(job.group == FLOOR, backend, job.problem, device, DTYPES[job.dtype], job.seed)
    inputs = make_head_inputs(job.problem, device, DTYPES[job.dtype], job.seed)
    config = HeadConfig()
    if job.group == HEAD:
        return [(HEAD_OP, HEAD_MODE, implementations.head_case(job.impl, inputs, config))]
    if job.group == FLOOR:
        return [("gemm", name, case) for name, case in implementations.floor_cases(inputs).items()]
    o = op_cases.make_op_inputs(inputs, seed=job.seed + 1)
    return [
        (op, mode, implementations.op_case(job.impl, op, mode, o, config))
        for op in op_cases.NAIVE
        for mode in op_cases.op_modes(op)
    ]


def _flops(job: Job, op: str, mode: str) -> int | None:
    if job.group in (STEP, HIERARCHY):  # no FLOP count: sampling, bookkeeping, element-wise work
        return None
    if job.problem.contrast:
        return contrast_cases.flops(job.problem) if job.group != FLOOR else None
    if op == HEAD_OP:
        return flops.head_step_flops(job.problem)
    if op == "gemm":
        return None if mode == flops.HEAD_FLOOR else flops.similarity_flops(job.problem)
    return flops.op_flops(op, mode, job.problem)


def _measure(job: Job, op: str, mode: str, case: Case, seconds: list[float],
             round_medians: list[float]) -> dict[str, Any]:
    """The row of one case from its timed runs, then its profile (syncs, memory)."""
    device = torch.device(job.device)
    row = _base_row(job, op, mode)
    timing = measure.summarize(seconds)
    row.update(dataclasses.asdict(timing), round_medians_ms=round_medians, flops=_flops(job, op, mode),
               status="ok")
    if job.group == FLOOR:
        return row
    profiled = measure.profile_case(case, device)
    row.update(host_syncs=profiled.host_syncs, allocated_bytes=profiled.allocated_bytes)
    if device.type == "cuda":
        row.update(peak_bytes=measure.cuda_peak_bytes(case, device),
                   cuda_sync_calls=measure.cuda_sync_calls(case, device))
    else:
        row.update(peak_bytes=profiled.peak_bytes)
    return row


def _error_row(job: Job, op: str, mode: str, exc: BaseException) -> dict[str, Any]:
    row = _base_row(job, op, mode)
    last = traceback.format_exception_only(type(exc), exc)[-1].strip()
    row.update(status=f"error: {last}")
    return row


class JobSession:
    """One job's cases, timed in rounds: ``warm_up()``, ``timed_round()`` as often as the
    plan's rounds (the alternation driver interleaves other processes' rounds between
    them), then ``finish()`` for the rows. A failing case becomes an error row and is
    left out of the later steps."""

    def __init__(self, job: Job) -> None:
        self.job = job
        self.device = torch.device(job.device)
        if job.threads is not None:
            torch.set_num_threads(job.threads)
        torch.backends.cuda.matmul.allow_tf32 = job.tf32
        torch.backends.cudnn.allow_tf32 = job.tf32
        self.cases: list[tuple[str, str, Case]] = []
        self.errors: dict[int, dict[str, Any]] = {}
        self.setup_error: dict[str, Any] | None = None
        try:
            self.cases = _cases(job)
        except Exception as exc:  # report, do not crash the suite
            self.setup_error = _error_row(job, "setup", "-", exc)
        self.seconds: list[list[float]] = [[] for _ in self.cases]
        self.round_medians: list[list[float]] = [[] for _ in self.cases]
        self.round_windows: list[tuple[float, float]] = []  # wall-clock (start, end) of each round

    def _each_case(self, step: Callable[[int, Case], None]) -> None:
        for i, (op, mode, case) in enumerate(self.cases):
            if i in self.errors:
                continue
            try:
                step(i, case)
            except Exception as exc:
                self.errors[i] = _error_row(self.job, op, mode, exc)

    def warm_up(self) -> None:
        self._each_case(lambda i, case: measure.warm_up(case, self.device, self.job.plan))

    def timed_round(self) -> list[float]:
        """One round of every case; returns the cases' medians of the round in ms."""
        def step(i: int, case: Case) -> None:
            seconds = measure.timed_round(case, self.device, self.job.plan)
            self.seconds[i] += seconds
            self.round_medians[i].append(measure.summarize(seconds).median_ms)

        start = time.time()
        self._each_case(step)
        self.round_windows.append((start, time.time()))
        return [self.round_medians[i][-1] for i in range(len(self.cases)) if i not in self.errors]

    def finish(self, measure_rss: bool) -> list[dict[str, Any]]:
        if self.setup_error is not None:
            return [self.setup_error]
        rows: list[dict[str, Any]] = []
        for i, (op, mode, case) in enumerate(self.cases):
            if i not in self.errors:
                try:
                    rows.append(_measure(self.job, op, mode, case, self.seconds[i], self.round_medians[i]))
                    rows[-1]["round_windows_s"] = self.round_windows
                    continue
                except Exception as exc:
                    self.errors[i] = _error_row(self.job, op, mode, exc)
            rows.append(self.errors[i])
        if implementations.backend_of(self.job.impl) == "cpu":  # which kernel level ran
            from protoseg_kernels._compiled import cpu

            for row in rows:
                row["cpu_level"] = cpu.CPU_LEVEL
        if measure_rss and self.job.device == "cpu" and self.job.group != FLOOR:
            # Last: it switches the process's malloc to return large blocks at once.
            for row, (_, _, case) in zip(rows, self.cases):
                if row["status"] == "ok":
                    row["rss_bytes"] = measure.rss_peak_bytes(case)
        return rows


def run_job(job: Job, measure_rss: bool) -> list[dict[str, Any]]:
    """The whole job at once: warm-up and its rounds back to back."""
    session = JobSession(job)
    session.warm_up()
    for _ in range(job.plan.rounds):
        session.timed_round()
    return session.finish(measure_rss)


def jobs_to_json(jobs: list[Job]) -> str:
    return json.dumps([dataclasses.asdict(job) for job in jobs])


def jobs_from_json(text: str) -> list[Job]:
    return [Job.from_dict(raw) for raw in json.loads(text)]


REPLY = "@@benchmarks-worker "  # marks the protocol's replies among other output


def _reply(payload: Any) -> None:
    print(REPLY + json.dumps(payload), flush=True)


def serve(job_json: str) -> None:
    """Hold one job and answer the alternation driver's commands, one per stdin line:
    ``warm_up``, ``round`` (replies the round's medians), ``finish`` (replies the rows,
    RSS included, and exits). Replies are single lines starting with ``REPLY``."""
    (job,) = jobs_from_json(job_json)
    session = JobSession(job)
    _reply("ready")
    for line in sys.stdin:
        command = line.strip()
        if command == "warm_up":
            session.warm_up()
            _reply("warm")
        elif command == "round":
            _reply(session.timed_round())
        elif command == "finish":
            _reply(session.finish(measure_rss=True))
            return
        else:
            raise SystemExit(f"benchmarks.worker: unknown command {command!r}")


def main(argv: list[str] | None = None) -> None:
    args = argv if argv is not None else sys.argv[1:]
    if args and args[0] == "--serve":
        serve(args[1])
        return
    jobs_json, out_path = args
    jobs = jobs_from_json(jobs_json)
    rows = [row for job in jobs for row in run_job(job, measure_rss=len(jobs) == 1)]
    with open(out_path, "w") as f:
        json.dump(rows, f)


if __name__ == "__main__":
    main()
