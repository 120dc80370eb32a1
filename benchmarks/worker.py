"""Measure implementations in a fresh process.

``python -m benchmarks.worker JOBS_JSON OUT_JSON``: for each job, builds the
inputs, then for each case of the job times it, profiles it (host
synchronisations, allocator memory) and, when the process runs a single job,
measures its resident-set growth last (CPU). Writes the rows to OUT_JSON. A
failing case gives a row with ``status`` "error: ..." instead of stopping the
suite.

The suites run each implementation in its own process, which keeps the memory
numbers independent (no allocator state, compiled graphs or BLAS buffers
carried over from another implementation); the smoke suite batches its jobs
into one process to stay fast, and then reports no RSS.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import traceback
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


def _cases(job: Job) -> list[tuple[str, str, Case]]:
    """(op, mode, case) of every row of the job."""
    device = torch.device(job.device)
    backend = job.impl if implementations.is_backend(job.impl) else None
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


def _measure(job: Job, op: str, mode: str, case: Case) -> dict[str, Any]:
    device = torch.device(job.device)
    row = _base_row(job, op, mode)
    timing = measure.time_case(case, device, job.plan)
    row.update(dataclasses.asdict(timing), flops=_flops(job, op, mode), status="ok")
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


def run_job(job: Job, measure_rss: bool) -> list[dict[str, Any]]:
    if job.threads is not None:
        torch.set_num_threads(job.threads)
    torch.backends.cuda.matmul.allow_tf32 = job.tf32
    torch.backends.cudnn.allow_tf32 = job.tf32
    try:
        cases = _cases(job)
    except Exception as exc:  # report, do not crash the suite
        return [_error_row(job, "setup", "-", exc)]
    rows = []
    for op, mode, case in cases:
        try:
            rows.append(_measure(job, op, mode, case))
        except Exception as exc:
            rows.append(_error_row(job, op, mode, exc))
    if measure_rss and job.device == "cpu" and job.group != FLOOR:
        # Last: it switches the process's malloc to return large blocks at once.
        for row, (_, _, case) in zip(rows, cases):
            if row["status"] == "ok":
                row["rss_bytes"] = measure.rss_peak_bytes(case)
    return rows


def jobs_to_json(jobs: list[Job]) -> str:
    return json.dumps([dataclasses.asdict(job) for job in jobs])


def jobs_from_json(text: str) -> list[Job]:
    return [Job.from_dict(raw) for raw in json.loads(text)]


def main(argv: list[str] | None = None) -> None:
    jobs_json, out_path = argv if argv is not None else sys.argv[1:]
    jobs = jobs_from_json(jobs_json)
    rows = [row for job in jobs for row in run_job(job, measure_rss=len(jobs) == 1)]
    with open(out_path, "w") as f:
        json.dump(rows, f)


if __name__ == "__main__":
    main()
