"""``python -m benchmarks``: run a suite, print the table, write JSON, CSV, markdown and plots.

Examples::

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
import os
import platform
import subprocess
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from . import hssn_cases, implementations, jobs, measure, plots, report
from .suite import SUITES, SWEEP_PRESET, build_suite
from .worker import CONTRAST, DTYPES, HIERARCHY, STEP, Job

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.splitlines()[0])
    parser.add_argument("--suite", choices=SUITES, default="default")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="float32")
    parser.add_argument("--out", type=Path, default=None,
                        help="output folder (default: benchmarks/results/<device>[-<suite>])")
    parser.add_argument("--tf32", action="store_true", help="CUDA: fp32 matmuls in TF32 (default: off, as torch)")
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile of the baseline")
    parser.add_argument("--no-plots", action="store_true")
    parser.add_argument("--only", choices=jobs.GROUPS, nargs="+", default=None,
                        help="run only these row groups of the suite (with their GEMM floors)")
    return parser.parse_args(argv)


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
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    machine = {"cpu": _cpu_model(), "cores": cores, "memory_bytes": measure.physical_memory_bytes(),
               "torch_threads": torch.get_num_threads()}
    if device.type == "cuda":
        machine["gpu"] = torch.cuda.get_device_name(device)
    return machine


def _device_tag(device: torch.device) -> str:
    if device.type != "cuda":
        return "cpu"
    name = torch.cuda.get_device_name(device).lower()
    return "cuda-" + "".join(ch if ch.isalnum() else "-" for ch in name).strip("-")


def _progress(i: int, total: int, job: Job, rows: list[dict[str, Any]], seconds: float) -> None:
    head = rows[0] if len(rows) == 1 else None
    detail = ""
    if head and head.get("status") == "ok":
        detail = f"{head['median_ms']:.1f} ms"
    elif any(r.get("status") != "ok" for r in rows):
        detail = next(r["status"] for r in rows if r.get("status") != "ok")
    print(f"[{i:>3}/{total}] {job.group:<5} {job.problem.label:<22} {job.impl:<18} "
          f"{seconds:5.1f} s  {detail}", flush=True)


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
    rows = report.derive(jobs.run_jobs(planned, suite.isolate, _progress))
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
    print(f"\nWrote {', '.join(written)} to {out_dir} (suite took {wall_s:.0f} s)")
    return document
