"""gumbel_index: the original code's Gumbel draw (docs/spec.md §3.6)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

import protoseg_kernels as pk


def test_matches_torch_gumbel_softmax_draw():
    # Same global RNG state: our draw equals F.gumbel_softmax(q, tau=0.5, hard=True).argmax.
    q = torch.softmax(torch.randn(500, 10), dim=1)
    torch.manual_seed(123)
    ours = pk.gumbel_index(q)
    torch.manual_seed(123)
    original = F.gumbel_softmax(q, tau=0.5, hard=True).argmax(dim=1)
    assert torch.equal(ours, original)


def test_generator_reproducible_and_zero_rows_give_minus_one():
    q = torch.softmax(torch.randn(300, 10), dim=1)
    q[::7] = 0
    a = pk.gumbel_index(q, generator=torch.Generator().manual_seed(5))
    b = pk.gumbel_index(q, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, b)
    assert bool((a[::7] == -1).all())
    keep = torch.ones(300, dtype=torch.bool)
    keep[::7] = False
    assert bool(((a[keep] >= 0) & (a[keep] < 10)).all())


def test_disagrees_with_argmax_most_of_the_time():
    # The documented quirk: with K = 10 the draw matches argmax q on only ~20% of pixels.
    q = torch.softmax(torch.randn(20000, 10) * 3, dim=1)
    agree = (pk.gumbel_index(q, generator=torch.Generator().manual_seed(0)) == q.argmax(1)).float().mean()
    assert 0.1 < float(agree) < 0.4
