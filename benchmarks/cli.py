"""``python -m benchmarks``: run a suite, print the table, write JSON, CSV, markdown and plots.

Examples::

    python -m benchmarks --suite smoke        # a first look: every row at tiny sizes, about 40 s
    python -m benchmarks                      # default suite on the GPU if any, else CPU
    python -m benchmarks --suite full --device cuda --dtype bfloat16
    python -m benchmarks --suite memory       # head step at the per-GPU N (memory ratios)
    python -m benchmarks --suite smoke --out bench-smoke --no-compile
    python -m benchmarks --only contrast         # the pixel-contrast rows of the default suite
    python -m benchmarks --only contrast_step    # the ContrastiveSeg training-step rows
    python -m benchmarks --only hierarchy        # the HSSN loss rows (tree-min, tree-triplet)
"""

from __future__ import annotations

import argparse
import platform
import subprocess
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from . import hssn_cases, implementations, jobs, load, measure, plots, report
from .suite import SUITES, SWEEP_PRESET, build_suite
from .worker import CONTRAST, DTYPES, HIERARCHY, STEP, Job

RESULTS_DIR = Path(__file__).resolve().parent / "results"
SUITE_HELP = """suites:
  smoke    every row at tiny sizes, one process, no alternation: a first look (about 40 s on 2 cores)
  default  the spec's presets, an N sweep, per-op, contrast and HSSN rows (12-17 min on 2 cores)
  full     also per-op rows at every preset, a longer sweep, more runs
  memory   the head step at the per-GPU N, for the memory ratios

Every suite but smoke times the implementations of each problem in alternation, each in
its own process, and records the machine's load (docs/benchmarks.md)."""


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.splitlines()[0],
                                     epilog=SUITE_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--suite", choices=SUITES, default="default", help="which sizes and rows (below)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="float32")
    parser.add_argument("--out", type=Path, default=None,
                        help="output folder (default: benchmarks/results/<device>[-<suite>])")
    parser.add_argument("--tf32", action="store_true", help="CUDA: fp32 matmuls in TF32 (default: off, as torch)")
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile of the baseline")
    parser.add_argument("--no-plots", action="store_true")
    parser.add_argument("--cpu-levels", default=None, metavar="LEVELS",
                        help="CPU: time the cpu backend once per kernel level, in alternation: 'all' (every "
                             "built level this CPU runs) or a comma-separated list, e.g. avx2,avx512")
    parser.add_argument("--only", choices=jobs.GROUPS, nargs="+", default=None,
                        help="run only these row groups of the suite (with their GEMM floors)")
    return parser.parse_args(argv)


def _cpu_levels(choice: str) -> list[str]:
    """The CPU kernel levels ``--cpu-levels`` names, checked against the build and the CPU."""
    from protoseg_kernels._compiled import cpu

    runnable = [name for name in cpu.built_levels() if cpu.cpu_runs(name)]
    wanted = runnable if choice == "all" else [name.strip() for name in choice.split(",") if name.strip()]
    unknown = [name for name in wanted if name not in runnable]
    if unknown or not wanted:
        raise SystemExit(f"--cpu-levels: {', '.join(unknown) or 'none given'} not among the built levels "
                         f"this CPU runs ({', '.join(runnable) or 'none'})")
    return wanted


def _device(choice: str) -> torch.device:
    if choice == "auto":
        choice = "cuda" if torch.cuda.is_available() else "cpu"
    if choice == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is visible to torch")
    return torch.device(choice)


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _git_revision() -> dict[str, Any]:
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=jobs.REPO_ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()

    try:
        return {"commit": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain"))}
    except (OSError, subprocess.CalledProcessError):
        return {"commit": None, "dirty": None}


def _machine(device: torch.device) -> dict[str, Any]:
    machine = {"cpu": _cpu_model(), "cores": load.machine_cores(), "memory_bytes": measure.physical_memory_bytes(),
               "torch_threads": torch.get_num_threads()}
    if device.type == "cuda":
        machine["gpu"] = torch.cuda.get_device_name(device)
    return machine


def _device_tag(device: torch.device) -> str:
    if device.type != "cuda":
        return "cpu"
    name = torch.cuda.get_device_name(device).lower()
    return "cuda-" + "".join(ch if ch.isalnum() else "-" for ch in name).strip("-")


PROGRESS_HEADER = f"{'job':>9}  {'group':<13} {'problem':<24} {'implementation':<18} {'s/job':>6}  result"


def _result_text(rows: list[dict[str, Any]]) -> str:
    failed = next((r["status"] for r in rows if r.get("status") != "ok"), None)
    if failed:
        return failed
    if len(rows) == 1:
        return f"median {rows[0]['median_ms']:.1f} ms"
    return f"{len(rows)} rows"


def _progress(i: int, total: int, job: Job, rows: list[dict[str, Any]], seconds: float) -> None:
    print(f"{f'{i}/{total}':>9}  {job.group:<13} {job.problem.label:<24} {job.impl:<18} {seconds:6.1f}  "
          f"{_result_text(rows)}", flush=True)


def _job_names(jobs_of_set: list[Job]) -> list[str]:
    """Each job's implementation, with its group where the problem's jobs span several."""
    several = len({job.group for job in jobs_of_set if job.group != "floor"}) > 1
    return ["GEMM floor" if job.group == "floor" else f"{job.group} {job.impl}" if several else job.impl
            for job in jobs_of_set]


def _round_progress(r: int, rounds: int, jobs_of_set: list[Job], medians: list, record: dict[str, Any]) -> None:
    foreign = record.get("foreign_cores")
    busy = "unknown" if foreign is None else f"{foreign:.2f} cores"
    times = ", ".join(f"{name} {'failed' if m is None else f'{sum(m):.1f} ms'}"
                      for name, m in zip(_job_names(jobs_of_set), medians))
    print(f"{'':>9}  round {r}/{rounds} of {jobs_of_set[0].problem.label}: other load {busy}; {times}",
          flush=True)


def _set_progress(jobs_of_set: list[Job]) -> None:
    impls = ", ".join(_job_names(jobs_of_set))
    print(f"{'':>9}  {jobs_of_set[0].problem.label}: starting {impls} (warm-up one at a time)", flush=True)


def _load_warning(summary: dict[str, Any]) -> str | None:
    if not summary["noisy_rounds"]:
        return None
    return (f"warning: other work kept the machine busy during {summary['noisy_rounds']} of "
            f"{summary['rounds']} rounds (up to {summary['max_foreign_cores']:.2f} of {summary['cores']} cores; "
            f"threshold {summary['noisy_threshold_cores']:.2f}): the rows marked {report.DOUBT_MARK} may be off, "
            f"rerun on a quiet machine")


def _print_group(title: str, table: str, targets_of: str, targets: list) -> None:
    """A row group's table, then its docs/spec.md §7 targets."""
    print(f"\n{title}")
    print(table)
    print(f"\ndocs/spec.md §7 targets ({targets_of})")
    print(report.render_targets(targets))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    from protoseg_kernels.env import collect

    args = _parse(argv)
    device = _device(args.device)
    suite = build_suite(args.suite, device.type, compile_baseline=not args.no_compile)
    status = implementations.backend_status(device)
    backends = [name for name, reason in status.items() if reason is None]
    if args.cpu_levels and not suite.alternate:
        raise SystemExit(f"--cpu-levels: the {suite.name} suite runs in one process; use another suite")
    if args.cpu_levels and device.type == "cpu":
        backends = implementations.with_cpu_levels(backends, _cpu_levels(args.cpu_levels))
    tag = _device_tag(device) + ("" if suite.name == "default" else f"-{suite.name}")
    out_dir = args.out or RESULTS_DIR / tag
    out_dir.mkdir(parents=True, exist_ok=True)

    print(f"protoseg-kernels benchmarks: suite {suite.name!r} on {device.type}, {args.dtype}")
    for name, reason in status.items():
        print(f"  backend {name:<10} {'benchmarked' if reason is None else 'skipped: ' + reason}")
    started = time.perf_counter()
    planned = jobs.plan_jobs(suite, backends, device.type, args.dtype, tf32=args.tf32)
    if args.only:
        planned = jobs.only_groups(planned, args.only)
    how = "in alternation, each in its own process" if suite.alternate else "one after another, in one process"
    print(f"{len(planned)} jobs, the implementations of each problem {how}\n{PROGRESS_HEADER}")
    measured, load_records = jobs.run_jobs(planned, suite.alternate, _progress, _round_progress, _set_progress)
    cores = load.machine_cores()
    load_summary = load.summarize(load_records, cores)
    rows = report.derive(measured, cores)
    ran = {job.group for job in planned}
    # the pixel-contrast and step tables of the groups that ran (--only may leave them out)
    contrast_problems = suite.contrast if CONTRAST in ran else ()
    step_problems = suite.contrast_step if STEP in ran else ()
    hierarchy_problems = suite.hierarchy if HIERARCHY in ran else ()
    wall_s = time.perf_counter() - started

    preset_keys = [p.key for p in suite.presets]
    targets = report.check_targets(rows, preset_keys)
    contrast_targets = report.check_contrast_targets(rows, contrast_problems)
    step_targets = report.check_step_targets(rows, step_problems)
    hierarchy_targets = report.check_hierarchy_targets(rows, hierarchy_problems)
    head_text = report.render_text(report.HEAD_COLUMNS, report.head_table(rows))
    op_text = report.render_text(report.OP_COLUMNS, report.op_table(rows))
    scale = f", N = per-GPU N / {suite.scale_down}" if suite.scale_down not in (None, 1) else ""
    print(f"\nHead step: forward + Sinkhorn + update + backward ({device.type}, {args.dtype}{scale})")
    print(head_text)
    print("\nPer op")
    print(op_text)
    if any(report.doubtful(r) for r in rows):
        print(report.DOUBT_NOTE)
    print("\ndocs/spec.md §7 targets (best protoseg backend, head step)")
    print(report.render_targets(targets))
    setting = f"({device.type}, {args.dtype})"
    if contrast_problems:
        contrast_text = report.render_text(report.CONTRAST_COLUMNS, report.contrast_table(rows, contrast_problems))
        _print_group(f"Pixel contrast: pixel_contrast_loss forward + backward {setting}", contrast_text,
                     "best protoseg backend, pixel contrast", contrast_targets)
    if step_problems:
        step_text = report.render_text(report.STEP_COLUMNS, report.step_table(rows, step_problems))
        _print_group(f"ContrastiveSeg step: sampling + loss + bank update + backward {setting}", step_text,
                     "every protoseg backend, ContrastiveSeg step", step_targets)
    if hierarchy_problems:
        hierarchy_text = report.render_text(report.HIERARCHY_COLUMNS,
                                            report.hierarchy_table(rows, hierarchy_problems, backends))
        scaled = [p.name for p in hierarchy_problems if p != hssn_cases.SETTINGS[p.name].problem]
        note = f", {', '.join(scaled)} pixels / {hssn_cases.CPU_TREE_MIN_SCALE_DOWN}" if scaled else ""
        _print_group(f"HSSN losses: tree_min_loss and tree_triplet_loss forward + backward "
                     f"({device.type}, {args.dtype}{note})", hierarchy_text, "best protoseg backend, HSSN losses",
                     hierarchy_targets)

    document = {
        "meta": {
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "git": _git_revision(),
            "machine": _machine(device),
            "versions": collect(),
            "suite": suite.name,
            "device": device.type,
            "dtype": args.dtype,
            "tf32": args.tf32 if device.type == "cuda" else None,
            "n_scale_down": suite.scale_down,
            "wall_seconds": round(wall_s, 1),
            "backends": status,
            "alternation": suite.alternate,
            "rounds": suite.plan.rounds,
            "load": load_summary,
        },
        "rows": rows,
        "targets": targets,
        "contrast_targets": contrast_targets,
        "contrast_step_targets": step_targets,
        "hierarchy_targets": hierarchy_targets,
    }
    report.write_json(document, out_dir / "results.json")
    report.write_csv(rows, out_dir / "results.csv")
    markdown = report.render_markdown(report.HEAD_COLUMNS, report.head_table(rows))
    (out_dir / "head_step.md").write_text(markdown + "\n")
    written = ["results.json", "results.csv", "head_step.md"]
    if contrast_problems:
        contrast_md = report.render_markdown(report.CONTRAST_COLUMNS, report.contrast_table(rows, contrast_problems))
        (out_dir / "pixel_contrast.md").write_text(contrast_md + "\n")
        written.append("pixel_contrast.md")
    if step_problems:
        step_md = report.render_markdown(report.STEP_COLUMNS, report.step_table(rows, step_problems))
        (out_dir / "contrast_step.md").write_text(step_md + "\n")
        written.append("contrast_step.md")
    if hierarchy_problems:
        hierarchy_md = report.render_markdown(report.HIERARCHY_COLUMNS,
                                              report.hierarchy_table(rows, hierarchy_problems, backends))
        (out_dir / "hierarchy.md").write_text(hierarchy_md + "\n")
        written.append("hierarchy.md")
    if not args.no_plots:
        subtitle = f"{device.type}, {args.dtype}"
        preset = SWEEP_PRESET if suite.name != "smoke" else suite.sweep[0].name
        if plots.plot_time(rows, preset, out_dir / "time_vs_n.png", subtitle):
            written.append("time_vs_n.png")
        if plots.plot_memory(rows, preset, out_dir / "memory_vs_n.png", subtitle):
            written.append("memory_vs_n.png")
    warning = _load_warning(load_summary)
    if warning:
        print(f"\n{warning}")
    print(f"\nWrote {', '.join(written)} to {out_dir} (suite took {wall_s:.0f} s)")
    return document
