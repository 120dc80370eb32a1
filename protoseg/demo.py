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
import datetime
import os
import platform
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

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
        trainer.close()


DOCS_BEGIN, DOCS_END = "<!-- demo-results:begin -->", "<!-- demo-results:end -->"


def _percent(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.1f}"


def results_markdown(results: Mapping[str, Mapping[str, Any]], seconds: float, machine: str) -> str:
    """The demo's results as docs/training.md shows them: where and when it ran, the per-class
    IoU table of every head, and the upper levels of the hierarchy heads."""
    titles = list(results)
    class_names = list(results[titles[0]]["iou"])
    lines = [f"{machine}: `make demo` with the environment already built took {seconds:.0f} s of wall time "
             "for the four trainings, evaluations and figures. Validation IoU (%):", "",
             "| class | " + " | ".join(titles) + " |", "|---|" + "---|" * len(titles)]
    for name in class_names:
        lines.append(f"| {name} | " + " | ".join(_percent(results[t]["iou"].get(name)) for t in titles) + " |")
    lines.append("| **mIoU** | " + " | ".join(f"**{_percent(results[t]['miou'])}**" for t in titles) + " |")
    lines.append("| pixel accuracy | " + " | ".join(_percent(results[t]["pixel_accuracy"]) for t in titles) + " |")
    for title in titles:
        for level, summary in results[title].get("levels", {}).items():
            cells = ", ".join(f"{name} {_percent(iou)}" for name, iou in summary["iou"].items())
            lines += ["", f"The {title} run's {level}: {cells} IoU (mIoU {_percent(summary['miou'])})."]
    return "\n".join(lines)


def replace_results(text: str, block: str) -> str:
    """``text`` with what lies between the demo-results markers replaced by ``block``."""
    begin, end = text.find(DOCS_BEGIN), text.find(DOCS_END)
    if begin < 0 or end < begin:
        raise ValueError(f"the document has no {DOCS_BEGIN} ... {DOCS_END} block to replace")
    return text[: begin + len(DOCS_BEGIN)] + "\n" + block + "\n" + text[end:]


def machine_line() -> str:
    """'On a 2-core CPU (model), quiet or not, date, commit': what a published figure needs."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), model)
    except OSError:
        pass
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                check=True, cwd=Path(__file__).resolve().parent).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    load = f", load average {os.getloadavg()[0]:.1f}" if hasattr(os, "getloadavg") else ""
    return f"On a {cores}-core CPU ({model}{load}), {datetime.date.today().isoformat()}, commit {commit}"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m protoseg.demo", description=plain(__doc__).split("\n\n")[0])
    parser.add_argument("--out", default="runs/demo", help="output folder (default runs/demo)")
    parser.add_argument("--docs", metavar="FILE", help="also write the results into FILE between its "
                        f"{DOCS_BEGIN} and {DOCS_END} markers (make demo-docs: docs/training.md)")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value",
                        help="overrides applied to every run (e.g. optim.iters=100)")
    args = parser.parse_args(argv)
    docs = None if args.docs is None else Path(args.docs)
    if docs is not None:
        replace_results(docs.read_text(), "")  # a missing block fails now, not after the trainings
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
    seconds = time.perf_counter() - start
    print(f"total time: {seconds:.0f} s")
    if docs is not None:
        docs.write_text(replace_results(docs.read_text(), results_markdown(results, seconds, machine_line())))
        print(f"results written into {docs}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
