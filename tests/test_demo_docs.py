"""``python -m protoseg.demo --docs FILE`` (``make demo-docs``): the demo's results replace the
marked block of docs/training.md, so the published table is always one real run's."""

from __future__ import annotations

from pathlib import Path

import pytest

from protoseg import demo

TRAINING_DOCS = Path(__file__).resolve().parents[1] / "docs" / "training.md"


def fake_summary(miou: float, with_levels: bool = False) -> dict:
    summary = {"iou": {"background": 0.95, "class-A": miou}, "miou": miou, "pixel_accuracy": 0.9}
    if with_levels:
        summary["levels"] = {"level 1": {"iou": {"stuff": 0.96, "thing": 0.91}, "miou": 0.935}}
    return summary


def test_the_results_replace_the_marked_block_and_nothing_else():
    text = TRAINING_DOCS.read_text()
    results = {"ProtoSeg": fake_summary(0.7), "HSSN": fake_summary(0.65, with_levels=True)}
    block = demo.results_markdown(results, 123.4, "On a test machine")
    updated = demo.replace_results(text, block)
    before, after = text.split(demo.DOCS_BEGIN)[0], text.split(demo.DOCS_END)[1]
    assert updated.startswith(before) and updated.endswith(after)
    assert "On a test machine: `make demo` with the environment already built took 123 s" in updated
    assert "| class | ProtoSeg | HSSN |" in updated and "| class-A | 70.0 | 65.0 |" in updated
    assert "| **mIoU** | **70.0** | **65.0** |" in updated
    assert "The HSSN run's level 1: stuff 96.0, thing 91.0 IoU (mIoU 93.5)." in updated
    assert demo.replace_results(updated, block) == updated  # idempotent


def test_the_published_block_has_the_generated_shape():
    text = TRAINING_DOCS.read_text()
    published = text.split(demo.DOCS_BEGIN)[1].split(demo.DOCS_END)[0]
    rows = [line for line in published.splitlines() if line.startswith("| ")]
    assert rows[0] == "| class | ProtoSeg | linear | ContrastiveSeg | HSSN |"  # demo.RUNS, in order
    assert rows[0] == "| class | " + " | ".join(demo.RUNS) + " |"
    assert any(line.startswith("| **mIoU** |") for line in rows)


def test_a_file_without_the_block_is_refused_before_any_training(tmp_path):
    target = tmp_path / "notes.md"
    target.write_text("no markers here\n")
    with pytest.raises(ValueError, match="demo-results:begin"):
        demo.main(["--out", str(tmp_path / "runs"), "--docs", str(target)])
    assert not (tmp_path / "runs").exists()
