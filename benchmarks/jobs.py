"""Turn a suite into worker jobs and run them in fresh processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from . import alternation, contrast_cases, hssn_cases, load
from .alternation import REPO_ROOT
from .implementations import BASELINE, COMPILED, FLOOR
from .problems import Problem
from .suite import Suite
from .worker import CONTRAST, HEAD, HIERARCHY, OPS, STEP, Job, failure_row, jobs_to_json
from .worker import FLOOR as FLOOR_GROUP

JOB_TIMEOUT_S = 900
Row = dict[str, Any]
Progress = Callable[[int, int, Job, list[Row], float], None]


def _head_impls(backends: list[str], compiled: bool) -> list[str]:
    return [BASELINE] + ([COMPILED] if compiled else []) + backends


def plan_jobs(suite: Suite, backends: list[str], device: str, dtype: str, tf32: bool = False) -> list[Job]:
    """Every (group, problem, implementation) of the suite once, the GEMM floors first."""
    wanted: list[tuple[str, Problem, str]] = []
    for p in suite.presets:
        wanted += [(HEAD, p, impl) for impl in _head_impls(backends, suite.compile_presets)]
    for p in suite.sweep:
        wanted += [(HEAD, p, impl) for impl in _head_impls(backends, suite.compile_sweep)]
    for p in suite.ops:
        wanted += [(OPS, p, impl) for impl in [BASELINE] + backends]
    for p in suite.contrast:
        # The naive formula and the reference (the oracle, which builds the A×M logits and
        # masks too) only where their A×M tensors fit.
        fits = contrast_cases.naive_fits(p)
        impls = ([BASELINE] if fits else []) + [b for b in backends if fits or b != "reference"]
        wanted += [(CONTRAST, p, impl) for impl in impls]
    problems = list(dict.fromkeys(p for group, p, _ in wanted if group != STEP))
    for p in suite.contrast_step:  # whole training steps: no GEMM floor
        wanted += [(STEP, p, impl) for impl in [BASELINE] + backends]
    for p in suite.hierarchy:  # HSSN losses: no GEMM floor; the backends that implement the op
        wanted += [(HIERARCHY, p, impl) for impl in [BASELINE] + hssn_cases.fused_impls(p, backends)]
    wanted = [(FLOOR_GROUP, p, FLOOR) for p in problems] + wanted
    return [
        Job(group, p, impl, device, dtype, suite.plan, threads=suite.threads, tf32=tf32)
        for group, p, impl in dict.fromkeys(wanted)
    ]


GROUPS = (HEAD, OPS, CONTRAST, STEP, HIERARCHY)


def only_groups(planned: list[Job], groups: list[str]) -> list[Job]:
    """The jobs of ``groups``, and the GEMM floors of their problems."""
    kept = [job for job in planned if job.group in groups]
    problems = {job.problem for job in kept}
    return [job for job in planned if job in kept or (job.group == FLOOR_GROUP and job.problem in problems)]


def run_in_subprocess(jobs: list[Job], timeout_s: float = JOB_TIMEOUT_S) -> list[Row]:
    """Run ``jobs`` in one fresh Python process; failures become error rows."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "rows.json"
        cmd = [sys.executable, "-m", "benchmarks.worker", jobs_to_json(jobs), str(out)]
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        try:
            done = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                                  timeout=timeout_s * len(jobs))
        except subprocess.TimeoutExpired:
            return [failure_row(job, f"error: timed out after {timeout_s * len(jobs):.0f} s") for job in jobs]
        if done.returncode != 0 or not out.exists():
            lines = (done.stderr or done.stdout).strip().splitlines() or ["no output"]
            return [failure_row(job, f"error: worker exited with {done.returncode}: {lines[-1]}") for job in jobs]
        return json.loads(out.read_text())


def _rows_of(job: Job, rows: list[Row]) -> list[Row]:
    p = job.problem
    return [r for r in rows if r["group"] == job.group and r["impl"] == job.impl
            and (r["preset"], r["n"], r["d"], r["c"], r["k"], r.get("m", 0)) == p.key]


def run_jobs(jobs: list[Job], alternate: bool, on_done: Progress,
             on_round: alternation.RoundReport | None = None,
             on_start: Callable[[list[Job]], None] | None = None) -> tuple[list[Row], list[dict[str, Any]]]:
    """The rows of ``jobs`` and the load record of every round.

    ``alternate``: the jobs of each problem in alternation, each in its own persistent
    process (benchmarks/alternation.py); else all in one process, one after another.
    ``on_start`` hears of each problem's jobs before they start."""
    rows: list[Row] = []
    records: list[dict[str, Any]] = []
    done = 0
    if alternate:
        for batch in alternation.problem_sets(jobs):
            if on_start is not None:
                on_start(batch)
            start = time.perf_counter()
            batch_rows, batch_records = alternation.run_alternating(batch, JOB_TIMEOUT_S, on_round)
            records += batch_records
            rows, seconds = rows + batch_rows, (time.perf_counter() - start) / len(batch)
            for job in batch:
                done += 1
                on_done(done, len(jobs), job, _rows_of(job, batch_rows), seconds)
        return rows, records
    meter = load.LoadMeter(lambda: [])
    meter.start()
    start = time.perf_counter()
    rows = run_in_subprocess(jobs)
    records.append(meter.stop())
    seconds = (time.perf_counter() - start) / len(jobs)
    for job in jobs:
        done += 1
        on_done(done, len(jobs), job, _rows_of(job, rows), seconds)
    return rows, records
