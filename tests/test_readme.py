"""The Python examples of the README and of docs/*.md run as written.

Only blocks fenced as ```python are run; a sketch that is not meant to run uses a plain fence.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
# docs/integration.md's examples run in test_integration.py, which also checks what they claim
# and skips those whose backbone library (torchvision, timm) is not installed.
DOCUMENTS = [README, *sorted(path for path in (ROOT / "docs").glob("*.md") if path.name != "integration.md")]


def python_blocks(path: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", path.read_text(), flags=re.S)


BLOCKS = [(path, index, block) for path in DOCUMENTS for index, block in enumerate(python_blocks(path))]


def test_readme_has_an_example():
    assert python_blocks(README), "the README shows no runnable example"


@pytest.mark.parametrize(
    "path, index, block", BLOCKS, ids=[f"{path.relative_to(ROOT)}-{index}" for path, index, _ in BLOCKS]
)
def test_documented_example_runs(path, index, block):
    exec(compile(block, f"{path.relative_to(ROOT)} block {index}", "exec"), {})
