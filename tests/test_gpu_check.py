"""``make gpu-check`` (benchmarks/gpu_check.py) without a GPU: its plan is what a GPU run
needs, and the dry run of every step but the build passes here (``make
gpu-check-dry-run`` also runs the build, in a scratch copy)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from benchmarks import gpu_check

ROOT = Path(__file__).resolve().parent.parent


def test_real_plan_builds_for_the_gpu_and_runs_gpu_tests_and_benchmarks(tmp_path):
    steps, scratch = gpu_check.plan(tmp_path, dry_run=False, build=True, arch="9.0")
    assert scratch is None
    by_name = {s.name: s for s in steps}
    assert list(by_name) == ["build", "tests", "bench-tf32", "bench-bf16"]
    build = by_name["build"]
    assert build.command[1:] == ["setup.py", "build_ext", "--inplace"]  # no pip, no build isolation
    assert build.env["TORCH_CUDA_ARCH_LIST"] == "9.0" and build.env["MAX_JOBS"] == str(os.cpu_count())
    tests = by_name["tests"].command
    assert tests[tests.index("-k") + 1] == "gpu" and "--collect-only" not in tests
    assert "tests/test_triton_gpu.py" in tests and "tests/test_tensor_cores.py" in tests
    for name, dtype in (("bench-tf32", "float32"), ("bench-bf16", "bfloat16")):
        command = by_name[name].command
        assert command[command.index("--device") + 1] == "cuda"
        assert command[command.index("--dtype") + 1] == dtype
        assert command[command.index("--out") + 1] == str(tmp_path / name)
    assert "--tf32" in by_name["bench-tf32"].command
    assert sum(gpu_check.STEP_LIMITS_S.values()) <= 8 * 60  # the spec's bar, step limits included


def test_without_a_gpu_a_real_run_refuses_instead_of_measuring_nothing(tmp_path):
    import torch

    if torch.cuda.is_available():
        return  # the refusal is for machines without a GPU
    result = subprocess.run([sys.executable, "-m", "benchmarks.gpu_check", "--results", str(tmp_path)], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["steps"][0]["status"].startswith("failed: no CUDA GPU")


def test_dry_run_without_the_build_passes_and_writes_every_result(tmp_path):
    result = subprocess.run([sys.executable, "-m", "benchmarks.gpu_check", "--dry-run", "--no-build", "--results",
                             str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert [s["name"] for s in summary["steps"]] == ["env", "tests", "bench-tf32", "bench-bf16"]
    assert all(s["status"] == "passed" for s in summary["steps"]), summary["steps"]
    assert summary["environment"]["torch"] and summary["limit_s"] <= 480
    collected = (tmp_path / "tests.log").read_text()
    for name in ("test_triton_gpu.py", "test_tensor_cores.py::test_fp32_runs_on_tensor_cores", "test_gpu_cuda"):
        assert name in collected, name
    for name in ("bench-tf32", "bench-bf16"):
        rows = json.loads((tmp_path / name / "results.json").read_text())
        assert rows, name
