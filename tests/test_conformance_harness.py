"""The conformance checks can fail: a backend that is slightly wrong in one kernel
(broken_backend.py) is caught, and the unbroken copy passes."""

from __future__ import annotations

import broken_backend
import conformance
import pytest
import torch
from helpers import make_case

from protoseg_kernels import _backend


@pytest.fixture
def broken(monkeypatch):
    monkeypatch.setitem(_backend._MODULES, "cuda_emulated", "broken_backend")
    _backend._load.cache_clear()
    yield "cuda_emulated"
    _backend._load.cache_clear()


CHECKS = {
    "scores": lambda b, c: conformance.check_class_scores(b, c, torch.float32),
    "unwritten": lambda b, c: conformance.check_class_scores(b, c, torch.float32),
    "grad": lambda b, c: conformance.check_class_scores(b, c, torch.float32, lse_temperature=0.1),
    "index": lambda b, c: conformance.check_sinkhorn_assign(b, c, torch.float32),
    "update": lambda b, c: conformance.check_update_prototypes(b, c, torch.float32),
}


@pytest.mark.parametrize("mode", sorted(CHECKS))
def test_perturbed_kernel_is_caught(broken, monkeypatch, mode):
    case = make_case(200, 16, 5, 4, seed=1)
    monkeypatch.setattr(broken_backend, "BREAK", "")
    CHECKS[mode](broken, case)  # the faithful copy passes
    monkeypatch.setattr(broken_backend, "BREAK", mode)
    with pytest.raises(AssertionError):
        CHECKS[mode](broken, case)
