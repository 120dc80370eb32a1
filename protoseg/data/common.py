"""Conventions shared by every dataset."""

from __future__ import annotations

IGNORE_INDEX = 255  # label of unlabelled pixels in every dataset of this package


class DatasetError(FileNotFoundError):
    """A dataset folder or file is missing or malformed."""
