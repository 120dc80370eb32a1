"""The contract lives in the repository (docs/spec.md §9): every ``docs/spec.md §N`` cited
by the code, the tests and the docs names a section that docs/spec.md has, and nothing cites
a contract outside the repository."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SPEC = ROOT / "docs" / "spec.md"
CITATION = re.compile(r"docs/spec\.md §(\d+(?:\.\d+)?)")
HEADING = re.compile(r"^#+ §(\d+(?:\.\d+)?)\b", re.MULTILINE)
OUTSIDE = re.compile(r"\bSPEC §|shared/SPEC")


def spec_sections() -> set[str]:
    return set(HEADING.findall(SPEC.read_text()))


def tracked_text_files() -> list[Path]:
    try:
        out = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("needs a git checkout")
    suffixes = {".py", ".md", ".h", ".cpp", ".cu", ".cuh", ".toml", ".yaml", ""}
    return [ROOT / name for name in out.splitlines() if Path(name).suffix in suffixes and (ROOT / name).is_file()]


def test_spec_has_the_numbered_sections_the_ops_need():
    assert {"3.1", "3.2", "3.3", "3.4", "3.5", "3.6", "3.7", "4", "5", "7", "10.1"} <= spec_sections()


def test_every_citation_names_a_section_of_the_spec():
    sections = spec_sections()
    dangling = []
    for path in tracked_text_files():
        for number in CITATION.findall(path.read_text(errors="replace")):
            # "§5." at the end of a sentence cites §5
            if number.rstrip(".") not in sections:
                dangling.append(f"{path.relative_to(ROOT)}: §{number}")
    assert not dangling, dangling


def test_nothing_cites_a_contract_outside_the_repository():
    offenders = [str(p.relative_to(ROOT)) for p in tracked_text_files()
                 if p not in (SPEC, Path(__file__).resolve()) and OUTSIDE.search(p.read_text(errors="replace"))]
    assert not offenders, offenders
