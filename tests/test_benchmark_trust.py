"""Benchmark ratios one can trust (docs/benchmarks.md, "How the numbers are protected").

* The implementations of a problem are timed in alternation, each in its own process:
  their rounds interleave in time, and a job that fails leaves the others' rows intact.
* The machine's foreign load is measured: CPU time of processes outside the benchmark
  counts, the benchmark's own does not.
* A time under the GEMM floor beyond the tolerance is invalid, never "met"; rows measured
  under load or with disagreeing rounds are marked, and so are the targets resting on them.
"""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from benchmarks import alternation, cli, flops, load, report
from benchmarks.implementations import BASELINE, FLOOR
from benchmarks.measure import TimingPlan
from benchmarks.suite import TINY, build_suite
from benchmarks.worker import FLOOR as FLOOR_GROUP
from benchmarks.worker import HEAD, Job

SPIN = "import time\nend = time.time() + {seconds}\nwhile time.time() < end: pass\n"


def _spin(seconds: float) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", SPIN.format(seconds=seconds)])


def _foreign_cores_while_spinning(count_as_ours: bool) -> float:
    spinner = _spin(1.5)
    meter = load.LoadMeter(lambda: [spinner.pid] if count_as_ours else [])
    time.sleep(0.2)  # past the interpreter's start
    meter.start()
    time.sleep(1.0)
    record = meter.stop()
    spinner.wait()
    assert record["seconds"] == pytest.approx(1.0, abs=0.3)
    return record["foreign_cores"]


@pytest.mark.skipif(load.busy_ticks() is None, reason="needs /proc/stat (Linux)")
def test_foreign_load_counts_other_processes_and_not_the_benchmarks_own():
    foreign = _foreign_cores_while_spinning(count_as_ours=False)
    ours = _foreign_cores_while_spinning(count_as_ours=True)
    assert foreign > 0.7, foreign  # one core spinning outside the benchmark
    assert foreign - ours > 0.6, (foreign, ours)


def test_noisy_and_unstable_rules():
    assert load.is_noisy(0.5, cores=2) and not load.is_noisy(0.1, cores=2)
    assert not load.is_noisy(None, cores=2)
    assert load.is_unstable([10.0, 13.0]) and not load.is_unstable([10.0, 12.0]) and not load.is_unstable([10.0])
    summary = load.summarize([{"foreign_cores": 0.0}, {"foreign_cores": 0.9}, {"foreign_cores": None}], cores=2)
    assert (summary["rounds"], summary["noisy_rounds"], summary["max_foreign_cores"]) == (3, 1, 0.9)
    assert cli._load_warning(summary).startswith("warning: other work kept the machine busy during 1 of 3 rounds")
    assert cli._load_warning(load.summarize([{"foreign_cores": 0.0}], cores=2)) is None


def _row(impl, ms, **extra):
    base = {"group": "head", "preset": "ade20k", "n": 8, "d": 2, "c": 3, "k": 2, "op": "head_step",
            "mode": "step", "impl": impl, "status": "ok", "median_ms": ms, "p20_ms": ms, "p80_ms": ms,
            "flops": 4e6, "peak_bytes": 100, "host_syncs": 0}
    return dict(base, **extra)


KEY = [("ade20k", 8, 2, 3, 2, 0)]


def _floor_target(rows):
    return next(t for t in report.check_targets(rows, KEY) if t["target"] == "time / GEMM floor")


@pytest.mark.parametrize("fused_ms, invalid", [(6.0, True), (8.9, True), (9.5, False), (12.0, False)])
def test_a_time_under_the_gemm_floor_is_invalid_not_met(fused_ms, invalid):
    floor = _row(FLOOR, 10.0, group="floor", op="gemm", mode=flops.HEAD_FLOOR)
    rows = report.derive([floor, _row(BASELINE, 40.0, peak_bytes=800), _row("cpu", fused_ms)], cores=2)
    cpu = next(r for r in rows if r["impl"] == "cpu")
    assert cpu["floor_invalid"] is invalid
    target = _floor_target(rows)
    assert target["invalid"] is invalid and (target["met"] is None) is invalid
    assert report.verdict(target) == ("INVALID" if invalid else "met")
    assert ("invalid (" in report._cells(cpu)[3]) is invalid


def test_rows_measured_under_load_or_with_disagreeing_rounds_are_marked():
    floor = _row(FLOOR, 10.0, group="floor", op="gemm", mode=flops.HEAD_FLOOR)
    quiet = {"round_medians_ms": [40.0, 41.0], "round_foreign_cores": [0.0, 0.05]}
    rows = report.derive([floor, _row(BASELINE, 40.0, peak_bytes=800, **quiet),
                          _row("cpu", 11.0, round_medians_ms=[11.0, 11.1], round_foreign_cores=[0.0, 1.2])],
                         cores=2)
    by_impl = {r["impl"]: r for r in rows}
    assert by_impl["cpu"]["noisy"] and not by_impl["cpu"]["unstable"] and by_impl["cpu"]["max_foreign_cores"] == 1.2
    assert not report.doubtful(by_impl[BASELINE])
    assert report._cells(by_impl["cpu"])[0] == "11.0" + report.DOUBT_MARK
    speedup = next(t for t in report.check_targets(rows, KEY) if t["target"] == "speed-up vs baseline")
    assert speedup["met"] and speedup["doubtful"] and report.verdict(speedup) == "met" + report.DOUBT_MARK
    steady = report.derive([floor, _row(BASELINE, 40.0, **quiet), _row("cpu", 11.0, **quiet)], cores=2)
    assert report.verdict(next(t for t in report.check_targets(steady, KEY)
                               if t["target"] == "speed-up vs baseline")) == "met"


def _tiny_job(group, impl, rounds):
    plan = TimingPlan(warmup=1, min_runs=2 * rounds, max_runs=2 * rounds, target_seconds=0.0, rounds=rounds)
    return Job(group, TINY, impl, plan=plan, threads=1)


def test_alternation_interleaves_the_rounds_of_each_implementation():
    jobs = [_tiny_job(FLOOR_GROUP, FLOOR, 3), _tiny_job(HEAD, BASELINE, 3), _tiny_job(HEAD, "cpu", 3)]
    reported = []
    rows, records = alternation.run_alternating(jobs, timeout_s=300,
                                                on_round=lambda *args: reported.append(args))
    assert all(r["status"] == "ok" for r in rows), [r["status"] for r in rows]
    assert {r["impl"] for r in rows} == {FLOOR, BASELINE, "cpu"} and len(records) == 3
    assert [(r, total) for r, total, *_ in reported] == [(1, 3), (2, 3), (3, 3)]
    for row in rows:
        assert len(row["round_medians_ms"]) == 3 and row["runs"] == 6
        assert len(row["round_foreign_cores"]) == 3
    windows = {r["impl"]: r["round_windows_s"] for r in rows}
    for i in range(3):  # within a round one process at a time; every round after the last one
        spans = sorted(tuple(w[i]) for w in windows.values())
        assert all(a_end <= b_start for (_, a_end), (b_start, _) in zip(spans, spans[1:])), spans
        if i:
            assert min(w[i][0] for w in windows.values()) >= max(w[i - 1][1] for w in windows.values())
    firsts = [min(windows, key=lambda impl: windows[impl][i][0]) for i in range(3)]
    assert len(set(firsts)) == 3  # the starting process rotates


def test_a_failing_job_leaves_the_other_implementations_rows():
    jobs = [_tiny_job(HEAD, "cpu", 2), _tiny_job(HEAD, "no_such_backend", 2)]
    rows, _ = alternation.run_alternating(jobs, timeout_s=300)
    status = {r["impl"]: r["status"] for r in rows}
    assert status["cpu"] == "ok" and status["no_such_backend"].startswith("error:")


def test_suites_alternate_in_rounds_except_smoke():
    for name in ("default", "full", "memory"):
        suite = build_suite(name, "cpu")
        assert suite.alternate and suite.plan.rounds >= 3, name
        min_runs, max_runs, _ = suite.plan.round_share()
        assert min_runs * suite.plan.rounds >= suite.plan.min_runs and max_runs >= min_runs
    smoke = build_suite("smoke", "cpu")
    assert not smoke.alternate and smoke.plan.rounds == 1


def test_help_lists_the_smoke_suite_first(capsys):
    with pytest.raises(SystemExit):
        cli._parse(["--help"])
    text = capsys.readouterr().out
    assert "smoke    every row at tiny sizes" in text and text.index("smoke  ") < text.index("default  ")


def test_progress_lines_are_labelled(capsys):
    print(cli.PROGRESS_HEADER)
    cli._progress(3, 40, _tiny_job(HEAD, "cpu", 1), [_row("cpu", 12.25)], 4.0)
    header, line = capsys.readouterr().out.splitlines()
    for label in ("job", "group", "problem", "implementation", "s/job", "result"):
        assert label in header
    assert line.startswith("     3/40  head") and "median 12.2 ms" in line
    assert line.index("cpu") == header.index("implementation")


def test_cpu_levels_are_timed_as_implementations_of_their_own():
    from benchmarks import implementations
    from protoseg_kernels._compiled import cpu

    assert implementations.with_cpu_levels(["reference", "cpu"], ["baseline", "avx2"]) == \
        ["reference", "cpu@baseline", "cpu@avx2"]
    assert implementations.cpu_level_of("cpu@avx2") == "avx2" and implementations.cpu_level_of("cpu") is None
    assert implementations.backend_of("cpu@avx2") == "cpu" and implementations.backend_of(BASELINE) is None
    levels = [name for name in cpu.built_levels() if cpu.cpu_runs(name)]
    if len(levels) < 2:
        pytest.skip("needs two CPU kernel levels this machine runs")
    jobs = [_tiny_job(HEAD, f"cpu@{levels[0]}", 1), _tiny_job(HEAD, f"cpu@{levels[-1]}", 1)]
    rows, _ = alternation.run_alternating(jobs, timeout_s=300)
    assert {r["impl"]: r["cpu_level"] for r in rows} == {f"cpu@{lv}": lv for lv in (levels[0], levels[-1])}
    assert all(r["status"] == "ok" for r in rows)
