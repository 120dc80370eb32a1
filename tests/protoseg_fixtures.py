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


class Interrupted(Exception):
    """Raised by :func:`train_until_first_checkpoint` right after the first save."""


def train_until_first_checkpoint(trainer, monkeypatch) -> None:
    """Train ``trainer`` until it has written its first checkpoint, then stop, as a run
    killed just after saving would."""
    from protoseg.trainer import Trainer

    original_save = Trainer.save

    def save_then_stop(self, path=None):
        original_save(self, path)
        raise Interrupted

    monkeypatch.setattr(Trainer, "save", save_then_stop)
    with pytest.raises(Interrupted):
        trainer.train()
    monkeypatch.setattr(Trainer, "save", original_save)


def assert_same_state(expected: dict, actual: dict) -> None:
    """Two state dicts hold the same keys and bitwise equal values."""
    assert expected.keys() == actual.keys()
    for key in expected:
        if isinstance(expected[key], torch.Tensor):
            assert torch.equal(expected[key], actual[key]), key
        else:
            assert expected[key] == actual[key], key
