"""The HSSN loss rows of the benchmark suite (benchmarks/hssn_cases.py, benchmarks/hssn_baseline.py).

* The original code, as the baseline writes it, computes what the fused ops compute: the
  loss and the gradient of ``losses_hiera_focal`` (γ = 2, scale 5, the Cityscapes tree) equal
  ``pk.tree_min_loss``'s, ``TreeTripletLoss``'s equal ``pk.tree_triplet_loss``'s, with
  ignored pixels present (the baseline's deviations, stated in its docstring, are what makes
  them agree: cloned labels, ignored pixels never negatives).
* The presets are HSSN's Cityscapes settings; the jobs, the table and the targets of the
  ``hierarchy`` group; the smoke suite's tiny variant through ``python -m benchmarks``.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

import protoseg_kernels as pk
from benchmarks import cli, hssn_baseline, hssn_cases, jobs, report
from benchmarks.hssn_cases import SETTINGS, TREE_MIN, TREE_TRIPLET, LossSettings
from benchmarks.implementations import BASELINE, FLOOR, usable_backends
from benchmarks.suite import build_suite
from benchmarks.worker import HIERARCHY

CPU = torch.device("cpu")
CPU_BACKENDS = usable_backends(CPU)
TREE_MIN_BACKENDS = [b for b in CPU_BACKENDS if b in hssn_cases.fused_impls(SETTINGS["tiny_tree_min"].problem,
                                                                               CPU_BACKENDS)]
# Small rows: tree-min 2×26×12×20; tree-triplet 2×24×10×16 with at most 12 triplets per class,
# so that the first-m selection in raster order matters for most classes.
SMALL_TREE_MIN = LossSettings("small_tree_min", TREE_MIN, height=12, width=20, channels=26, targets=False)
SMALL_TRIPLET = LossSettings("small_tree_triplet", TREE_TRIPLET, height=10, width=16, channels=24,
                             max_triplet=12, targets=False)


def _pair(s: LossSettings, seed: int, ignored: bool = True):
    """Two copies of the same inputs (one per implementation); without ``ignored``, the
    ignored pixels get a class drawn at random."""
    a, b = (hssn_cases.make_inputs(s, CPU, torch.float32, seed) for _ in range(2))
    if not ignored:
        g = torch.Generator().manual_seed(seed + 100)
        filled = torch.randint(0, hssn_cases.LEAVES, a.labels.shape, generator=g)
        for o in (a, b):
            o.labels = torch.where(o.labels < 0, filled, o.labels)
    return a, b


def test_the_baseline_tables_are_the_cityscapes_hierarchy():
    h = pk.Hierarchy.cityscapes()
    assert h.num_leaves == hssn_baseline.CITYSCAPES_NUM_CLASSES and h.num_nodes == 26
    assert [h.parents[leaf] - h.num_leaves for leaf in range(h.num_leaves)] == hssn_baseline.CITYSCAPES_HIERA_MAP
    ranges = [list(r) for r in hssn_baseline.CITYSCAPES_HIERA["hiera_high"].values()]
    assert ranges == hssn_baseline.CITYSCAPES_HIERA_INDEX
    for g, (lo, hi) in enumerate(ranges):
        assert h.children[h.num_leaves + g] == tuple(range(lo, hi))


@pytest.mark.parametrize("ignored", [True, False])
@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("backend", TREE_MIN_BACKENDS)
def test_original_tree_min_loss_equals_the_op(backend, seed, ignored):
    s = SMALL_TREE_MIN
    fused, naive = _pair(s, seed, ignored)
    labels = naive.labels.clone()
    with pk.use_backend(backend):
        expected = pk.tree_min_loss(fused.x, fused.labels, pk.Hierarchy.cityscapes(), focal_gamma=2.0, scale=5.0)
    expected.backward()
    got = hssn_baseline.tree_min_loss(naive.x, naive.labels, gamma=2)
    got.backward()
    assert torch.equal(naive.labels, labels)  # the original's targets[void] = 0 went to a clone
    assert float(got.detach()) > 0
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    assert naive.x.grad.abs().sum() > 0
    torch.testing.assert_close(naive.x.grad, fused.x.grad, rtol=1e-4, atol=1e-8)
    if ignored:
        assert bool((labels < 0).any())
        assert not naive.x.grad.permute(1, 0, 2, 3)[:, labels < 0].any()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_original_tree_triplet_loss_equals_the_op(seed):
    s = SMALL_TRIPLET
    fused, naive = _pair(s, seed)
    labels = naive.labels.clone()
    assert bool((labels < 0).any())
    expected = pk.tree_triplet_loss(fused.x, fused.labels, pk.Hierarchy.cityscapes(), max_triplet=s.max_triplet,
                                    margin=s.margin)
    expected.backward()
    criterion = hssn_baseline.TreeTripletLoss(margin=s.margin)
    got, count = criterion(naive.x, naive.labels, max_triplet=s.max_triplet)
    got.backward()
    assert torch.equal(naive.labels, labels)
    assert int(count) > 1 and float(got.detach()) > 0
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(naive.x.grad, fused.x.grad, rtol=1e-4, atol=1e-7)


def test_the_original_triplet_rule_counts_ignored_pixels_as_negatives():
    """The deviation of the baseline: with the original's rule the negatives include ignored
    pixels, and the loss differs wherever one is among the first negatives; without ignored
    pixels the two rules agree."""
    s = SMALL_TRIPLET
    original = hssn_baseline.TreeTripletLoss(margin=s.margin, exclude_ignored_negatives=False)
    deviating = hssn_baseline.TreeTripletLoss(margin=s.margin)
    o, _ = _pair(s, 0)
    assert not torch.allclose(original(o.x, o.labels, s.max_triplet)[0], deviating(o.x, o.labels, s.max_triplet)[0])
    o, _ = _pair(s, 0, ignored=False)
    torch.testing.assert_close(original(o.x, o.labels, s.max_triplet)[0], deviating(o.x, o.labels, s.max_triplet)[0])


def test_without_a_triplet_both_give_zero():
    """Every labelled pixel under one superclass: no negatives, no class counts."""
    s = SMALL_TRIPLET
    o, _ = _pair(s, 3)
    labels = torch.where(o.labels >= 0, o.labels % 2, o.labels)  # flat: road, sidewalk
    criterion = hssn_baseline.TreeTripletLoss()
    loss, count = criterion(o.x, labels)
    assert loss is None and int(count) == 0
    zero = hssn_baseline.triplet_loss_or_zero(criterion, o.x, labels)
    zero.backward()
    assert float(zero.detach()) == 0 and not o.x.grad.any()
    assert float(pk.tree_triplet_loss(o.x.detach(), labels, pk.Hierarchy.cityscapes())) == 0


def test_the_presets_are_the_hssn_cityscapes_settings_of_the_spec():
    """docs/spec.md §7 and §12: tree-min on 2×26×512×1024 logits (pixels / 4 on a CPU),
    tree-triplet on the stride-8 embedding 2×256×64×128, γ = 2, scale 5, 200 triplets, 0.6."""
    tree_min, triplet = SETTINGS["tree_min"], SETTINGS["tree_triplet"]
    assert (tree_min.batch, tree_min.channels, tree_min.height, tree_min.width) == (2, 26, 512, 1024)
    assert (tree_min.focal_gamma, tree_min.scale) == (2.0, 5.0)
    assert (triplet.batch, triplet.channels, triplet.height, triplet.width) == (2, 256, 64, 128)
    assert (triplet.max_triplet, triplet.margin) == (200, 0.6)
    gpu, cpu = hssn_cases.problems("cuda"), hssn_cases.problems("cpu")
    assert gpu == (tree_min.problem, triplet.problem)
    assert cpu[0].n == tree_min.problem.n // hssn_cases.CPU_TREE_MIN_SCALE_DOWN and cpu[1] == triplet.problem
    assert hssn_cases.label_of(cpu[0]) == "tree_min 2x26x256x512"
    assert hssn_cases.label_of(gpu[0]) == "tree_min 2x26x512x1024"
    for device in ("cpu", "cuda"):
        for suite in ("default", "full"):
            assert build_suite(suite, device).hierarchy == hssn_cases.problems(device)
        assert build_suite("smoke", device).hierarchy == hssn_cases.problems(device, hssn_cases.TINY)
        assert not build_suite("memory", device).hierarchy
    with pytest.raises(ValueError, match="is not the HSSN loss row"):
        hssn_cases.settings_of(dataclasses.replace(triplet.problem, n=7))


def test_inputs_look_like_hssn_and_every_implementation_sees_the_same():
    for name in ("tiny_tree_min", "tiny_tree_triplet"):
        s = SETTINGS[name]
        a, b = (hssn_cases.make_inputs(s, CPU, torch.float32, 4) for _ in range(2))
        assert torch.equal(a.x, b.x) and torch.equal(a.labels, b.labels) and a.x.requires_grad
        assert a.x.shape == (s.batch, s.channels, s.height, s.width) and a.x.is_contiguous()
        assert a.labels.shape == (s.batch, s.height, s.width)
        assert 0.02 < float((a.labels < 0).float().mean()) < 0.25
    o = hssn_cases.make_inputs(SETTINGS["tiny_tree_triplet"], CPU, torch.float32, 4)
    torch.testing.assert_close(o.x.detach().norm(dim=1), torch.ones(o.labels.shape))


def test_hierarchy_jobs_run_the_original_and_each_backend_with_the_op(monkeypatch):
    suite = build_suite("smoke", "cpu")
    planned = jobs.plan_jobs(suite, ["reference", "cpu"], "cpu", "float32")
    rows = [job for job in planned if job.group == HIERARCHY]
    expected = {(p, impl) for p in suite.hierarchy
                for impl in [BASELINE, *hssn_cases.fused_impls(p, ["reference", "cpu"])]}
    assert {(job.problem, job.impl) for job in rows} == expected
    assert not any(job.impl == FLOOR and job.problem in suite.hierarchy for job in planned)
    assert jobs.only_groups(planned, [HIERARCHY]) == rows and HIERARCHY in jobs.GROUPS
    tree_min, triplet = suite.hierarchy
    # an op of the op table runs on the backends that implement it; the others are listed
    monkeypatch.setattr(hssn_cases, "op_reason", lambda b, op: "lacks it" if b == "cpu" else None)
    assert hssn_cases.fused_impls(tree_min, ["reference", "cpu"]) == ["reference"]
    assert hssn_cases.skipped_backends(tree_min, ["reference", "cpu"]) == [("cpu", "lacks it")]
    if TREE_TRIPLET not in hssn_cases.OPS_BY_NAME:  # portable torch code: once, as "auto"
        assert hssn_cases.fused_impls(triplet, ["reference", "cpu"]) == ["auto"]


def _row(p, impl, ms, peak, syncs, op=TREE_MIN):
    return {"group": HIERARCHY, "preset": p.name, "n": p.n, "d": p.d, "c": p.c, "k": p.k, "m": p.m, "contrast": "",
            "op": op, "mode": hssn_cases.MODE, "impl": impl, "status": "ok", "median_ms": ms,
            "p20_ms": ms * 0.9, "p80_ms": ms * 1.1, "flops": None, "peak_bytes": peak, "host_syncs": syncs}


def test_hierarchy_table_and_targets(monkeypatch):
    tree_min, triplet = hssn_cases.problems("cuda")
    rows = report.derive([
        _row(tree_min, "triton", 10.0, 100 * report.MiB, 0),
        _row(tree_min, BASELINE, 50.0, 1000 * report.MiB, 25),
        _row(tree_min, "cuda", 20.0, 300 * report.MiB, 1),
        _row(triplet, BASELINE, 40.0, 100 * report.MiB, 200, op=TREE_TRIPLET),
        _row(triplet, "auto", 10.0, 20 * report.MiB, 0, op=TREE_TRIPLET),
    ])
    monkeypatch.setattr(hssn_cases, "op_reason", lambda b, op: "no kernel" if b == "reference" else None)
    table = report.hierarchy_table(rows, (tree_min, triplet), ["reference", "triton", "cuda"])
    triplet_skips = [["tree_triplet 2x256x64x128", "protoseg [reference]"]] \
        if TREE_TRIPLET in hssn_cases.OPS_BY_NAME else []  # once the op has backend kernels
    assert [r[:2] for r in table] == [
        ["tree_min 2x26x512x1024", "baseline (naive)"],
        ["tree_min 2x26x512x1024", "protoseg [triton]"],
        ["tree_min 2x26x512x1024", "protoseg [cuda]"],
        ["tree_min 2x26x512x1024", "protoseg [reference]"],
        ["tree_triplet 2x256x64x128", "baseline (naive)"],
        ["tree_triplet 2x256x64x128", "protoseg [auto]"],
    ] + triplet_skips
    header = report.HIERARCHY_COLUMNS
    assert dict(zip(header, table[1])) == {
        "problem": "tree_min 2x26x512x1024", "implementation": "protoseg [triton]", "median ms": "10.0",
        "p20-p80 ms": "9.0-11.0", "speed-up": "5.00", "peak MiB": "100.0", "RSS MiB": "-", "mem/base": "0.10",
        "syncs": "0"}
    assert table[3][2] == "not run: no kernel"
    assert len(report.render_markdown(header, table).splitlines()) == 2 + len(table)
    targets = report.check_hierarchy_targets(rows, (tree_min, triplet))
    assert [(t["target"], t["detail"], t["met"]) for t in targets] == [
        ("speed-up vs baseline", "tree_min 2x26x512x1024 [triton]", True),  # 5 >= 3
        ("peak memory / baseline", "tree_min 2x26x512x1024 [triton]", True),  # 0.1 <= 1/5
        ("host syncs per step", "tree_min 2x26x512x1024 [triton]", True),
        ("host syncs per step", "tree_min 2x26x512x1024 [cuda]", False),
        ("speed-up vs baseline", "tree_triplet 2x256x64x128 [auto]", False),  # 4 < 5
        ("peak memory / baseline", "tree_triplet 2x256x64x128 [auto]", False),  # 0.2 > 1/10
        ("host syncs per step", "tree_triplet 2x256x64x128 [auto]", True),
    ]


@pytest.fixture(scope="module")
def smoke_hierarchy(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench-hierarchy")
    document = cli.main(["--suite", "smoke", "--only", HIERARCHY, "--out", str(out), "--no-compile", "--no-plots"])
    return out, document


def test_smoke_suite_times_the_hssn_losses(smoke_hierarchy):
    """``python -m benchmarks --suite smoke --only hierarchy``: the tiny rows, the original
    code synchronising in its loops, the fused ops never; the table in hierarchy.md."""
    out, document = smoke_hierarchy
    rows = document["rows"]
    problems = hssn_cases.problems("cpu", hssn_cases.TINY)
    assert {r["group"] for r in rows} == {HIERARCHY}
    expected = {(p.name, impl) for p in problems for impl in [BASELINE, *hssn_cases.fused_impls(p, CPU_BACKENDS)]}
    assert {(r["preset"], r["impl"]) for r in rows} == expected
    for r in rows:
        assert r["status"] == "ok" and r["runs"] == 2 and r["peak_bytes"] > 0 and r["floor_ms"] is None
        assert r["op"] == hssn_cases.settings_of(next(p for p in problems if p.name == r["preset"])).op
        if r["impl"] == BASELINE:
            assert r["speedup"] == 1.0 and r["memory_vs_baseline"] == 1.0 and r["host_syncs"] > 0
        else:
            assert r["host_syncs"] == 0 and r["speedup"] > 0, r["impl"]
    targets = document["hierarchy_targets"]
    assert len(targets) == len(rows) - len(problems) and all(t["met"] for t in targets)
    assert {t["target"] for t in targets} == {"host syncs per step"}  # the tiny rows check no speed
    markdown = (out / "hierarchy.md").read_text()
    assert "baseline (naive)" in markdown and "tree_triplet 2x16x12x16" in markdown
