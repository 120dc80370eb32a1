"""``python -m protoseg.demo`` (``make demo``): every head of the package side by side.

Trains the small CNN with each head on the same schedule (packaged config ``demo``), on
the embedded synthetic scenes: ProtoSeg, a 1×1 conv classifier (linear), ContrastiveSeg
(the linear classifier plus a projection head trained with pixel contrast against the
memory bank) and HSSN (node logits over the dataset's two-level hierarchy, tree-min,
per-level cross-entropies and the tree-triplet loss); prints their per-class IoU side by side
and writes the checkpoints, logs and figures under ``--out`` (default ``runs/demo``).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from ._help import plain
from .config import load_config
from .evaluation import format_iou_table

RUNS = {"ProtoSeg": "protoseg", "linear": "linear", "ContrastiveSeg": "contrast", "HSSN": "hssn"}  # title: model.head


def train_run(head: str, out: Path, extra: Sequence[str]) -> dict:
    from .trainer import Trainer

    # The demo replaces its own earlier runs (a fresh run each time).
    config = load_config("demo", (f"model.head={head}", f"train.output_dir={out / head}", "train.overwrite=true",
                                  *extra))
    trainer = Trainer(config)
    try:
        return trainer.train()
    finally:
        trainer.context.close()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m protoseg.demo", description=plain(__doc__).split("\n\n")[0])
    parser.add_argument("--out", default="runs/demo", help="output folder (default runs/demo)")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value",
                        help="overrides applied to every run (e.g. optim.iters=100)")
    args = parser.parse_args(argv)
    out = Path(args.out)
    start = time.perf_counter()
    results = {}
    for title, head in RUNS.items():
        print(f"== training {title} ({out / head})", flush=True)
        results[title] = train_run(head, out, args.overrides)
    from .visualize import run as visualize

    others = [f"{title}={out / head / 'log.jsonl'}" for title, head in RUNS.items() if head != "protoseg"]
    figures = visualize([str(out / "protoseg" / "last.pt"), "--out", str(out / "figures"), "--label", "ProtoSeg",
                         *(arg for other in others for arg in ("--compare", other))])
    for title, head in (("ContrastiveSeg", "contrast"), ("HSSN", "hssn")):
        figures += visualize([str(out / head / "last.pt"), "--out", str(out / "figures" / head), "--label", title])
    class_names = list(results["ProtoSeg"]["iou"])
    print("\nValidation IoU (%), same backbone and schedule:")
    print(format_iou_table(class_names, results))
    print("\nfigures:\n" + "\n".join(f"  {path}" for path in figures))
    print("checkpoints: " + ", ".join(str(out / head / "last.pt") for head in RUNS.values()))
    print(f"total time: {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
