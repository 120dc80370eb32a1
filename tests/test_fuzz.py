"""The differential fuzzer (tests/fuzz.py) under a fixed seed and a one-minute budget: random
shapes, dtypes, layouts, NaN, ±inf and hostile indices, every fused backend against the float64
reference. ``make fuzz`` runs a longer campaign with a fresh seed."""

from __future__ import annotations

import fuzz

SEED = 20261202
BUDGET_S = 60


def test_fuzz_campaign_finds_no_difference():
    report = fuzz.fuzz(BUDGET_S, SEED)
    print(report.summary())
    assert sum(report.cases.values()) >= 50, f"too few cases ran: {report.summary()}"
    assert set(report.cases) == set(fuzz.OPS) | set(fuzz.SINGLE_IMPLEMENTATION), \
        f"every op must be drawn: {report.summary()}"
