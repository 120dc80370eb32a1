"""Help text of the command-line tools, from their module docstrings."""

from __future__ import annotations


def plain(docstring: str) -> str:
    """A docstring's text for a terminal: reST literals (``x``) and ``::`` markers as plain text."""
    return docstring.replace("``", "").replace("::\n", ":\n")
