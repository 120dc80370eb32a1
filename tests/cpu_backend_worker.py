"""Subprocess scenarios of test_cpu_backend.py (run as ``python cpu_backend_worker.py
<scenario> ...``), so that a thread count can be fixed per process and a crash shows
as a failed test instead of taking the test session down."""

from __future__ import annotations

import resource
import sys

import torch
from contrast_cases import MODES, make_contrast_case
from helpers import make_case

import protoseg_kernels as pk

# Many tiles, several dP chunks and several Sinkhorn chunks (N > 2048 rows).
DETERMINISM_SHAPE = (4500, 40, 7, 5)


def run_everything() -> dict[str, torch.Tensor]:
    """Forward and backward of every op on the cpu backend."""
    case = make_case(*DETERMINISM_SHAPE, dtype=torch.float32, seed=21)
    out: dict[str, torch.Tensor] = {}
    with pk.use_backend("cpu"):
        for reduction in ("max", "logsumexp"):
            x = case.x.clone().requires_grad_()
            p = case.prototypes.clone().requires_grad_()
            r = pk.class_scores(x, p, reduction=reduction, temperature=0.3, return_index=True,
                                lse_temperature=0.1)
            (r.scores.square().sum() + r.lse.sum()).backward()
            out.update({f"{reduction}_scores": r.scores, f"{reduction}_index": r.index,
                        f"{reduction}_lse": r.lse, f"{reduction}_dx": x.grad, f"{reduction}_dp": p.grad})
        x = case.x.clone().requires_grad_()
        p = case.prototypes.clone().requires_grad_()
        ppc, ppd = pk.ppc_ppd_loss(x, p, case.target, temperature=0.1, reduction="none")
        (ppc.sum() + ppd.square().sum()).backward()
        out.update({"ppc": ppc, "ppd": ppd, "ppc_dx": x.grad, "ppc_dp": p.grad})
        x = case.x.clone().requires_grad_()
        p = case.prototypes.clone().requires_grad_()
        s = pk.prototype_similarity(x, p)
        s.square().sum().backward()
        out.update({"similarity": s, "similarity_dx": x.grad, "similarity_dp": p.grad})
        sk = pk.sinkhorn_assign(case.x, case.prototypes, case.labels, return_q=True, iterations=4)
        up = pk.update_prototypes(case.prototypes, case.x, case.labels, sk.index, momentum=0.5)
        out.update({"sinkhorn_index": sk.index, "sinkhorn_q": sk.q, "updated": up.prototypes,
                    "counts": up.counts})
        out.update(run_pixel_contrast())
    return {k: v.detach() for k, v in out.items()}


def run_pixel_contrast() -> dict[str, torch.Tensor]:
    """pixel_contrast_loss over several row tiles and column blocks, both modes and
    denominators, a bank with its gradient."""
    out = {}
    for mode in MODES:
        case = make_contrast_case(700, 1500, 24, 6, mode, seed=23, dtype=torch.float32)
        for denominator in ("contrastiveseg", "supcon"):
            anchors = case.anchors.clone().requires_grad_()
            bank = None if case.contrast is None else case.contrast.clone().requires_grad_()
            loss = pk.pixel_contrast_loss(anchors, case.anchor_labels, bank, case.contrast_labels,
                                          denominator=denominator, reduction="none")
            loss.square().sum().backward()
            name = f"contrast_{mode}_{denominator}"
            out.update({name: loss, f"{name}_da": anchors.grad})
            if bank is not None:
                out[f"{name}_dc"] = bank.grad
    return out


def determinism(threads: str, path: str) -> None:
    torch.set_num_threads(int(threads))
    torch.save(run_everything(), path)


def bad_indices() -> None:
    """Out-of-range labels/targets/indices with validate=False, and hostile indices
    handed to the kernels directly, bypassing the op-level sanitising."""
    n, d, c, k = 300, 12, 4, 3
    case = make_case(n, d, c, k, dtype=torch.float32, seed=5)
    huge = torch.tensor([2**62, -(2**62), 10**9, -5, c, c * k, -(2**63)])
    spots = torch.arange(len(huge)) * 37
    labels, target, index = case.labels.clone(), case.target.clone(), case.index.clone()
    labels[spots], target[spots], index[spots] = huge, huge, huge
    with pk.use_backend("cpu"):
        x = case.x.clone().requires_grad_()
        ppc, ppd = pk.ppc_ppd_loss(x, case.prototypes, target, validate=False, reduction="sum")
        (ppc + ppd).backward()
        sk = pk.sinkhorn_assign(case.x, case.prototypes, labels, validate=False, return_q=True)
        up = pk.update_prototypes(case.prototypes, case.x, labels, index, validate=False)
    for t in (ppc, ppd, x.grad, sk.q, up.prototypes):
        assert torch.isfinite(t).all()
    assert bool((sk.index[spots] == -1).all())

    ops = torch.ops.protoseg_kernels
    hostile = torch.full((n,), 2**62, dtype=torch.long)
    hostile[::2] = -(2**62)
    scores, idx, lse = ops.class_scores_forward(case.x, case.prototypes, True, "max", 1.0, 0.5)
    grad_x, _ = ops.class_scores_backward(torch.ones(n, c), None, case.x, case.prototypes,
                                          hostile.repeat(c).view(c, n).t().contiguous(), lse, True, "max", 1.0,
                                          0.5, True)
    assert bool((grad_x == 0).all()), "gradient routed through an out-of-range index"
    ops.ppc_ppd_backward(torch.ones(n), torch.ones(n), case.x, case.prototypes, hostile, lse, True, 1.0, True)
    logits = ops.sinkhorn_logits(case.x, case.prototypes, hostile, True, 0.05)
    assert bool((logits == 0).all())
    m, s = ops.sinkhorn_class_logsumexp(logits, hostile, c)
    assert bool((s == 0).all())
    beta = torch.zeros(c, k)
    assert bool((ops.sinkhorn_marginals(logits, hostile, beta) == 0).all())
    fin_index, _ = ops.sinkhorn_finalize(logits, hostile, beta, True)
    assert bool((fin_index == -1).all())
    sums, counts = ops.prototype_sums(case.x, hostile, c * k, True)
    assert int(counts.sum()) == 0 and bool((sums == 0).all())
    print("survived")


def head_like_step(case) -> None:
    """Forward and backward of class scores with the PPC log-sum-exp and of the losses,
    and Sinkhorn: everything of the head step that touches all C·K prototypes."""
    x = case.x.clone().requires_grad_()
    p = case.prototypes.clone().requires_grad_()
    out = pk.class_scores(x, p, return_index=True, lse_temperature=0.1)
    ppc, ppd = pk.ppc_ppd_loss(x, p, case.target, temperature=0.1)
    (out.scores.sum() + out.lse.sum() + ppc + ppd).backward()
    pk.sinkhorn_assign(x.detach(), p.detach(), case.labels, return_q=True)


def peak_memory(backend: str, n: str, d: str, c: str, k: str) -> None:
    """Prints how far the step raises the peak resident memory of the process (bytes),
    after a small warm-up has paid for every one-time allocation. Resident memory sees
    every allocation, whatever allocates it. The peak is reset to the current resident set
    just before the step, with glibc told to unmap large blocks on free
    (benchmarks.measure.rss_peak_bytes): otherwise freed but resident heap memory from
    earlier work may be reused and hide part of an allocation."""
    shape = (int(d), int(c), int(k))
    small = make_case(64, *shape, dtype=torch.float32, seed=7)
    case = make_case(int(n), *shape, dtype=torch.float32, seed=7, peaked_fraction=0.0)
    from benchmarks.measure import Case, rss_peak_bytes

    with pk.use_backend(backend):
        head_like_step(small)
        growth = rss_peak_bytes(Case(lambda: None, lambda _: head_like_step(case)))
        if growth is None:  # not Linux with glibc: the process's peak, less precise
            before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            head_like_step(case)
            growth = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024  # KiB
    print(growth)


if __name__ == "__main__":
    scenarios = {"determinism": determinism, "bad_indices": bad_indices, "peak_memory": peak_memory}
    scenarios[sys.argv[1]](*sys.argv[2:])
