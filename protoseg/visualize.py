"""``python -m protoseg.visualize CHECKPOINT``: figures of a trained model.

Writes, next to the checkpoint (or under ``--out``):

* ``similarity_<class>.png``: similarity maps of validation images to each prototype
  of a class (``--class``; default: the most frequent class after the most frequent);
* ``embedding_pca.png``: pixel embeddings (and prototypes) of a few classes in 2-D;
* ``curves.png``: losses and validation mIoU from the run's ``log.jsonl``
  (``--compare NAME=LOG`` adds other runs).

A contrast-head or HSSN-head checkpoint gets the projection and the curves; a linear-head one
the curves only.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from ._help import plain
from .checkpoint import model_from_checkpoint
from .data import build_datasets
from .head import ProtoSegHead


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m protoseg.visualize", description=plain(__doc__).split("\n\n")[0])
    parser.add_argument("checkpoint", help="a training checkpoint (last.pt)")
    parser.add_argument("--out", help="output folder (default: the checkpoint's folder)")
    parser.add_argument("--class", dest="class_names", action="append", metavar="NAME",
                        help="class of the similarity maps (repeatable)")
    parser.add_argument("--images", type=int, default=3, help="images per similarity figure (default 3)")
    parser.add_argument("--projection-classes", type=int, default=4,
                        help="classes in the embedding projection (default 4, the most frequent)")
    parser.add_argument("--compare", action="append", default=[], metavar="NAME=LOG",
                        help="another run's log.jsonl to draw in the curves")
    parser.add_argument("--label", default=None, help="name of this run in the curves (default: its head)")
    return parser.parse_args(argv)


def class_frequencies(dataset, num_classes: int, scan: int = 100) -> torch.Tensor:
    counts = torch.zeros(num_classes, dtype=torch.int64)
    for index in range(min(scan, len(dataset))):
        labels = dataset[index][1]
        counts += torch.bincount(labels[(labels >= 0) & (labels < num_classes)].flatten(), minlength=num_classes)
    return counts


def _resolve_classes(requested: list[str] | None, class_names: Sequence[str], frequency: torch.Tensor) -> list[int]:
    if requested:
        unknown = [name for name in requested if name not in class_names]
        if unknown:
            raise ValueError(f"unknown class {unknown[0]!r}; classes: {', '.join(class_names)}")
        return [class_names.index(name) for name in requested]
    order = frequency.argsort(descending=True).tolist()
    return [order[1] if len(order) > 1 else order[0]]


def _compare_logs(entries: list[str]) -> dict[str, Path]:
    logs = {}
    for entry in entries:
        name, sep, path = entry.partition("=")
        if not sep or not name:
            raise ValueError(f"--compare expects NAME=PATH_TO_LOG, got {entry!r}")
        logs[name] = Path(path)
    return logs


def run(argv: Sequence[str] | None = None) -> list[Path]:
    from . import figures  # imports matplotlib

    args = parse_args(argv)
    checkpoint = Path(args.checkpoint)
    model, config, class_names, _ = model_from_checkpoint(checkpoint)
    out = Path(args.out) if args.out else checkpoint.parent
    label = args.label or config.model.head
    logs = {label: checkpoint.parent / "log.jsonl", **_compare_logs(args.compare)}
    written = [figures.plot_training_curves(logs, out / "curves.png")]
    if not isinstance(model.head, figures.EMBEDDING_HEADS):
        return written
    dataset = build_datasets(config.data, seed=config.train.seed).val
    frequency = class_frequencies(dataset, len(class_names))
    similarity_classes = _resolve_classes(args.class_names, class_names, frequency)
    for c in similarity_classes if isinstance(model.head, ProtoSegHead) else ():
        safe = class_names[c].replace(" ", "_").replace("/", "_")
        written.append(figures.plot_similarity_maps(model, dataset, c, class_names[c],
                                                    out / f"similarity_{safe}.png", args.images))
    present = [c for c in frequency.argsort(descending=True).tolist() if frequency[c] > 0]
    written.append(figures.plot_embedding_projection(model, dataset, present[:args.projection_classes], class_names,
                                                     out / "embedding_pca.png"))
    return written


def main(argv: Sequence[str] | None = None) -> int:
    try:
        for path in run(argv):
            print(f"wrote {path}")
    except (ValueError, FileNotFoundError) as exc:
        print(f"protoseg.visualize: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
