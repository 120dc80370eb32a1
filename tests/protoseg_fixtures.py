"""Fixtures shared by the protoseg test files."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml


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


def resume_matches_a_straight_run(config: str, overrides: tuple, tmp_path, monkeypatch, checkpoint_every: int):
    """Train straight through, and again killed after the first checkpoint then resumed;
    assert both end in bitwise the same model. Returns the resumed trainer."""
    from protoseg.config import load_config
    from protoseg.trainer import Trainer

    common = (*overrides, f"train.checkpoint_every={checkpoint_every}")
    straight = Trainer(load_config(config, (*common, f"train.output_dir={tmp_path / 'a'}")))
    straight.train()
    train_until_first_checkpoint(Trainer(load_config(config, (*common, f"train.output_dir={tmp_path / 'b'}"))),
                                 monkeypatch)
    resumed = Trainer(load_config(config, (*common, f"train.output_dir={tmp_path / 'b'}", "train.resume=auto")))
    assert resumed.iteration == checkpoint_every
    resumed.train()
    assert_same_state(straight.model.state_dict(), resumed.model.state_dict())
    return resumed


def tiny_training_config(train_images: int = 24, val_images: int = 6, iters: int = 6, log_every: int = 2,
                         eval_every: int = 3) -> dict:
    """A ProtoSeg training config that runs in seconds on the synthetic dataset (for a YAML file)."""
    return {
        "model": {"width": 8, "embed_dim": 16, "num_prototypes": 2, "momentum": 0.9},
        "data": {"synthetic_train_images": train_images, "synthetic_val_images": val_images,
                 "synthetic_image_size": 32, "crop_size": [32, 32], "batch_size": 4, "val_batch_size": 3},
        "optim": {"optimizer": "sgd", "lr": 0.05, "iters": iters},
        "train": {"log_every": log_every, "eval_every": eval_every, "progress": False},
    }


def write_tiny_training_config(folder: Path, **sizes) -> Path:
    """``folder/tiny.yaml`` holding :func:`tiny_training_config` (``sizes`` are its arguments)."""
    path = folder / "tiny.yaml"
    path.write_text(yaml.safe_dump(tiny_training_config(**sizes)))
    return path
