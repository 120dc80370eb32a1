"""Compiled-kernel report: registers, spills, stack and shared memory of every GPU
kernel, compiled ahead of time (no GPU needed). Exits non-zero if any kernel spills.

    python benchmarks/kernel_report.py [--targets 80,90]

Rows come from collector modules next to this file, each with a function

    collect(presets: dict[str, tuple[int, int, int, int]], capabilities: list[int]) -> list[dict]

returning one dict per (kernel, configuration, target) with the keys of ``COLUMNS``
(``registers``, ``spills`` (bytes of spill stores + loads), ``stack`` and ``shared``
(bytes) are ints; ``tensor_cores`` counts the tensor-core instructions (HMMA, HGMMA, ...)
in the kernel's SASS). A collector may also return ``problems``: rows whose ``problem``
key says what is wrong (e.g. a kernel that links libdevice); they fail the report.
Collectors not written yet are skipped with a note.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import time
from types import ModuleType

COLLECTORS = ("kernel_report_triton", "kernel_report_cuda")
COLUMNS = ("kernel", "config", "target", "registers", "spills", "stack", "shared", "tensor_cores")


def _sibling(name: str) -> str:
    """Module name of ``benchmarks/<name>.py``, run as a script or as part of the package."""
    return f"{__package__}.{name}" if __package__ else name


def presets() -> dict[str, tuple[int, int, int, int]]:
    """docs/spec.md §7 presets: name -> (N pixels per GPU, D, C, K)."""
    problems = importlib.import_module(_sibling("problems"))
    return {name: (p.n_gpu, p.d, p.c, p.k) for name, p in problems.PRESETS.items()}

def _import_collector(name: str) -> ModuleType | None:
    qualified = _sibling(name)
    try:
        return importlib.import_module(qualified)
    except ModuleNotFoundError as exc:
        if exc.name != qualified:  # the collector exists but a dependency of it is missing
            raise
        print(f"note: collector {name} does not exist yet, skipped")
        return None


def format_table(rows: list[dict]) -> str:
    cells = [[str(row.get(c, "-")) for c in COLUMNS] for row in rows]
    widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(COLUMNS)]
    numeric = {"registers", "spills", "stack", "shared", "tensor_cores"}

    def line(values: list[str]) -> str:
        return "  ".join(v.rjust(w) if c in numeric else v.ljust(w) for v, w, c in zip(values, widths, COLUMNS))

    return "\n".join([line(list(COLUMNS)), line(["-" * w for w in widths])] + [line(r) for r in cells])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--targets", default="80,90", help="compute capabilities, comma-separated (default 80,90)")
    args = parser.parse_args(argv)
    capabilities = [int(t) for t in args.targets.split(",") if t.strip()]
    # A report compiles kernels: Triton's interpreter would hand it Python functions instead.
    os.environ["TRITON_INTERPRET"] = "0"

    start = time.time()
    rows: list[dict] = []
    for name in COLLECTORS:
        module = _import_collector(name)
        if module is not None:
            rows += module.collect(presets(), capabilities)
    problems = [row for row in rows if row.get("problem")]
    kernels = [row for row in rows if not row.get("problem")]
    print(format_table(kernels))
    spilling = [row for row in kernels if row["spills"] > 0]
    for row in spilling:
        print(f"SPILL: {row['kernel']} [{row['config']}] on {row['target']}: {row['spills']} bytes")
    for row in problems:
        print(f"PROBLEM: {row['kernel']} [{row['config']}] on {row['target']}: {row['problem']}")
    print(f"{len(kernels)} compiled kernels, {len(spilling)} spilling, {len(problems)} problems "
          f"({time.time() - start:.0f} s)")
    return 1 if spilling or problems else 0


if __name__ == "__main__":
    sys.exit(main())
