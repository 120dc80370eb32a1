"""Smoke tests of the benchmark suite (``benchmarks/``) on tiny sizes.

* The naive baseline and the fused head step compute the same step (targets,
  losses, updated prototypes, gradients) when the baseline uses the Sinkhorn
  argmax for its update, so the benchmark compares like with like.
* The measurement primitives count what they claim (host syncs, peak memory).
* The smoke suite runs end to end and writes well-formed JSON, CSV, markdown
  and plots.
"""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import protoseg_kernels as pk
from benchmarks import cli, flops, measure, report
from benchmarks.baseline import baseline_step
from benchmarks.head_step import fused_step
from benchmarks.implementations import BASELINE, FLOOR, usable_backends
from benchmarks.problems import Problem, make_head_inputs
from benchmarks.step import HeadConfig, train_step

REPO_ROOT = Path(__file__).resolve().parent.parent
CPU_BACKENDS = usable_backends(torch.device("cpu"))
PROBLEM = Problem("test", n=701, d=40, c=7, k=4)  # ragged on purpose


def _run(step, seed: int = 3):
    inputs = make_head_inputs(PROBLEM, seed=seed)
    out = train_step(step, inputs, HeadConfig())
    grads = (inputs.x.grad, inputs.mask_norm_weight.grad, inputs.mask_norm_bias.grad)
    return out, grads, inputs


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_fused_step_matches_baseline_with_argmax_assignment(backend):
    naive, naive_grads, inputs = _run(lambda i, c: baseline_step(i, c, assignment="argmax"))
    with pk.use_backend(backend):
        fused, fused_grads, _ = _run(fused_step)
    assert (inputs.labels >= 0).sum() > 0 and torch.equal(fused.target, naive.target)
    assert torch.equal(fused.target < 0, inputs.labels < 0)
    for name in ("loss", "seg_loss", "ppc", "ppd"):
        torch.testing.assert_close(getattr(fused, name), getattr(naive, name), rtol=1e-5, atol=1e-6,
                                   msg=name)
    torch.testing.assert_close(fused.prototypes, naive.prototypes, rtol=0, atol=2e-6)
    assert not torch.equal(naive.prototypes, inputs.prototypes)  # the update moved something
    for got, want in zip(fused_grads, naive_grads):
        assert _rel_err(got, want) < 1e-5


def test_gumbel_baseline_keeps_argmax_targets_and_unit_prototypes():
    torch.manual_seed(0)
    gumbel, _, _ = _run(baseline_step)
    argmax, _, _ = _run(lambda i, c: baseline_step(i, c, assignment="argmax"))
    assert torch.equal(gumbel.target, argmax.target)  # the loss targets are argmax q in both
    assert torch.isfinite(gumbel.loss)
    torch.testing.assert_close(gumbel.prototypes.norm(dim=-1), torch.ones(PROBLEM.c, PROBLEM.k))


# ---- measurement primitives --------------------------------------------------
def test_host_sync_counter_counts_outermost_syncing_ops():
    x = torch.randn(64, 3)
    mask = x[:, 0] > 0

    def syncing(_):
        x[mask]  # nonzero
        (x.sum() > 0).item()  # _local_scalar_dense
        torch.unique(mask.long())  # _unique2
        torch.masked_select(x, mask[:, None])  # counts once, not again for its inner item()

    def quiet(_):
        torch.where(mask[:, None], x, 0).sum(0).softmax(0)

    assert measure.profile_case(measure.Case(lambda: None, syncing), torch.device("cpu")).host_syncs == 4
    assert measure.profile_case(measure.Case(lambda: None, quiet), torch.device("cpu")).host_syncs == 0


def test_allocator_peak_follows_live_tensors():
    mib = 2**20

    def run(_):
        a = torch.ones(mib // 4)  # 1 MiB
        del a
        b = torch.ones(mib // 2)  # 2 MiB, after the first is freed
        return b.sum()

    result = measure.profile_case(measure.Case(lambda: None, run), torch.device("cpu"))
    assert 2 * mib <= result.peak_bytes < 2 * mib + 4096
    assert result.allocated_bytes >= 3 * mib


def test_rss_peak_sees_memory_outside_the_torch_allocator():
    # In a child process: the measurement switches malloc settings for the process.
    code = (
        "import ctypes, ctypes.util\n"
        "from benchmarks import measure\n"
        "libc = ctypes.CDLL(ctypes.util.find_library('c'))\n"
        "libc.malloc.restype = ctypes.c_void_p\n"
        "def run(_):\n"
        "    p = libc.malloc(64 << 20)\n"
        "    ctypes.memset(p, 1, 64 << 20)\n"
        "    libc.free(ctypes.c_void_p(p))\n"
        "print(measure.rss_peak_bytes(measure.Case(lambda: None, run)))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True,
                          check=True)
    peak = int(done.stdout.strip().splitlines()[-1])
    assert 63 << 20 <= peak < 72 << 20


def test_percentiles_interpolate_like_numpy():
    timing = measure.summarize([0.004, 0.001, 0.003, 0.002, 0.005])
    assert (timing.median_ms, timing.p20_ms, timing.p80_ms, timing.runs) == pytest.approx((3.0, 1.8, 4.2, 5))


def test_derived_columns_and_targets():
    def row(impl, ms, peak, syncs=0, **extra):
        base = {"group": "head", "preset": "ade20k", "n": 8, "d": 2, "c": 3, "k": 2, "op": "head_step",
                "mode": "step", "impl": impl, "status": "ok", "median_ms": ms, "p20_ms": ms,
                "p80_ms": ms, "flops": 4e6, "peak_bytes": peak, "host_syncs": syncs}
        return dict(base, **extra)

    floor = row(FLOOR, 10.0, None, group="floor", op="gemm", mode=flops.HEAD_FLOOR)
    rows = report.derive([floor, row(BASELINE, 40.0, 800), row("cpu", 12.0, 100), row("reference", 50.0, 900, 6)])
    by_impl = {r["impl"]: r for r in rows}
    assert by_impl["cpu"]["speedup"] == pytest.approx(40 / 12)
    assert by_impl["cpu"]["times_floor"] == pytest.approx(1.2)
    assert by_impl["cpu"]["memory_vs_baseline"] == pytest.approx(0.125)
    assert by_impl["cpu"]["gflops"] == pytest.approx(4e6 / 12e-3 / 1e9)
    targets = report.check_targets(rows, [("ade20k", 8, 2, 3, 2, 0)])
    verdicts = {(t["target"], t["detail"].split("[")[1][:-1]): t["met"] for t in targets}
    assert verdicts[("speed-up vs baseline", "cpu")] is True
    assert verdicts[("speed-up vs torch.compile", "cpu")] is None  # not measured
    assert verdicts[("time / GEMM floor", "cpu")] is True
    assert verdicts[("peak memory / baseline", "cpu")] is True
    assert verdicts[("host syncs per step", "reference")] is False
    coco = [dict(r, preset="coco_stuff") for r in rows]
    coco_targets = {t["target"] for t in report.check_targets(coco, [("coco_stuff", 8, 2, 3, 2, 0)])}
    assert {"speed-up vs baseline", "peak memory / baseline"} <= coco_targets


def test_contrast_rows_floor_targets_and_the_naive_requirement():
    from benchmarks import contrast_cases

    bank = contrast_cases.PRESETS["bank"]
    dense = contrast_cases.PRESETS["dense"]

    def row(p, impl, ms, peak, group="contrast", op=contrast_cases.OP, mode=contrast_cases.MODE):
        return {"group": group, "preset": p.name, "n": p.n, "d": p.d, "c": p.c, "k": 0, "m": p.m,
                "contrast": p.contrast, "op": op, "mode": mode, "impl": impl, "status": "ok", "median_ms": ms,
                "p20_ms": ms, "p80_ms": ms, "flops": 1e9, "peak_bytes": peak, "host_syncs": 0}

    gemms = [row(p, FLOOR, ms, None, group="floor", op="gemm", mode=mode)
             for p in (bank, dense) for mode, ms in (("fwd", 100.0), ("dx", 50.0))]
    rows = report.derive(gemms + [row(bank, BASELINE, 3000.0, 8000), row(bank, "cpu", 300.0, 100),
                                  row(dense, "cpu", 300.0, 10 ** 9)])
    by = {(r["preset"], r["impl"]): r for r in rows}
    # bank (grouped labels): (2 + 1/19) fwd + 1 dx
    assert by[("bank", "cpu")]["floor_ms"] == pytest.approx((2 + 1 / 19) * 100 + 50)
    assert by[("dense", "cpu")]["floor_ms"] == pytest.approx((2 + 1 / 19) * 100 + 50)  # any anchor order
    verdicts = {(t["target"], t["detail"].split(" ")[0]): t["met"]
                for t in report.check_contrast_targets(rows, (bank, dense))}
    assert verdicts[("speed-up vs baseline", "bank")] is True
    assert verdicts[("peak memory / baseline", "bank")] is True  # 100 / 8000 <= 1/20
    assert verdicts[("time / GEMM floor", "dense")] is True
    assert verdicts[("peak memory / (A+M)·D", "dense")] is False  # 1 GB against 0.2 GB of inputs
    table = report.contrast_table(rows, (bank, dense))
    assert any("not run: needs about" in " ".join(line) for line in table if line[0].startswith("dense"))


def _public_op_uses(path: Path) -> tuple[set[str], list[str]]:
    """(names read as ``pk.<name>``, modules imported) of a source file."""
    import ast

    tree = ast.parse(path.read_text())
    used = {node.attr for node in ast.walk(tree)
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "pk"}
    imported = [node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)]
    imported += [alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names]
    return used, imported


@pytest.mark.parametrize("path", ["benchmarks/head_step.py", "protoseg/head.py"])
def test_fused_head_is_composed_from_public_ops_only(path):
    """docs/spec.md §7: the benchmark's fused step and ProtoSegHead use the public API only."""
    used, imported = _public_op_uses(REPO_ROOT / path)
    assert {"class_scores", "sinkhorn_assign", "ppc_ppd_loss", "update_prototypes"} <= used
    assert used <= set(pk.__all__), f"non-public names: {used - set(pk.__all__)}"
    assert not [m for m in imported if m.startswith("protoseg_kernels.") or m == "protoseg.contrast"]


# ---- the suite end to end ----------------------------------------------------
@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    document = cli.main(["--suite", "smoke", "--out", str(out), "--no-compile"])
    return out, document


def test_smoke_suite_writes_all_outputs(smoke_run):
    out, document = smoke_run
    for name in ("results.json", "results.csv", "head_step.md"):
        assert (out / name).stat().st_size > 0
    for name in ("time_vs_n.png", "memory_vs_n.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((out / "results.json").read_text()) == json.loads(json.dumps(document))
    meta = document["meta"]
    assert meta["versions"]["torch"] == torch.__version__ and meta["date"] and "commit" in meta["git"]
    with (out / "results.csv").open() as f:
        csv_rows = list(csv.DictReader(f))
    assert len(csv_rows) == len(document["rows"]) and set(csv_rows[0]) == set(report.CSV_FIELDS)
    assert "GEMM floor" in (out / "head_step.md").read_text()
    assert "baseline (naive)" in (out / "contrast_step.md").read_text()


def test_smoke_suite_rows_are_well_formed(smoke_run):
    _, document = smoke_run
    rows = document["rows"]
    assert rows and all(r["status"] == "ok" for r in rows), [r["status"] for r in rows]
    head = [r for r in rows if r["group"] == "head"]
    assert {r["impl"] for r in head} == {BASELINE, *CPU_BACKENDS}
    for r in head:
        p = Problem(r["preset"], r["n"], r["d"], r["c"], r["k"])
        assert r["runs"] == 2 and 0 < r["p20_ms"] <= r["median_ms"] <= r["p80_ms"]
        assert r["flops"] == flops.head_step_flops(p)
        assert r["times_floor"] == pytest.approx(r["median_ms"] / r["floor_ms"])
        assert 0 < r["peak_bytes"] <= r["allocated_bytes"]
        if r["impl"] == BASELINE:
            assert r["speedup"] == 1.0 and r["memory_vs_baseline"] == 1.0
            labels = make_head_inputs(p).labels
            assert r["host_syncs"] >= labels[labels >= 0].unique().numel()  # the class loop
        else:  # every protoseg backend, the reference included
            assert r["host_syncs"] == 0, r["impl"]
    ops = {(r["op"], r["mode"], r["impl"]) for r in rows if r["group"] == "ops"}
    for impl in [BASELINE, *CPU_BACKENDS]:
        for op, modes in (("class_scores", 3), ("ppc_ppd_loss", 3), ("target_similarity", 3),
                          ("sinkhorn_assign", 1), ("update_prototypes", 1)):
            assert sum((op, m, impl) in ops for m in ("fwd", "bwd", "fwd+bwd")) == modes
    assert any(t["target"] == "host syncs per step" for t in document["targets"])


def test_smoke_suite_times_the_contrast_step(smoke_run):
    """The ContrastiveSeg step rows (benchmarks/contrast_step.py): every implementation, the
    naive step synchronises in its loops, the fused ones never."""
    from benchmarks import contrast_step

    _, document = smoke_run
    rows = [r for r in document["rows"] if r["group"] == "contrast_step"]
    problems = contrast_step.problems(contrast_step.TINY)
    impls = [BASELINE, *CPU_BACKENDS]
    assert {(r["preset"], r["impl"]) for r in rows} == {(p.name, impl) for p in problems for impl in impls}
    for r in rows:
        assert r["status"] == "ok" and r["runs"] == 2 and r["peak_bytes"] > 0 and r["floor_ms"] is None
        if r["impl"] == BASELINE:
            assert r["speedup"] == 1.0 and r["memory_vs_baseline"] == 1.0 and r["host_syncs"] > 0
        else:
            assert r["host_syncs"] == 0 and r["speedup"] > 0, r["impl"]
    targets = document["contrast_step_targets"]
    assert len(targets) == len(problems) * len(CPU_BACKENDS) and all(t["met"] for t in targets)


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_suites_size_the_presets(device):
    from benchmarks.problems import CPU_PRESET_SCALE_DOWN, CPU_SCALE_DOWN, PRESETS
    from benchmarks.suite import build_suite

    per_gpu = {name: p.n_gpu for name, p in PRESETS.items()}
    default = build_suite("default", device)
    scale, small_scale = (CPU_PRESET_SCALE_DOWN, CPU_SCALE_DOWN) if device == "cpu" else (1, 1)
    assert default.scale_down == scale
    assert {p.name: p.n for p in default.presets} == {k: n // scale for k, n in per_gpu.items()}
    assert ("ade20k", per_gpu["ade20k"] // small_scale) in {(p.name, p.n) for p in default.ops}
    sweep = [p.n for p in default.sweep]
    assert sweep == [per_gpu["ade20k"] // small_scale * f // 4 for f in (1, 2, 4, 8)]
    if device == "cpu":  # ADE20K and COCO-Stuff at 8,192 pixels, where the speed claim is checked
        assert {p.name: p.n for p in default.presets}["coco_stuff"] == 8192
    memory = build_suite("memory", device)  # the per-GPU N, head step only, no torch.compile
    assert memory.scale_down == 1 and {p.name: p.n for p in memory.presets} == per_gpu
    assert not memory.sweep and not memory.ops and not memory.compile_presets
    with pytest.raises(ValueError, match="suite must be one of"):
        build_suite("huge", device)


def test_fused_contrast_step_uses_public_names_only():
    """The benchmark's fused ContrastiveSeg step is what a user writes (docs/spec.md §10)."""
    used, imported = _public_op_uses(REPO_ROOT / "benchmarks/contrast_step.py")
    assert {"sample_anchors", "pixel_contrast_loss", "ClassMemoryBank"} <= used
    assert used <= set(pk.__all__), f"non-public names: {used - set(pk.__all__)}"
    assert not [m for m in imported if m.startswith("protoseg_kernels.")]
