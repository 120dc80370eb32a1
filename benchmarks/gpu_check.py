"""``make gpu-check RESULTS=folder``: everything a GPU can tell us, in one command (docs/spec.md §7).

Meant for a bare GPU machine that is lent for a few minutes: its own Python, torch,
triton and CUDA toolkit, no internet, no virtual environment. In order, each step with
a time limit of its own and its log in the results folder:

1. ``env``    the machine: GPU, compute capability, torch / triton / nvcc versions, cores;
2. ``build``  ``setup.py build_ext --inplace`` for the GPU's architecture only, all cores,
              one CPU kernel level for this machine (nothing is downloaded, no build
              isolation);
3. ``tests``  the GPU tests: ``tests/test_triton_gpu.py``, ``tests/test_tensor_cores.py``
              and ``tests/test_cuda_backend.py`` selected by ``-k gpu`` (every GPU backend
              against the float64 reference, at the presets, every op), with a JUnit XML;
4. ``bench-tf32``, ``bench-bf16``  the benchmark suite's headline rows (head step, pixel
              contrast, hierarchy) on the GPU at the per-GPU N, in fp32 with TF32 and in
              bf16, without ``torch.compile`` (its compile time would eat the budget), each
              writing its results.json.

``build-times.tsv`` keeps ninja's per-object compile times. ``summary.json`` lists every
step with its status, wall time and log; the command fails if any step failed. A step that
fails does not stop the later ones, except that nothing runs on a failed build.
``--dry-run`` runs the same plan on a machine without a GPU:
the environment probe, the build (in a scratch copy of the tree, for ``--arch``), the
test collection (``--collect-only``), and the smoke benchmark suite on the CPU, so the
orchestration and the build are checked before the GPU minutes are spent (its limits
are stretched by 16 / the machine's cores).

    python -m benchmarks.gpu_check --results gpu-results [--dry-run] [--no-build]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GPU_TESTS = ["tests/test_triton_gpu.py", "tests/test_tensor_cores.py", "tests/test_cuda_backend.py"]
GPU_TEST_FILTER = "gpu"
# Seconds per step on one H200 with 16 cores; the sum stays under the 8-minute bar
# (docs/gpu-check.md argues each from measured times).
STEP_LIMITS_S = {"env": 30, "build": 110, "tests": 150, "bench-tf32": 100, "bench-bf16": 90}
GPU_MACHINE_CORES = 16
BENCH_RUNS = {"bench-tf32": ["--dtype", "float32", "--tf32"], "bench-bf16": ["--dtype", "bfloat16"]}
# The headline rows (head step, pixel contrast, hierarchy); the N sweep and per-op rows
# do not fit the budget.
BENCH_GROUPS = ["head", "contrast", "hierarchy"]


@dataclass
class Step:
    name: str
    command: list[str]
    env: dict[str, str] = field(default_factory=dict)
    cwd: str = str(ROOT)
    status: str = "not run"
    wall_s: float = 0.0
    log: str = ""
    returncode: int | None = None


def probe_environment() -> dict:
    """What the machine is: read from the running Python's torch, triton and nvcc."""
    info: dict = {"python": sys.version.split()[0], "cores": os.cpu_count()}
    try:
        import torch

        info["torch"] = torch.__version__
        info["torch_cuda"] = torch.version.cuda
        info["gpu_count"] = torch.cuda.device_count()
        if torch.cuda.is_available():
            major, minor = torch.cuda.get_device_capability(0)
            info["gpu"] = torch.cuda.get_device_name(0)
            info["capability"] = f"{major}.{minor}"
    except ImportError as exc:
        info["torch"] = f"missing ({exc})"
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = "missing"
    nvcc = _nvcc()
    info["nvcc"] = nvcc
    if nvcc:
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout.strip().splitlines()
        info["nvcc_version"] = out[-1] if out else "?"
    for module in ("pytest", "ninja", "setuptools"):
        info[f"has_{module}"] = _importable(module)
    return info


def _nvcc() -> str | None:
    home = os.environ.get("CUDA_HOME")
    if home and (Path(home) / "bin" / "nvcc").exists():
        return str(Path(home) / "bin" / "nvcc")
    found = shutil.which("nvcc")
    if found:
        return found
    default = Path("/usr/local/cuda/bin/nvcc")
    return str(default) if default.exists() else None


def _importable(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def build_step(arch: str, tree: Path) -> Step:
    cores = str(os.cpu_count() or 1)
    env = {"TORCH_CUDA_ARCH_LIST": arch, "MAX_JOBS": cores, "PROTOSEG_FORCE_CUDA": "1", "PROTOSEG_CPU_ARCH": "native"}
    return Step("build", [sys.executable, "setup.py", "build_ext", "--inplace"], env=env, cwd=str(tree))


def test_step(results: Path, dry_run: bool) -> Step:
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *GPU_TESTS, "-k", GPU_TEST_FILTER,
               f"--junitxml={results / 'tests.xml'}"]
    if dry_run:
        command.append("--collect-only")
    return Step("tests", command)


def bench_steps(results: Path, dry_run: bool) -> list[Step]:
    steps = []
    for name, options in BENCH_RUNS.items():
        if dry_run:  # the same entry point and output handling, on the CPU at tiny sizes
            command = [sys.executable, "-m", "benchmarks", "--suite", "smoke", "--device", "cpu", "--no-plots",
                       "--no-compile", "--only", "head", "--out", str(results / name)]
        else:
            command = [sys.executable, "-m", "benchmarks", "--device", "cuda", *options, "--no-compile", "--no-plots",
                       "--only", *BENCH_GROUPS, "--out", str(results / name)]
        steps.append(Step(name, command))
    return steps


def run_step(step: Step, results: Path, limit_s: float) -> Step:
    log = results / f"{step.name}.log"
    step.log = log.name
    # The tree itself is on the path: on the GPU machine nothing is installed.
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": path, **step.env}
    start = time.monotonic()
    with log.open("w") as out:
        out.write(f"$ {' '.join(step.command)}\n# cwd {step.cwd}; env {step.env}; limit {limit_s:.0f} s\n")
        out.flush()
        # A session of its own, so that a step past its limit is stopped with all its
        # children (ninja, nvcc, benchmark workers).
        process = subprocess.Popen(step.command, cwd=step.cwd, env=env, stdout=out, stderr=subprocess.STDOUT,
                                   start_new_session=True)
        try:
            step.returncode = process.wait(timeout=limit_s)
            step.status = "passed" if step.returncode == 0 else "failed"
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            step.status = f"timed out after {limit_s:.0f} s"
    step.wall_s = round(time.monotonic() - start, 1)
    print(f"gpu-check: {step.name:<10} {step.status:<24} {step.wall_s:7.1f} s  ({log})", flush=True)
    return step


def time_scale(dry_run: bool) -> float:
    """The limits are for the GPU machine's 16 cores; a dry run on fewer cores gets them
    stretched in proportion (the build is what the cores decide)."""
    cores = os.cpu_count() or 1
    return max(1.0, GPU_MACHINE_CORES / cores) if dry_run else 1.0


def keep_compile_times(tree: Path, results: Path) -> None:
    """ninja's log of the build (start and end of each object, in ms) as build-times.tsv:
    the per-file compile times behind the build's share of the budget."""
    logs = sorted(tree.glob("build/temp*/.ninja_log"), key=lambda p: p.stat().st_mtime)
    if not logs:
        return
    rows = ["seconds\tobject"]
    for line in logs[-1].read_text().splitlines():
        fields = line.split("\t")
        if len(fields) >= 4 and fields[0].isdigit():
            rows.append(f"{(int(fields[1]) - int(fields[0])) / 1000:.1f}\t{fields[3]}")
    (results / "build-times.tsv").write_text("\n".join(rows) + "\n")


def _scratch_tree() -> Path:
    """A copy of the tracked and untracked-unignored files (what a fresh clone builds)."""
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=ROOT,
                           capture_output=True, text=True, check=True).stdout.split("\0")
    tree = Path(tempfile.mkdtemp(prefix="gpu-check-tree-"))
    for name in filter(None, files):
        source = ROOT / name
        if source.is_file():
            (tree / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, tree / name)
    return tree


def plan(results: Path, dry_run: bool, build: bool, arch: str | None) -> tuple[list[Step], Path | None]:
    steps: list[Step] = []
    scratch = None
    if build:
        scratch = _scratch_tree() if dry_run else None
        steps.append(build_step(arch or "9.0", scratch or ROOT))
    steps.append(test_step(results, dry_run))
    steps += bench_steps(results, dry_run)
    return steps, scratch


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--results", required=True, type=Path, help="folder for the logs, JSON and summary")
    parser.add_argument("--dry-run", action="store_true", help="no GPU: build in a scratch copy, collect the tests, "
                        "run the smoke benchmarks on the CPU")
    parser.add_argument("--no-build", action="store_true", help="use the extension already built in the tree")
    parser.add_argument("--arch", help="TORCH_CUDA_ARCH_LIST of the build (default: the GPU's; 9.0 without one)")
    args = parser.parse_args(argv)
    results = args.results.resolve()
    results.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()

    env_start = time.monotonic()
    environment = probe_environment()
    (results / "env.json").write_text(json.dumps(environment, indent=2) + "\n")
    env_step = Step("env", ["probe_environment()"], status="passed", log="env.json",
                    wall_s=round(time.monotonic() - env_start, 1))
    if not args.dry_run and "capability" not in environment:
        env_step.status = "failed: no CUDA GPU visible to torch (use --dry-run without one)"
    print(f"gpu-check: env        {env_step.status:<24} {environment.get('gpu', 'no GPU')}", flush=True)

    steps, scratch = plan(results, args.dry_run, not args.no_build, args.arch or environment.get("capability"))
    done = [env_step]
    scale = time_scale(args.dry_run)
    if env_step.status == "passed":
        for step in steps:
            if step.name != "build" and any(s.name == "build" and s.status != "passed" for s in done):
                step.status = "skipped: the build failed"
                done.append(step)
                continue
            done.append(run_step(step, results, STEP_LIMITS_S[step.name] * scale))
            if step.name == "build":
                keep_compile_times(Path(step.cwd), results)
    if scratch is not None:
        shutil.rmtree(scratch, ignore_errors=True)

    summary = {"dry_run": args.dry_run, "environment": environment, "wall_s": round(time.monotonic() - started, 1),
               "limit_s": sum(STEP_LIMITS_S.values()),
               "limit_scale": scale, "steps": [asdict(s) for s in done]}
    (results / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    failed = [s.name for s in done if s.status != "passed"]
    print(f"gpu-check: {'FAILED: ' + ', '.join(failed) if failed else 'all steps passed'} "
          f"in {summary['wall_s']} s; results in {results}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
