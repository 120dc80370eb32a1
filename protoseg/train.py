"""``python -m protoseg.train [CONFIG] [section.key=value ...]`` (``protoseg-train``).

Trains a segmentation model (ProtoSeg, ContrastiveSeg or HSSN head, or the linear baseline), evaluating
per-class IoU and mIoU, writing ``log.jsonl``, ``metrics.json`` and ``last.pt``
under ``train.output_dir``. CONFIG is a YAML file or the name of a packaged
config (``demo``, ``cityscapes``, ``ade20k``, ``cityscapes_contrast``, ...). Data-parallel on several processes
with ``torchrun --nproc_per_node=N -m protoseg.train ...`` (NCCL on GPU, gloo on
CPU).

Examples::

    python -m protoseg.train demo
    python -m protoseg.train demo model.head=linear train.output_dir=runs/linear
    python -m protoseg.train my.yaml optim.lr=0.005 train.resume=auto
    torchrun --nproc_per_node=2 -m protoseg.train cityscapes data.root=/data/cityscapes
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

from ._help import plain
from .config import ConfigError, load_config, packaged_config_names


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    _, description, _, examples = plain(__doc__).split("\n\n")
    parser = argparse.ArgumentParser(
        prog="protoseg-train", description=description, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=f"examples:\n{examples}\n\npackaged configs: {', '.join(packaged_config_names())}",
    )
    parser.add_argument("config", nargs="?", help="YAML config file or packaged config name (default: built-in "
                        "defaults)")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value", help="config overrides")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    args = parser.parse_args(argv)
    if args.config is not None and "=" in args.config:  # only overrides were given
        args.overrides.insert(0, args.config)
        args.config = None
    return args


def run(argv: Sequence[str] | None = None) -> dict[str, Any] | None:
    """Parse ``argv`` and train; returns the final evaluation (None with --print-config).
    Raises :class:`ConfigError` / :class:`DatasetError` on bad input."""
    args = parse_args(argv)
    config = load_config(args.config, tuple(args.overrides))
    if args.print_config:
        import yaml

        print(yaml.safe_dump(config.to_dict(), sort_keys=False), end="")
        return None
    from .trainer import Trainer  # imports torch; kept out of --help

    trainer = Trainer(config)
    try:
        return trainer.train()
    finally:
        trainer.close()


def _input_errors() -> tuple[type[Exception], ...]:
    """What bad input raises: reported as one line. Imported on demand (torch)."""
    from .checkpoint import CheckpointError
    from .data import DatasetError

    return ConfigError, DatasetError, CheckpointError, FileNotFoundError


def main(argv: Sequence[str] | None = None) -> int:
    try:
        run(argv)
    except SystemExit:  # --help, argparse errors: no need to import torch to test them
        raise
    except _input_errors() as exc:
        print(f"protoseg-train: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
