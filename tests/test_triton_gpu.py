"""The compiled Triton kernels on a real GPU: every op against the float64 reference
at the docs/spec.md §7 preset shapes (by the docs/spec.md §5 rules of ``conformance.py``), bitwise
determinism, and no host synchronisation. Skipped without a CUDA GPU, and under the
interpreter (which would take hours at these sizes)."""

from __future__ import annotations

import pytest
import torch
from conformance import (
    check_class_scores,
    check_pixel_contrast_loss,
    check_ppc_ppd_loss,
    check_prototype_similarity,
    check_sinkhorn_assign,
    check_tree_min_loss,
    check_update_prototypes,
)
from contrast_cases import ContrastCase, make_contrast_case
from helpers import Case, assert_bitwise_equal, make_case

import protoseg_kernels as pk


def _gpu_reason() -> str | None:
    if not torch.cuda.is_available():
        return "needs a CUDA GPU"
    from protoseg_kernels._backend import get_backend, unavailable_reason

    reason = unavailable_reason("triton")
    if reason is None:
        reason = get_backend("triton").device_reason(torch.device("cuda"))
    if reason is None:
        from protoseg_kernels.triton import _host

        if _host.INTERPRETING:
            reason = "TRITON_INTERPRET=1: the GPU tests need the compiled kernels"
    return reason


pytestmark = pytest.mark.skipif(_gpu_reason() is not None, reason=str(_gpu_reason()))

# docs/spec.md §7 presets (N per GPU, D, C, K); similarity also at a smaller N (its output is N·C·K).
PRESETS = {"cityscapes": (65_536, 720, 19, 10), "ade20k": (32_768, 720, 150, 10),
           "coco_stuff": (32_768, 720, 171, 10)}
DTYPES = [torch.bfloat16, torch.float16, torch.float32]


def _on_gpu(case: Case) -> Case:
    return Case(*(t.cuda() for t in (case.x, case.prototypes, case.labels, case.target, case.index)))


@pytest.fixture(scope="module", params=list(PRESETS), ids=list(PRESETS))
def preset_case(request) -> Case:
    return _on_gpu(make_case(*PRESETS[request.param], seed=1))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("reduction,lse_temperature", [("max", None), ("max", 0.1), ("logsumexp", 0.1)])
def test_class_scores(preset_case, dtype, reduction, lse_temperature):
    check_class_scores("triton", preset_case, dtype, reduction=reduction, lse_temperature=lse_temperature)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_ppc_ppd_loss(preset_case, dtype):
    check_ppc_ppd_loss("triton", preset_case, dtype, temperature=0.1)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_sinkhorn_assign(preset_case, dtype):
    check_sinkhorn_assign("triton", preset_case, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_update_prototypes(preset_case, dtype):
    check_update_prototypes("triton", preset_case, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_tree_min_loss(preset_case, dtype):
    check_tree_min_loss("triton", preset_case, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_prototype_similarity(dtype):
    n, d, c, k = PRESETS["ade20k"]
    check_prototype_similarity("triton", _on_gpu(make_case(n // 8, d, c, k, seed=2)), dtype)


# docs/spec.md §7 pixel-contrast presets: A = 1,024 sampled anchors, D = 256, in-batch and against
# a bank; the bank has M = 38,000 (not 190,000) so that the float64 reference's A×M stays small.
CONTRAST_SHAPES = {"in_batch": (1024, 0, 256, 19), "bank": (1024, 38_000, 256, 19)}


def _contrast_case_on_gpu(mode: str, seed: int) -> ContrastCase:
    case = make_contrast_case(*CONTRAST_SHAPES[mode], mode, seed=seed, dtype=torch.float32)
    return ContrastCase(*(None if t is None else t.cuda() for t in case.args()))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mode", list(CONTRAST_SHAPES))
@pytest.mark.parametrize("denominator", ["contrastiveseg", "supcon"])
def test_pixel_contrast_loss(denominator, mode, dtype):
    check_pixel_contrast_loss("triton", _contrast_case_on_gpu(mode, 3), dtype, denominator=denominator)


@pytest.mark.parametrize("mode", list(CONTRAST_SHAPES))
def test_pixel_contrast_backward_is_bitwise_deterministic(mode):
    case = _contrast_case_on_gpu(mode, 4)

    def run():
        anchors = case.anchors.bfloat16().requires_grad_()
        bank = None if case.contrast is None else case.contrast.bfloat16().requires_grad_()
        with pk.use_backend("triton"):
            loss = pk.pixel_contrast_loss(anchors, case.anchor_labels, bank, case.contrast_labels)
        loss.backward()
        return loss, anchors.grad, None if bank is None else bank.grad

    for a, b in zip(run(), run()):
        assert_bitwise_equal(a, b)


def test_backward_is_bitwise_deterministic(preset_case):
    """The dx accumulator and the dP split partials are re-read by other threads of
    the same program; this checks the synchronisation as much as the fixed order."""

    def run():
        x = preset_case.x.bfloat16().requires_grad_()
        p = preset_case.prototypes.bfloat16().requires_grad_()
        with pk.use_backend("triton"):
            out = pk.class_scores(x, p, return_index=True, lse_temperature=0.1)
            ppc, ppd = pk.ppc_ppd_loss(x, p, preset_case.target, temperature=0.1)
        (out.scores.float().sum() + out.lse.sum() + ppc + ppd).backward()
        return out.scores, out.index, out.lse, x.grad, p.grad

    for a, b in zip(run(), run()):
        assert_bitwise_equal(a, b)


def test_head_step_without_host_synchronisation(preset_case):
    x = preset_case.x.bfloat16().requires_grad_()
    p = preset_case.prototypes.bfloat16()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with pk.use_backend("triton"):
            out = pk.class_scores(x, p, return_index=True, lse_temperature=0.1)
            assignment = pk.sinkhorn_assign(x, p, preset_case.labels, validate=False)
            target = torch.where(preset_case.labels >= 0, preset_case.labels * p.shape[1] + assignment.index, -1)
            ppc, ppd = pk.ppc_ppd_loss(x, p, target, temperature=0.1, validate=False)
            pk.update_prototypes(p, x.detach(), preset_case.labels, assignment.index, validate=False)
            (out.scores.float().logsumexp(1).mean() + out.lse.mean() + ppc + ppd).backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    assert torch.isfinite(x.grad.float()).all()


def test_contrastiveseg_step_without_host_synchronisation():
    """Sampling, the fused loss against the bank, backward and the enqueue at the
    Cityscapes sizes (docs/spec.md §10.2, §10.3, §12); the sample equals the CPU one."""
    g = torch.Generator().manual_seed(0)
    batch, dim, classes, h, w = 2, 256, 19, 64, 128
    labels = torch.randint(0, classes, (batch, h, w), generator=g)
    labels[torch.rand(batch, h, w, generator=g) < 0.1] = -1
    prediction = torch.where(torch.rand(batch, h, w, generator=g) < 0.7, labels.clamp_min(0),
                             torch.randint(0, classes, (batch, h, w), generator=g))
    priority = torch.rand(batch, h * w, generator=g)
    cpu_sample = pk.sample_anchors(labels.view(batch, -1), prediction.view(batch, -1), priority=priority)
    embedding = torch.nn.functional.normalize(torch.randn(batch, dim, h, w, generator=g), dim=1).cuda()
    embedding.requires_grad_()
    labels, prediction, priority = labels.cuda(), prediction.cuda(), priority.cuda()
    memory = pk.ClassMemoryBank(classes, 5000, dim, device="cuda")
    memory.enqueue(embedding.detach(), labels, validate=False)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        sample = pk.sample_anchors(labels.view(batch, -1), prediction.view(batch, -1), priority=priority,
                                   validate=False)
        pixels = embedding.permute(0, 2, 3, 1).reshape(-1, dim)
        bank, bank_labels = memory.contrast_set()
        loss = pk.pixel_contrast_loss(pixels[sample.index.clamp_min(0)], sample.labels, bank, bank_labels,
                                      temperature=0.07, base_temperature=0.07, validate=False)
        loss.backward()
        memory.enqueue(embedding.detach(), labels, validate=False)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    assert torch.equal(sample.index.cpu(), cpu_sample.index)
    assert torch.isfinite(embedding.grad).all() and loss.item() > 0
