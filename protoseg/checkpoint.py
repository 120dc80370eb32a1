"""Checkpoints: atomic save, load with clear errors, and rebuilding a model from one."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from .config import Config, build_config
from .data import IGNORE_INDEX
from .model import SegmentationModel, build_model

FORMAT_VERSION = 1


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> None:
    """Write ``state`` to ``path`` atomically (a crash never leaves a torn file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    torch.save({"format_version": FORMAT_VERSION, **state}, partial)
    os.replace(partial, path)


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    state = torch.load(path, map_location=map_location, weights_only=True)
    if not isinstance(state, dict) or state.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path} is not a protoseg training checkpoint (format {FORMAT_VERSION})")
    return state


def model_from_checkpoint(
    path: str | Path, device: str | torch.device = "cpu"
) -> tuple[SegmentationModel, Config, tuple[str, ...], dict[str, Any]]:
    """(model in eval mode, its config, class names, the raw checkpoint)."""
    state = load_checkpoint(path)
    config = build_config(state["config"], source=str(path))
    class_names = tuple(state["class_names"])
    model = build_model(config.model, len(class_names), IGNORE_INDEX)
    model.load_state_dict(state["model"])
    return model.to(device).eval(), config, class_names, state
