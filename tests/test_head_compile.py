"""Every head's training step under ``torch.compile(fullgraph=True)``: one graph for the
whole run (the step count is a device tensor, the warm-up and the HSSN ramp are tensor
conditions, the label check is an opaque op), results equal to eager step by step, and the
label check still raising inside the compiled step.

``aot_eager`` traces what inductor would compile (dynamo, autograd, the ops' fake kernels) in
a second; one test compiles the ProtoSeg step with inductor itself.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch._dynamo.utils import counters

import protoseg_kernels as pk
from protoseg import ContrastHead, HSSNHead, PixelPrototypeCELoss, ProtoSegHead

C_IN, C = 6, 4
STEPS = 5  # crosses the warm-up boundary (2) and runs along the HSSN ramp (4)
TREE = pk.Hierarchy([4, 4, 5, 5, -1, -1])  # leaves 0-3 under two roots


def make_heads() -> dict[str, torch.nn.Module]:
    torch.manual_seed(0)
    return {
        "protoseg": ProtoSegHead(C_IN, C, 2, 8, projection="linear", warmup_iters=2),
        "contrast": ContrastHead(C_IN, C, embed_dim=8, contrast_set="bank", memory_size=12, pixels_per_class=2,
                                 max_samples=16, max_views=4, warmup_iters=2),
        "hssn": HSSNHead(C_IN, TREE, embed_dim=8, triplet_ramp_iters=4, max_triplet=5, focal_gamma=2.0),
    }


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(step)
    features = torch.randn(2, C_IN, 6, 7, generator=g)
    labels = torch.randint(0, C, (2, 12, 14), generator=g)
    labels[torch.rand(labels.shape, generator=g) < 0.1] = pk.IGNORE_INDEX
    return features, labels


def train_step(head: torch.nn.Module, loss_fn: PixelPrototypeCELoss):
    def step(features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return loss_fn(head(features, labels), labels).loss
    return step


def run(head: torch.nn.Module, backend: str | None, graphs: list[int] | None = None) -> list[tuple[torch.Tensor, ...]]:
    """Loss, feature gradient and the head's state after each of STEPS training steps;
    ``graphs`` gets the number of graphs compiled so far after each step."""
    step = train_step(head, PixelPrototypeCELoss())
    if backend is not None:
        step = torch.compile(step, backend=backend, fullgraph=True)
    torch.manual_seed(1)  # the anchor sampling draws from the global generator
    results = []
    for t in range(STEPS):
        features, labels = batch(t)
        features.requires_grad_(True)
        loss = step(features, labels)
        loss.backward()
        if isinstance(head, ContrastHead):
            head.update_memory()
        state = [v.detach().clone() for v in head.state_dict().values() if isinstance(v, torch.Tensor)]
        results.append((loss.detach(), features.grad, *state))
        if graphs is not None:
            graphs.append(counters["stats"]["unique_graphs"])
    return results


def assert_runs_match(compiled: list, eager: list, tol: float) -> None:
    for t, (a, b) in enumerate(zip(compiled, eager, strict=True)):
        for x, y in zip(a, b, strict=True):
            torch.testing.assert_close(x, y, atol=tol, rtol=tol, msg=lambda m, t=t: f"step {t}: {m}")


@pytest.mark.parametrize("name", ["protoseg", "contrast", "hssn"])
def test_the_training_step_compiles_once_and_matches_eager(name):
    torch._dynamo.reset()
    counters.clear()
    head = make_heads()[name].train()
    reference = copy.deepcopy(head)
    graphs: list[int] = []
    compiled = run(head, "aot_eager", graphs)
    # At most one recompilation, after the first step (the HSSN head's hierarchy tables are
    # cached per device on first use), then none along the steps and across the warm-up.
    assert graphs[0] == 1 and graphs[-1] == graphs[1] <= 2, graphs
    assert head.steps == STEPS
    assert_runs_match(compiled, run(reference, None), tol=1e-5)


def test_the_protoseg_step_compiles_with_inductor():
    torch._dynamo.reset()
    counters.clear()
    head = make_heads()["protoseg"].train()
    reference = copy.deepcopy(head)
    graphs: list[int] = []
    compiled = run(head, "inductor", graphs)
    assert graphs == [1] * STEPS
    assert_runs_match(compiled, run(reference, None), tol=1e-4)


@pytest.mark.parametrize("name", ["protoseg", "contrast", "hssn"])
def test_labels_are_checked_inside_the_compiled_step(name):
    torch._dynamo.reset()
    head = make_heads()[name].train()
    step = torch.compile(train_step(head, PixelPrototypeCELoss()), backend="aot_eager", fullgraph=True)
    features, labels = batch(0)
    step(features, labels).backward()
    labels[1, 3, 4] = C  # not a class
    with pytest.raises(ValueError, match=rf"labels must hold classes in \[0, {C}\) or ignore_index=-1, found {C}"):
        step(features, labels)
