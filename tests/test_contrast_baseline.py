"""The naive ContrastiveSeg baseline (benchmarks/contrast_baseline.py) computes the loss of
docs/spec.md §10.1, so the benchmark compares like with like: against the literal formulas here
(small sizes), against the op's reference in tests/test_pixel_contrast_loss.py (large)."""

from __future__ import annotations

import pytest
import torch
from contrast_cases import DENOMINATORS, MODES, make_contrast_case
from contrast_literal import pixel_contrast as literal_pixel_contrast
from helpers import F64, assert_close

from benchmarks.contrast_baseline import contrastive_loss


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("denominator", DENOMINATORS)
def test_baseline_matches_literal(mode, denominator):
    case = make_contrast_case(45, 60, 10, 4, mode, seed=21)
    kw = dict(temperature=0.07, base_temperature=0.07, denominator=denominator)
    per_anchor, counts = literal_pixel_contrast(*case.args(), **kw)
    with_positive = sum(c > 0 for c in counts)
    assert 0 < with_positive < len(counts)
    assert_close(contrastive_loss(*case.args(), **kw), per_anchor.sum() / with_positive, 1e-10)


def test_baseline_without_positives_is_zero_not_nan():
    anchors = torch.randn(6, 4, dtype=F64, requires_grad=True)
    loss = contrastive_loss(anchors, torch.arange(6))  # in-batch, every class once
    loss.backward()
    assert float(loss.detach()) == 0 and bool((anchors.grad == 0).all())


def test_baseline_rejects_an_unknown_denominator():
    with pytest.raises(ValueError, match="denominator"):
        contrastive_loss(torch.randn(3, 2), torch.zeros(3, dtype=torch.int64), denominator="infonce")
