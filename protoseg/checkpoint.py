"""Checkpoints: atomic, checksummed save; load that refuses a corrupt file, naming it; and
rebuilding a model from one. Also the atomic file writes the trainer uses for its logs.

A checkpoint is a ``torch.save`` dict (``torch.load`` reads it as usual) holding, besides
the training state, ``format_version`` and ``checksum``: the SHA-256 of every key, value
and tensor byte of the state, in a fixed order. ``load_checkpoint`` recomputes it, so a
flipped bit in a weight is refused instead of resuming with a changed model.
"""

from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path
from typing import Any

import torch

from .config import Config, ConfigError, build_config
from .data import IGNORE_INDEX
from .hierarchies import model_hierarchy
from .model import SegmentationModel, build_model

FORMAT_VERSION = 2
UNCHECKED_FORMATS = (1,)  # written before checksums: loaded without verification
REQUIRED_KEYS = ("config", "class_names", "model")


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used: unreadable, foreign, incomplete or corrupt."""


def _fsync_directory(path: Path) -> None:
    try:
        descriptor = os.open(path, os.O_RDONLY)
    except OSError:  # a platform without directory descriptors
        return
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that a crash leaves either the old file or the new
    one, never a torn one: a sibling temporary file, fsync, rename, fsync of the folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    with partial.open("wb") as stream:
        stream.write(data)
        stream.flush()
        os.fsync(stream.fileno())
    os.replace(partial, path)
    _fsync_directory(path.parent)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def _feed(digest: Any, value: Any) -> None:
    """Hash ``value`` (dicts, sequences, tensors, scalars) in a fixed traversal order."""
    if isinstance(value, torch.Tensor):
        t = value.detach().cpu().contiguous().reshape(-1)  # 1-D: a 0-d tensor has no byte view
        digest.update(f"tensor {t.dtype} {tuple(value.shape)}|".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    elif isinstance(value, dict):
        digest.update(f"dict {len(value)}|".encode())
        for key in sorted(value, key=repr):
            digest.update(f"{key!r}:".encode())
            _feed(digest, value[key])
    elif isinstance(value, (list, tuple)):
        digest.update(f"{type(value).__name__} {len(value)}|".encode())
        for item in value:
            _feed(digest, item)
    else:
        digest.update(f"{type(value).__name__} {value!r}|".encode())


def checksum(state: dict[str, Any]) -> str:
    """SHA-256 of a checkpoint's state (without its ``checksum`` entry)."""
    digest = hashlib.sha256()
    _feed(digest, {k: v for k, v in state.items() if k != "checksum"})
    return digest.hexdigest()


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> None:
    """Write ``state`` to ``path`` atomically, with its checksum."""
    state = {"format_version": FORMAT_VERSION, **state}
    buffer = io.BytesIO()
    torch.save({**state, "checksum": checksum(state)}, buffer)
    atomic_write_bytes(path, buffer.getvalue())


RESUME_ADVICE = "point train.resume at another checkpoint, or move it away to start afresh"
INFERENCE_ADVICE = "load another checkpoint (a run's last.pt), or train the model again"


def _refuse(path: Path, problem: str, advice: str = RESUME_ADVICE) -> CheckpointError:
    return CheckpointError(f"checkpoint {path} {problem}; it cannot be used: {advice}")


def load_checkpoint(
    path: str | Path, map_location: str | torch.device = "cpu", *, advice: str = RESUME_ADVICE
) -> dict[str, Any]:
    """The state saved by :func:`save_checkpoint`; :class:`CheckpointError` (naming the file,
    then ``advice``) for an empty, truncated, foreign, incomplete or corrupt one."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.stat().st_size == 0:
        raise _refuse(path, "is empty", advice)
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # torch raises zip, pickle and EOF errors of many kinds
        first_line = (str(exc).strip().splitlines() or [""])[0][:200]
        raise _refuse(path, f"cannot be read (truncated or not a checkpoint: {type(exc).__name__}: "
                            f"{first_line})", advice) from exc
    if not isinstance(state, dict) or "format_version" not in state:
        raise _refuse(path, "is not a protoseg training checkpoint", advice)
    version = state["format_version"]
    if version != FORMAT_VERSION and version not in UNCHECKED_FORMATS:
        raise _refuse(path, f"has format {version!r}, this protoseg reads {FORMAT_VERSION}", advice)
    missing = [key for key in REQUIRED_KEYS if key not in state]
    if missing:
        raise _refuse(path, f"lacks {', '.join(missing)}", advice)
    if version == FORMAT_VERSION and state.get("checksum") != checksum(state):
        raise _refuse(path, "is corrupt (its content does not match its checksum)", advice)
    return state


def model_from_checkpoint(
    path: str | Path, device: str | torch.device = "cpu"
) -> tuple[SegmentationModel, Config, tuple[str, ...], dict[str, Any]]:
    """(model in eval mode on ``device``, its config, class names, the raw checkpoint) of a
    checkpoint the trainer wrote (``protoseg-train``: ``<train.output_dir>/last.pt``), for
    inference. An empty, truncated, foreign, incomplete or corrupt file (checksum), or one whose
    config or weights this protoseg does not accept, raises :class:`CheckpointError` naming it."""
    path = Path(path)
    state = load_checkpoint(path, advice=INFERENCE_ADVICE)
    try:
        config = build_config(state["config"], source=str(path))
    except ConfigError as exc:
        raise _refuse(path, f"holds a config this protoseg does not accept ({exc})", INFERENCE_ADVICE) from exc
    class_names = tuple(state["class_names"])
    model = build_model(config.model, len(class_names), IGNORE_INDEX,
                        hierarchy=model_hierarchy(config, class_names))
    try:
        model.load_state_dict(state["model"])
    except (RuntimeError, KeyError, TypeError) as exc:
        first_line = (str(exc).strip().splitlines() or [""])[0][:200]
        raise _refuse(path, f"holds weights that do not fit its model ({first_line})", INFERENCE_ADVICE) from exc
    return model.to(device).eval(), config, class_names, state
