"""tree_min_loss (docs/spec.md §11.1): the reference against a literal loop transcription,
every fused backend against the float64 reference, and the op's edge cases."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conformance import check_tree_min_loss, hierarchy_for
from conftest import fused_shapes, require_backend
from helpers import RAGGED_SHAPES, assert_bitwise_equal, make_case

import protoseg_kernels as pk

TESTS = Path(__file__).resolve().parent

F64 = torch.float64
THREE_LEVELS = pk.Hierarchy([5, 5, 6, 6, 7, 8, 8, 9, -1, -1])


def literal_tree_min(z, labels, hierarchy, gamma, scale, eps):
    """Plain loops over pixels and nodes on the scores s = σ(z); autograd for the gradient."""
    s = torch.sigmoid(z)
    total, valid = z.new_zeros(()), 0
    level_size = {h: len(hierarchy.level(h)) for h in range(hierarchy.num_levels)}
    for i, y in enumerate(int(v) for v in labels):
        if y < 0:
            continue
        valid += 1
        for v in range(hierarchy.num_nodes):
            if v in hierarchy.paths[y]:
                mcl = torch.stack([s[i, u] for u in hierarchy.paths[v]]).min()
                t = -(1 - mcl) ** gamma * torch.log(mcl + eps)
            else:
                below = [u for u in range(hierarchy.num_nodes) if v in hierarchy.paths[u]]
                mcm = torch.stack([s[i, u] for u in below]).max()
                t = -mcm ** gamma * torch.log(1 - mcm + eps)
            total = total + scale * t / level_size[hierarchy.heights[v]]
    return total / max(valid, 1)


@pytest.mark.parametrize("hierarchy", [pk.Hierarchy.cityscapes(), THREE_LEVELS], ids=["cityscapes", "three"])
@pytest.mark.parametrize("gamma", [None, 0.5, 2.0])
def test_reference_matches_literal(hierarchy, gamma, reference_backend):
    g = torch.Generator().manual_seed(0)
    z = torch.randn(23, hierarchy.num_nodes, generator=g, dtype=F64).requires_grad_()
    labels = torch.randint(-1, hierarchy.num_leaves, (23,), generator=g)
    loss = pk.tree_min_loss(z, labels, hierarchy, focal_gamma=gamma, scale=3.0)
    expected = literal_tree_min(z, labels, hierarchy, gamma or 0.0, 3.0, 1e-8)
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=1e-12)
    (grad,), (grad_expected,) = torch.autograd.grad(loss, z), torch.autograd.grad(expected, z)
    torch.testing.assert_close(grad, grad_expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("shape", RAGGED_SHAPES)
def test_reference_on_ragged_shapes_sums_and_means(shape, reference_backend):
    case = make_case(*shape, seed=1)
    h = hierarchy_for(case.shape[2])
    z = torch.randn(case.shape[0], h.num_nodes, dtype=F64, generator=torch.Generator().manual_seed(2))
    per_pixel = pk.tree_min_loss(z, case.labels, h, reduction="none")
    assert per_pixel.shape == case.labels.shape and bool((per_pixel[case.labels < 0] == 0).all())
    total = pk.tree_min_loss(z, case.labels, h, reduction="sum")
    torch.testing.assert_close(total, per_pixel.sum())
    mean = pk.tree_min_loss(z, case.labels, h)
    torch.testing.assert_close(mean, per_pixel.sum() / max(int((case.labels >= 0).sum()), 1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_fused_backend_matches_reference(fused_backend, dtype):
    for i, shape in enumerate(fused_shapes(fused_backend)):
        case = make_case(*shape, seed=60 + i)
        check_tree_min_loss(fused_backend, case, dtype)
        check_tree_min_loss(fused_backend, case, dtype, focal_gamma=None, image=True)


def test_cpu_scalar_path_matches_reference_too():
    """The cpu backend's float math runs eight pixels per AVX2 vector where the CPU has them;
    PROTOSEG_CPU_SIMD=off forces the scalar path that other CPUs take, in a fresh process."""
    require_backend("cpu", "tree_min_loss")
    code = ("import torch\nfrom conformance import check_tree_min_loss\nfrom helpers import make_case\n"
            "for i, shape in enumerate([(45, 3, 5, 2), (130, 3, 6, 2)]):\n"
            "    case = make_case(*shape, seed=90 + i)\n"
            "    for dtype in (torch.float32, torch.bfloat16):\n"
            "        check_tree_min_loss('cpu', case, dtype)\n"
            "        check_tree_min_loss('cpu', case, dtype, focal_gamma=0.5, image=True)\n"
            "print('ok')\n")
    env = {**os.environ, "PROTOSEG_CPU_SIMD": "off",
           "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-3000:]


def test_fused_backend_reads_every_layout(fused_backend):
    h = pk.Hierarchy.cityscapes()
    g = torch.Generator().manual_seed(3)
    z = torch.randn(2, 26, 3, 5, generator=g)
    labels = torch.randint(-1, 19, (2, 3, 5), generator=g)
    layouts = [z, z.to(memory_format=torch.channels_last)]
    results = []
    for logits in layouts:
        leaf = logits.detach().clone().requires_grad_()
        with pk.use_backend(fused_backend):
            loss = pk.tree_min_loss(leaf, labels, h, focal_gamma=2.0)
        loss.backward()
        results.append((loss.detach(), leaf.grad.contiguous()))
    flat = z.permute(0, 2, 3, 1).reshape(-1, 26).detach().requires_grad_()
    with pk.use_backend(fused_backend):
        loss = pk.tree_min_loss(flat, labels.reshape(-1), h, focal_gamma=2.0)
    loss.backward()
    for loss_i, grad_i in results:
        torch.testing.assert_close(loss_i, results[0][0])
        torch.testing.assert_close(grad_i, results[0][1])
    torch.testing.assert_close(loss.detach(), results[0][0])
    torch.testing.assert_close(flat.grad.view(2, 3, 5, 26).permute(0, 3, 1, 2), results[0][1])


def test_gradcheck(fused_backend):
    if fused_backend == "triton":
        pytest.skip("triton computes in fp32: no float64 gradcheck")
    g = torch.Generator().manual_seed(4)
    z = torch.randn(2, 10, 2, 3, generator=g, dtype=F64).requires_grad_()
    labels = torch.randint(-1, 5, (2, 2, 3), generator=g)
    with pk.use_backend(fused_backend):
        assert torch.autograd.gradcheck(lambda t: pk.tree_min_loss(t, labels, THREE_LEVELS, focal_gamma=2.0), (z,))


def test_ties_route_to_the_smallest_node(fused_backend):
    z = torch.zeros(4, 10).requires_grad_()  # every min and max is a tie
    labels = torch.tensor([0, 2, 4, 1])
    grads = []
    for backend in ("reference", fused_backend):
        leaf = z.detach().clone().requires_grad_()
        with pk.use_backend(backend):
            pk.tree_min_loss(leaf, labels, THREE_LEVELS).backward()
        grads.append(leaf.grad)
    torch.testing.assert_close(grads[1], grads[0])
    # pixel 0 (leaf 0): negative node 6's tied subtree max {2, 3, 6} goes to leaf 2, not to 6
    assert float(grads[0][0, 6]) == 0.0 and float(grads[0][0, 2]) != 0.0


def test_deterministic_and_inputs_unchanged(fused_backend):
    case = make_case(*fused_shapes(fused_backend)[0], seed=5)
    h = hierarchy_for(case.shape[2])
    z = torch.randn(case.shape[0], h.num_nodes, generator=torch.Generator().manual_seed(6))
    before = z.clone(), case.labels.clone()
    runs = []
    for _ in range(2):
        leaf = z.clone().requires_grad_()
        with pk.use_backend(fused_backend):
            loss = pk.tree_min_loss(leaf, case.labels, h)
        loss.backward()
        runs.append((loss.detach(), leaf.grad))
    assert_bitwise_equal(runs[0][0], runs[1][0], "loss")
    assert_bitwise_equal(runs[0][1], runs[1][1], "d logits")
    assert torch.equal(z, before[0]) and torch.equal(case.labels, before[1])


def test_all_ignored_gives_zero_and_nan_propagates(fused_backend):
    h = pk.Hierarchy.cityscapes()
    z = torch.randn(7, 26).requires_grad_()
    with pk.use_backend(fused_backend):
        loss = pk.tree_min_loss(z, torch.full((7,), -1), h)
        loss.backward()
        assert float(loss) == 0.0 and torch.count_nonzero(z.grad) == 0
        nan = torch.randn(7, 26)
        nan[3, 20] = float("nan")
        labels = torch.arange(7)
        assert torch.isnan(pk.tree_min_loss(nan, labels, h))
        labels[3] = -1  # the NaN pixel ignored: the loss stays finite
        assert torch.isfinite(pk.tree_min_loss(nan, labels, h))


def test_an_empty_batch_gives_zero_with_an_empty_gradient(fused_backend):
    for name in ("reference", fused_backend):
        z = torch.randn(0, 26, 4, 5, requires_grad=True)
        with pk.use_backend(name):
            loss = pk.tree_min_loss(z, torch.zeros(0, 4, 5, dtype=torch.long), pk.Hierarchy.cityscapes())
            loss.backward()
        assert float(loss.detach()) == 0.0 and z.grad.shape == z.shape, name


def test_opcheck(fused_backend):
    h = THREE_LEVELS
    t = h.tables("cpu")
    z = torch.randn(1, 10, 6, requires_grad=True)
    labels = torch.tensor([[0, 1, 4, -1, 2, 3]])
    args = (z, labels, t.ancestors, t.descendants, t.node_weights * 5, 5, 2.0, 1e-8, -1, True, fused_backend)
    torch.library.opcheck(torch.ops.protoseg.tree_min_loss.default, args)


def test_compiles_without_graph_breaks(reference_backend):
    h = pk.Hierarchy.cityscapes()
    z = torch.randn(2, 26, 4, 4)
    labels = torch.randint(-1, 19, (2, 4, 4))
    compiled = torch.compile(lambda t, y: pk.tree_min_loss(t, y, h, validate=False), fullgraph=True)
    torch.testing.assert_close(compiled(z, labels), pk.tree_min_loss(z, labels, h))


@pytest.mark.parametrize("kwargs,error,match", [
    ({"labels": torch.tensor([0, 5, 1])}, ValueError, "labels must hold leaf class ids"),  # 5: an internal node
    ({"labels": torch.tensor([0, 1])}, ValueError, "labels must have shape"),
    ({"labels": torch.zeros(3)}, TypeError, "labels must be an integer tensor"),
    ({"logits": torch.zeros(3, 9)}, ValueError, "one channel per node"),
    ({"logits": torch.zeros(3, 10, 2)}, ValueError, "logits must have shape"),
    ({"hierarchy": "cityscapes"}, TypeError, "hierarchy must be"),
    ({"focal_gamma": -1.0}, ValueError, "focal_gamma"),
    ({"scale": 0.0}, ValueError, "scale"),
    ({"eps": float("inf")}, ValueError, "eps"),
    ({"reduction": "max"}, ValueError, "reduction"),
])
def test_bad_arguments(kwargs, error, match):
    args = {"logits": torch.zeros(3, 10), "labels": torch.tensor([0, 1, 2]), "hierarchy": THREE_LEVELS} | kwargs
    with pytest.raises(error, match=match):
        pk.tree_min_loss(args.pop("logits"), args.pop("labels"), args.pop("hierarchy"), **args)


def test_validate_false_ignores_out_of_range_labels(reference_backend):
    z = torch.randn(4, 10, dtype=F64)
    loss = pk.tree_min_loss(z, torch.tensor([0, 7, 1, 99]), THREE_LEVELS, validate=False)
    torch.testing.assert_close(loss, pk.tree_min_loss(z, torch.tensor([0, -1, 1, -1]), THREE_LEVELS))
