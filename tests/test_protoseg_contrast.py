"""protoseg.contrast: the gathered target similarity and PPC/PPD of the one-pass head,
against autograd through a plain gather (float64)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from protoseg.contrast import ROW_BLOCKS, contrast_losses, target_similarity

F64 = torch.float64


def _inputs(n: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 9, generator=g, dtype=F64)
    flat = F.normalize(torch.randn(5, 9, generator=g, dtype=F64), dim=1)
    target = torch.randint(0, 5, (n,), generator=g)
    upstream = torch.randn(n, generator=g, dtype=F64)
    return x, flat, target, upstream


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("n", [1, ROW_BLOCKS + 3, 61])
def test_target_similarity_matches_autograd_of_a_gather(n, normalize):
    x, flat, target, upstream = _inputs(n, seed=n)
    x[0] *= 1e-14  # below the clamp of F.normalize: the other branch of its gradient
    x_ours, x_torch = x.clone().requires_grad_(), x.clone().requires_grad_()
    ours = target_similarity(x_ours, flat, target, normalize=normalize)
    expected = ((F.normalize(x_torch, dim=1) if normalize else x_torch) * flat[target]).sum(1)
    torch.testing.assert_close(ours, expected, rtol=1e-12, atol=1e-12)
    ours.backward(upstream)
    expected.backward(upstream)
    torch.testing.assert_close(x_ours.grad, x_torch.grad, rtol=1e-10, atol=1e-10)


def test_target_similarity_empty_and_dtype_mismatch():
    x, flat, target, _ = _inputs(0, seed=1)
    assert target_similarity(x, flat, target, normalize=True).shape == (0,)
    with pytest.raises(TypeError, match="flat_prototypes"):
        target_similarity(x, flat.float(), target, normalize=True)


def test_contrast_losses_match_the_formulas_over_labelled_pixels():
    x, flat, target, _ = _inputs(40, seed=2)
    target[::3] = -1
    lse = torch.randn(40, dtype=F64).abs() + 2
    x = x.requires_grad_()
    ppc, ppd = contrast_losses(x, flat, lse, target, 0.1, normalize=True)
    labelled = target >= 0
    s = (F.normalize(x[labelled], dim=1) * flat[target[labelled]]).sum(1)
    torch.testing.assert_close(ppc, (lse[labelled] - s / 0.1).mean())
    torch.testing.assert_close(ppd, ((1 - s) ** 2).mean())


def test_contrast_losses_are_zero_without_labelled_pixels():
    x, flat, _, _ = _inputs(7, seed=3)
    x = x.requires_grad_()
    ppc, ppd = contrast_losses(x, flat, torch.randn(7, dtype=F64), torch.full((7,), -1), 0.1, normalize=False)
    (ppc + ppd).backward()
    assert ppc.item() == 0 and ppd.item() == 0
    assert torch.equal(x.grad, torch.zeros_like(x))
