"""The ContrastiveSeg training-step rows of the benchmark suite (benchmarks/contrast_step.py).

* The fused step and the naive step (the original code) compute the same loss and
  embedding gradient when they sample the same anchors: the naive step's CPU ``randperm``
  is replaced by the order of the priority the fused sampling is given.
* The fused step makes no host synchronisation on a CPU (profiler count); the naive step
  makes many (its per-image, per-class loops).
* The jobs, the table and the targets of the new row group.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

import protoseg_kernels as pk
from benchmarks import contrast_step, jobs, measure, report
from benchmarks.contrast_step import BANK, IN_BATCH, SETTINGS, StepSettings
from benchmarks.implementations import BASELINE, FLOOR, usable_backends
from benchmarks.suite import build_suite
from benchmarks.worker import STEP

CPU_BACKENDS = usable_backends(torch.device("cpu"))
CPU = torch.device("cpu")
# Small steps with hard and easy anchors in every qualifying class: 2 images of 16×20,
# D = 24, 5 classes (the rarest has about 30 pixels per image, below in_batch's max_views).
SMALL = {
    BANK: StepSettings("small_bank", BANK, temperature=0.07, base_temperature=0.07, max_views=1, max_samples=64,
                       height=16, width=20, dim=24, classes=5, bank_size=12, pixels_per_class=4),
    IN_BATCH: StepSettings("small_in_batch", IN_BATCH, temperature=0.1, base_temperature=0.07, max_views=12,
                           max_samples=96, height=16, width=20, dim=24, classes=5),
}


def _same_anchor_steps(s: StepSettings, backend: str, seed: int = 5):
    """(fused inputs, fused loss, naive inputs, naive loss), both sampling by one priority."""
    fused_inputs = contrast_step.make_inputs(s, CPU, torch.float32, seed)
    naive_inputs = contrast_step.make_inputs(s, CPU, torch.float32, seed)
    priority = torch.rand(s.batch, s.height * s.width, generator=torch.Generator().manual_seed(seed))

    def order(image: int, candidates: torch.Tensor) -> torch.Tensor:
        return torch.argsort(priority[image, candidates[:, 0]], stable=True)

    with pk.use_backend(backend):
        fused = contrast_step.fused_step(fused_inputs, s, priority=priority)
    naive = contrast_step.naive_step(naive_inputs, s, order=order)
    return fused_inputs, fused, naive_inputs, naive


@pytest.mark.parametrize("variant", [BANK, IN_BATCH])
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_fused_and_naive_steps_compute_the_same_loss_on_the_same_anchors(backend, variant):
    s = SMALL[variant]
    before = contrast_step.make_inputs(s, CPU, torch.float32, 5)
    fused_inputs, fused, naive_inputs, naive = _same_anchor_steps(s, backend)
    assert float(naive) > 0
    torch.testing.assert_close(fused, naive, rtol=1e-5, atol=1e-6)
    grad = naive_inputs.embedding.grad
    assert grad is not None and grad.abs().sum() > 0
    torch.testing.assert_close(fused_inputs.embedding.grad, grad, rtol=1e-4, atol=1e-7)
    if variant == BANK:  # both updated their bank, each its own way (the original's bugs)
        for o in (fused_inputs, naive_inputs):
            assert not torch.equal(o.bank.features, before.bank.features)
        assert not torch.equal(fused_inputs.bank.pointers, naive_inputs.bank.pointers)


def test_the_naive_sampling_follows_the_original_rules():
    """n_view = min(max_samples // classes, max_views); half hard, half easy, a short side
    taken whole; X_ [classes, n_view, D] holds pixels of each row's class."""
    s = SMALL[IN_BATCH]
    o = contrast_step.make_inputs(s, CPU, torch.float32, 1)
    labels = o.labels.view(s.batch, -1)
    prediction = o.logits.argmax(1).view(s.batch, -1)
    feats = o.embedding.detach().flatten(2).transpose(1, 2)
    X_, y_ = contrast_step.hard_anchor_sampling(feats, labels, prediction, s.max_samples, s.max_views)
    qualifying = [(b, c) for b in range(s.batch) for c in range(s.classes) if (labels[b] == c).sum() > s.max_views]
    n_view = min(s.max_samples // len(qualifying), s.max_views)
    assert X_.shape == (len(qualifying), n_view, s.dim)
    assert y_.tolist() == [float(c) for _, c in qualifying]
    for row, (b, c) in enumerate(qualifying):
        pixels = feats[b][labels[b] == c]
        assert all(bool((pixels == x).all(dim=1).any()) for x in X_[row])
    none, _ = contrast_step.hard_anchor_sampling(feats, labels, prediction, s.max_samples, max_views=10**6)
    assert none is None


@pytest.mark.parametrize("variant", [BANK, IN_BATCH])
def test_fused_step_makes_no_host_sync_and_the_naive_step_many(variant):
    s = SMALL[variant]
    o = contrast_step.make_inputs(s, CPU, torch.float32, 2)
    for backend in CPU_BACKENDS:
        assert measure.profile_case(contrast_step.step_case(o, s, backend), CPU).host_syncs == 0, backend
    naive = measure.profile_case(contrast_step.step_case(o, s, None), CPU).host_syncs
    present = sum(int(o.labels[b].unique().numel()) for b in range(s.batch))
    assert naive > present  # unique, a nonzero per class and image, int(ptr), ...


def test_the_presets_are_the_cityscapes_settings_of_the_spec():
    """docs/spec.md §12: D = 256 at 1/8 of two 512×1024 crops; bank τ = τ_b = 0.07,
    max_views 1, L = 5,000, 10 pixels per class; in-batch τ 0.1, τ_b 0.07, 1024 / 100."""
    bank, in_batch = SETTINGS["step_bank"], SETTINGS["step_in_batch"]
    for s in (bank, in_batch):
        assert (s.batch, s.dim, s.height, s.width, s.classes, s.max_samples) == (2, 256, 64, 128, 19, 1024)
    assert (bank.temperature, bank.base_temperature, bank.max_views) == (0.07, 0.07, 1)
    assert (bank.bank_size, bank.pixels_per_class, bank.bank_entries) == (5_000, 10, 190_000)
    assert (in_batch.temperature, in_batch.base_temperature, in_batch.max_views) == (0.1, 0.07, 100)
    assert in_batch.bank_entries == 0
    for device in ("cpu", "cuda"):
        for suite in ("default", "full"):
            assert build_suite(suite, device).contrast_step == contrast_step.problems()
    with pytest.raises(ValueError, match="is not the step"):
        contrast_step.settings_of(dataclasses.replace(bank.problem, n=7))


def test_bank_inputs_start_full_and_every_implementation_sees_the_same():
    s = SETTINGS["tiny_step_bank"]
    a, b = (contrast_step.make_inputs(s, CPU, torch.float32, 3) for _ in range(2))
    features, labels = a.bank.contrast_set()
    assert features.shape == (s.bank_entries, s.dim) and bool((labels >= 0).all())
    torch.testing.assert_close(features.norm(dim=1), torch.ones(s.bank_entries))
    assert bool((a.bank.pointers > 0).any())  # the prefill enqueued something
    for name in ("features", "labels", "pointers"):
        assert torch.equal(getattr(a.bank, name), getattr(b.bank, name))
    assert torch.equal(a.embedding, b.embedding) and a.embedding.requires_grad
    ignored = (a.labels < 0).float().mean()
    assert 0.02 < float(ignored) < 0.25


def test_step_jobs_run_every_implementation_without_a_floor():
    suite = build_suite("smoke", "cpu")
    planned = jobs.plan_jobs(suite, ["reference", "cpu"], "cpu", "float32")
    steps = [job for job in planned if job.group == STEP]
    assert {(job.problem, job.impl) for job in steps} == {
        (p, impl) for p in suite.contrast_step for impl in (BASELINE, "reference", "cpu")}
    assert not any(job.impl == FLOOR and job.problem in suite.contrast_step for job in planned)
    only = jobs.only_groups(planned, [STEP])
    assert only == steps
    assert STEP in jobs.GROUPS


def _row(p, impl, ms, peak, syncs, status="ok"):
    return {"group": STEP, "preset": p.name, "n": p.n, "d": p.d, "c": p.c, "k": p.k, "m": p.m, "contrast": "",
            "op": contrast_step.OP, "mode": contrast_step.MODE, "impl": impl, "status": status, "median_ms": ms,
            "p20_ms": ms * 0.9, "p80_ms": ms * 1.1, "flops": None, "peak_bytes": peak, "host_syncs": syncs}


def test_step_table_and_targets():
    bank, in_batch = contrast_step.problems()
    rows = report.derive([
        _row(bank, "cpu", 50.0, 2 * report.MiB, 0),
        _row(bank, BASELINE, 200.0, 8 * report.MiB, 160),
        _row(bank, "reference", 100.0, 4 * report.MiB, 1),
        _row(in_batch, BASELINE, 90.0, 10 * report.MiB, 300),
        {**_row(in_batch, "cpu", 0, 0, 0), "status": "error: boom"},
    ])
    table = report.step_table(rows, (bank, in_batch))
    assert [r[:2] for r in table] == [
        ["bank 2x256x64x128 M=190000", "baseline (naive)"],
        ["bank 2x256x64x128 M=190000", "protoseg [cpu]"],
        ["bank 2x256x64x128 M=190000", "protoseg [reference]"],
        ["in_batch 2x256x64x128", "baseline (naive)"],
        ["in_batch 2x256x64x128", "protoseg [cpu]"],
    ]
    header = report.STEP_COLUMNS
    cpu = dict(zip(header, table[1]))
    assert cpu == {"problem": "bank 2x256x64x128 M=190000", "implementation": "protoseg [cpu]",
                   "median ms": "50.0", "p20-p80 ms": "45.0-55.0", "speed-up": "4.00", "peak MiB": "2.0",
                   "RSS MiB": "-", "mem/base": "0.25", "syncs": "0"}
    assert dict(zip(header, table[0]))["speed-up"] == "1.00"
    assert table[4][2] == "error: boom"
    markdown = report.render_markdown(header, table)
    assert markdown.splitlines()[0] == "| " + " | ".join(header) + " |"
    assert len(markdown.splitlines()) == 2 + len(table)
    assert "syncs" in report.render_text(header, table)
    targets = report.check_step_targets(rows, (bank, in_batch))
    assert [(t["detail"], t["met"]) for t in targets] == [
        ("bank 2x256x64x128 M=190000 [cpu]", True), ("bank 2x256x64x128 M=190000 [reference]", False)]
