"""The benchmark suites: which problems and implementations each one measures.

* ``default`` (``make bench``): the three presets of docs/spec.md §7 for the whole head
  step with every implementation (``torch.compile`` included), a sweep over N at
  the ADE20K preset, and the per-op rows at ADE20K. On a CPU, the presets' N is
  the per-GPU pixel count divided by 4 and the sweep's and op rows' by 8, so that
  the suite fits in minutes on 2 cores (``problems.CPU_PRESET_SCALE_DOWN`` says
  why the presets are larger).
* ``full``: also the per-op rows at every preset, ``torch.compile`` in the
  sweep, a longer sweep and more timed runs.
* ``memory``: the head step at the three presets with the per-GPU N of docs/spec.md §7
  (no scale-down, also on a CPU), baseline and protoseg backends, three timed
  runs: the memory ratios at the sizes users train at, where the fixed C·K·D
  buffers (prepared and updated prototypes) no longer weigh 8× more than at N/8.
* ``default`` and ``full`` also time the pixel-contrast presets of docs/spec.md §7
  (benchmarks/contrast_cases.py: in-batch, bank, dense with A / 8 on a CPU) and the whole
  ContrastiveSeg training step of docs/spec.md §12 (benchmarks/contrast_step.py: sampling,
  loss, bank update and backward, bank and in-batch, the same sizes on a CPU and a GPU), and
  HSSN's two losses forward + backward (benchmarks/hssn_cases.py: tree-min at the Cityscapes
  logits, their pixel count / 4 on a CPU; tree-triplet on the stride-8 embedding, the same
  size on a CPU and a GPU).
* ``smoke``: tiny sizes, two timed runs, one thread and one worker process, for
  the test suite and a first look (about 40 s; no RSS column: that needs a process per
  implementation; no alternation: its times are a sanity check, not a measurement).

Every suite but ``smoke`` times the implementations of each problem in alternation, in
rounds (benchmarks/alternation.py), and records the machine's foreign load in each round.
"""

from __future__ import annotations

from dataclasses import dataclass

from . import contrast_step, hssn_cases
from .contrast_cases import presets as contrast_presets
from .measure import TimingPlan
from .problems import CPU_PRESET_SCALE_DOWN, CPU_SCALE_DOWN, PRESETS, Problem

SUITES = ("default", "full", "memory", "smoke")
SWEEP_PRESET = "ade20k"
TINY = Problem("tiny", n=256, d=32, c=6, k=3)
TINY_CONTRAST = (Problem("in_batch", n=96, d=16, c=4, k=0, contrast="in_batch", m=96),
                 Problem("bank", n=96, d=16, c=4, k=0, contrast="bank", m=400))


@dataclass(frozen=True)
class Suite:
    name: str
    presets: tuple[Problem, ...]  # head step, every implementation
    sweep: tuple[Problem, ...]  # head step versus N
    ops: tuple[Problem, ...]  # per-op rows
    plan: TimingPlan
    compile_presets: bool
    compile_sweep: bool
    # each implementation in its own persistent process, the implementations of a problem
    # timed in alternation (benchmarks/alternation.py); else all jobs in one process
    alternate: bool = True
    threads: int | None = None  # torch threads in the workers (None: torch's default)
    scale_down: int | None = 1  # preset N = per-GPU N / scale_down (None: not the presets)
    # (the sweep and op rows on a CPU: per-GPU N / CPU_SCALE_DOWN)
    contrast: tuple[Problem, ...] = ()  # pixel-contrast rows (benchmarks/contrast_cases.py)
    contrast_step: tuple[Problem, ...] = ()  # ContrastiveSeg steps (benchmarks/contrast_step.py)
    hierarchy: tuple[Problem, ...] = ()  # HSSN losses (benchmarks/hssn_cases.py)


def _preset_problems(scale_down: int) -> tuple[Problem, ...]:
    return tuple(p.problem(p.n_gpu // scale_down) for p in PRESETS.values())


def _sweep(scale_down: int, factors: tuple[int, ...]) -> tuple[Problem, ...]:
    preset = PRESETS[SWEEP_PRESET]
    base = preset.n_gpu // scale_down
    return tuple(preset.problem(base * f // 4) for f in factors)


def build_suite(name: str, device_type: str, compile_baseline: bool = True) -> Suite:
    """The suite ``name`` for ``device_type`` ("cpu" or "cuda")."""
    if name not in SUITES:
        raise ValueError(f"suite must be one of {SUITES}, got {name!r}")
    if name == "smoke":
        plan = TimingPlan(warmup=1, min_runs=2, max_runs=2, target_seconds=0.0)
        return Suite(name, (TINY,), (TINY.with_n(128), TINY), (TINY,), plan, compile_baseline, False,
                     alternate=False, threads=1, scale_down=None, contrast=TINY_CONTRAST,
                     contrast_step=contrast_step.problems(contrast_step.TINY),
                     hierarchy=hssn_cases.problems(device_type, hssn_cases.TINY))
    if name == "memory":
        plan = TimingPlan(warmup=1, min_runs=3, max_runs=3, target_seconds=0.0, rounds=3)
        return Suite(name, _preset_problems(1), (), (), plan, False, False)
    gpu = device_type == "cuda"
    preset_scale, scale_down = (1, 1) if gpu else (CPU_PRESET_SCALE_DOWN, CPU_SCALE_DOWN)
    presets = _preset_problems(preset_scale)
    small = _preset_problems(scale_down)  # the op rows' sizes
    if name == "default":
        plan = TimingPlan(warmup=5, min_runs=20, max_runs=200, target_seconds=1.0, rounds=4) if gpu else \
            TimingPlan(warmup=2, min_runs=9, max_runs=15, target_seconds=2.0, rounds=3)
        sweep = _sweep(scale_down, (1, 2, 4, 8))
        ops = small if gpu else tuple(p for p in small if p.name == SWEEP_PRESET)
        return Suite(name, presets, sweep, ops, plan, compile_baseline, False, scale_down=preset_scale,
                     contrast=contrast_presets(device_type), contrast_step=contrast_step.problems(),
                     hierarchy=hssn_cases.problems(device_type))
    plan = TimingPlan(warmup=10, min_runs=50, max_runs=500, target_seconds=3.0, rounds=5) if gpu else \
        TimingPlan(warmup=3, min_runs=10, max_runs=30, target_seconds=5.0, rounds=5)
    sweep = _sweep(scale_down, (1, 2, 4, 8, 16))
    return Suite(name, presets, sweep, small, plan, compile_baseline, compile_baseline, scale_down=preset_scale,
                 contrast=contrast_presets(device_type), contrast_step=contrast_step.problems(),
                 hierarchy=hssn_cases.problems(device_type))
