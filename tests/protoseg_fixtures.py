"""Fixtures shared by the protoseg test files."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def single_thread():
    """The tensors of these tests are tiny: one intra-op thread is as fast, and it
    avoids OpenMP threads spinning at barriers, which slows a busy 2-core machine
    down tenfold."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
