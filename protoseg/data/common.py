"""Conventions shared by every dataset."""

from __future__ import annotations

# Unlabelled pixels: the library-wide default (-1), so datasets, heads, losses and ops agree.
# Label files keep their own void ids (Cityscapes 255, ADE20K 0); loading maps them to this.
from protoseg_kernels import IGNORE_INDEX

__all__ = ["IGNORE_INDEX", "DatasetError"]


class DatasetError(FileNotFoundError):
    """A dataset folder or file is missing or malformed."""
