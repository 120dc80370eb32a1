"""Derived columns, the terminal/markdown tables, the docs/spec.md §7 target check, and files.

Columns (docs/benchmarks.md explains them for users):
median / p20 / p80 ms, GFLOP/s (useful FLOPs / median), × floor (median / GEMM
floor), speed-up (baseline median / median), peak extra memory (allocator; RSS
growth on CPU), memory vs baseline (peak / baseline peak), host syncs per step.

Trust marks: a row is *noisy* when other work kept the machine busy during one of its
rounds, *unstable* when its rounds disagree (benchmarks/load.py); its median carries a
``*`` and the targets it enters say so. A time below the GEMM floor by more than
``FLOOR_TOLERANCE`` is a measurement error (the floor was timed under other conditions),
not a result: the cell reads "invalid" and the floor target is not counted as met.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from . import contrast_cases, contrast_step, hssn_cases, load
from .flops import HEAD_FLOOR, floor_gemms
from .implementations import BASELINE, COMPILED, FLOOR, display_name, is_backend

MiB = 2**20
Row = dict[str, Any]

# docs/spec.md §7 targets on the whole head step (the speed targets at every preset: the
# ≥ 2× claim is made for ADE20K and COCO-Stuff, where C·K ≫ D, and Cityscapes is
# reported too, not left out).
SPEED_PRESETS = ("ade20k", "coco_stuff", "cityscapes")
MEMORY_PRESETS = ("ade20k", "coco_stuff")
MIN_SPEEDUP_VS_BASELINE = 2.0
MIN_SPEEDUP_VS_COMPILED = 1.3
MAX_TIMES_FLOOR = 1.25
MAX_MEMORY_VS_BASELINE = 0.25
# A fused step skips writing the similarity matrix that the floor's bare GEMMs write, so it
# may come in a little under the floor; more than this below it, the two were not measured
# under the same conditions.
FLOOR_TOLERANCE = 0.1


def _ok(row: Row) -> bool:
    return row.get("status") == "ok"


def _problem_key(row: Row) -> tuple:
    return (row["preset"], row["n"], row["d"], row["c"], row["k"], row.get("m", 0))


def _floor_ms(row: Row, gemm_ms: dict[tuple, dict[str, float]]) -> float | None:
    measured = gemm_ms.get(_problem_key(row), {})
    if row["op"] == "head_step":
        return measured.get(HEAD_FLOOR)
    if row["op"] == contrast_cases.OP:
        counts = contrast_cases.floor_gemms(row["c"], row["contrast"])
    else:
        counts = floor_gemms(row["op"], row["mode"])
    return _floor_total(counts, measured)


def _floor_total(counts: dict[str, float] | None, measured: dict[str, float]) -> float | None:
    """Σ count × measured ms of the floor's bare GEMMs, or None when one was not measured."""
    if not counts or any(name not in measured for name in counts):
        return None
    return sum(measured[name] * count for name, count in counts.items())


def derive(rows: list[Row], cores: int | None = None) -> list[Row]:
    """Add gflops, floor_ms, times_floor, floor_invalid, speedup, memory_vs_baseline (None
    where unknown) and the trust marks noisy and unstable (``cores``: the machine's, for
    the foreign-load threshold; None: this machine's)."""
    cores = cores or load.machine_cores()
    gemm_ms: dict[tuple, dict[str, float]] = {}
    baselines: dict[tuple, Row] = {}
    for row in filter(_ok, rows):
        if row["impl"] == FLOOR:
            gemm_ms.setdefault(_problem_key(row), {})[row["mode"]] = row["median_ms"]
        elif row["impl"] == BASELINE:
            baselines[(*_problem_key(row), row["op"], row["mode"])] = row
    out = []
    for row in rows:
        row = dict(row)
        if _ok(row):
            foreign = [f for f in row.get("round_foreign_cores") or [] if f is not None]
            row["max_foreign_cores"] = max(foreign) if foreign else None
            row["noisy"] = any(load.is_noisy(f, cores) for f in foreign)
            row["unstable"] = load.is_unstable(row.get("round_medians_ms") or [])
        if _ok(row) and row["impl"] != FLOOR:
            base = baselines.get((*_problem_key(row), row["op"], row["mode"]))
            floor = _floor_ms(row, gemm_ms)
            ms = row["median_ms"]
            row["gflops"] = row["flops"] / ms / 1e6 if row.get("flops") else None
            row["floor_ms"] = floor
            row["times_floor"] = ms / floor if floor else None
            row["floor_invalid"] = row["times_floor"] is not None and row["times_floor"] < 1 - FLOOR_TOLERANCE
            row["speedup"] = base["median_ms"] / ms if base else None
            peak, base_peak = row.get("peak_bytes"), base and base.get("peak_bytes")
            row["memory_vs_baseline"] = peak / base_peak if base_peak and peak is not None else None
        out.append(row)
    return out


def doubtful(row: Row | None) -> bool:
    """Whether a row was measured under load or its rounds disagree."""
    return bool(row and (row.get("noisy") or row.get("unstable")))


# ---- tables ------------------------------------------------------------------
def _fmt(value: Any, spec: str, unit_div: float = 1.0) -> str:
    if value is None:
        return "-"
    return format(value / unit_div if unit_div != 1.0 else value, spec)


def _cells(row: Row) -> list[str]:
    if not _ok(row):
        return [row["status"]]
    spread = f"{row['p20_ms']:.1f}-{row['p80_ms']:.1f}"
    median = _fmt(row["median_ms"], ".1f") + (DOUBT_MARK if doubtful(row) else "")
    times_floor = _fmt(row.get("times_floor"), ".2f")
    if row.get("floor_invalid"):
        times_floor = f"invalid ({times_floor})"
    return [
        median, spread, _fmt(row.get("gflops"), ".1f"), times_floor, _fmt(row.get("speedup"), ".2f"),
        _fmt(row.get("peak_bytes"), ".1f", MiB), _fmt(row.get("rss_bytes"), ".1f", MiB),
        _fmt(row.get("memory_vs_baseline"), ".2f"), _fmt(row.get("host_syncs"), "d"),
    ]


DOUBT_MARK = "*"
DOUBT_NOTE = (f"{DOUBT_MARK} measured while other work kept more than {load.NOISY_FOREIGN_SHARE:.0%} of the "
              f"machine's cores busy, or its rounds' medians differ by more than "
              f"{load.UNSTABLE_ROUND_SPREAD - 1:.0%}: its ratios are doubtful")
HEAD_COLUMNS = ["problem", "implementation", "median ms", "p20-p80 ms", "GFLOP/s", "x floor",
                "speed-up", "peak MiB", "RSS MiB", "mem/base", "syncs"]
OP_COLUMNS = ["problem", "op", "mode"] + HEAD_COLUMNS[1:]


def _problem_label(row: Row) -> str:
    return f"{row['preset']} N={row['n']}"


def _floor_row(rows: list[Row], row: Row) -> Row | None:
    return next((r for r in rows if r["impl"] == FLOOR and r["mode"] == HEAD_FLOOR and _ok(r)
                 and _problem_key(r) == _problem_key(row)), None)


def head_table(rows: list[Row]) -> list[list[str]]:
    """Head-step rows, one block per problem, the GEMM floor last in each block."""
    head = [r for r in rows if r["group"] == "head"]
    table = []
    for key in dict.fromkeys(_problem_key(r) for r in head):
        block = [r for r in head if _problem_key(r) == key]
        for row in block:
            table.append([_problem_label(row), display_name(row["impl"])] + _cells(row))
        floor = _floor_row(rows, block[0])
        if floor:
            spread = f"{floor['p20_ms']:.1f}-{floor['p80_ms']:.1f}"
            table.append([_problem_label(floor), "GEMM floor (3 GEMMs)", f"{floor['median_ms']:.1f}", spread]
                         + ["-"] * (len(HEAD_COLUMNS) - 4))
    return table


def op_table(rows: list[Row]) -> list[list[str]]:
    ops = [r for r in rows if r["group"] == "ops"]
    op_order = {op: i for i, op in enumerate(dict.fromkeys(r["op"] for r in ops))}
    mode_order = {mode: i for i, mode in enumerate(dict.fromkeys(r["mode"] for r in ops))}
    # A stable sort: the implementations keep their order within a row group.
    ops.sort(key=lambda r: (_problem_key(r), op_order[r["op"]], mode_order[r["mode"]]))
    return [[_problem_label(r), r["op"], r["mode"], display_name(r["impl"])] + _cells(r) for r in ops]


CONTRAST_COLUMNS = ["problem", "implementation"] + HEAD_COLUMNS[2:]


def _contrast_label(row: Row) -> str:
    return f"{row['preset']} A={row['n']} M={row['m']}"


def contrast_table(rows: list[Row], problems: Iterable) -> list[list[str]]:
    """Pixel-contrast fwd+bwd rows, one block per preset; where the naive formula was not
    run (it cannot hold its A×M tensors), a line with its estimated requirement."""
    table = []
    for p in problems:
        block = [r for r in rows if r["group"] == "contrast" and _problem_key(r) == p.key]
        if not any(r["impl"] == BASELINE for r in block):
            need = contrast_cases.naive_bytes(p) / 2**30
            table.append([p.label, display_name(BASELINE), f"not run: needs about {need:.1f} GiB"])
        table += [[_contrast_label(r), display_name(r["impl"])] + _cells(r) for r in block]
        floor = contrast_cases.floor_gemms(p.c, p.contrast)
        gemms = {r["mode"]: r["median_ms"] for r in rows if r["impl"] == FLOOR and _ok(r)
                 and _problem_key(r) == p.key}
        total = _floor_total(floor, gemms)
        if total is not None:
            counts = " + ".join(f"{count:.3g} {name}" for name, count in floor.items())
            table.append([p.label, f"GEMM floor ({counts})", f"{total:.1f}"])
    return table


STEP_COLUMNS = ["problem", "implementation", "median ms", "p20-p80 ms", "speed-up", "peak MiB", "RSS MiB",
                "mem/base", "syncs"]


def step_table(rows: list[Row], problems: Iterable) -> list[list[str]]:
    """ContrastiveSeg training-step rows (sampling, loss, bank update, backward), one block
    per variant, the naive step first; speed-up and memory against it."""
    table = []
    for p in problems:
        block = [r for r in rows if r["group"] == "contrast_step" and _problem_key(r) == p.key]
        block.sort(key=lambda r: r["impl"] != BASELINE)  # stable: the backends keep their order
        for row in block:
            cells = _cells(row)
            if _ok(row):  # no FLOP count and no floor for a whole step
                cells = cells[:2] + cells[4:]
            table.append([contrast_step.label_of(p), display_name(row["impl"])] + cells)
    return table


HIERARCHY_COLUMNS = STEP_COLUMNS


def hierarchy_table(rows: list[Row], problems: Iterable, backends: Iterable[str] = ()) -> list[list[str]]:
    """HSSN loss fwd+bwd rows (tree-min, tree-triplet), one block per problem, the original
    code first; then a line for each of ``backends`` that does not implement the op."""
    table = []
    for p in problems:
        label = hssn_cases.label_of(p)
        block = [r for r in rows if r["group"] == "hierarchy" and _problem_key(r) == p.key]
        block.sort(key=lambda r: r["impl"] != BASELINE)  # stable: the backends keep their order
        for row in block:
            cells = _cells(row)
            if _ok(row):  # no FLOP count and no floor
                cells = cells[:2] + cells[4:]
            table.append([label, display_name(row["impl"])] + cells)
        table += [[label, display_name(b), f"not run: {reason}"]
                  for b, reason in hssn_cases.skipped_backends(p, list(backends))]
    return table


def render_text(header: list[str], table: list[list[str]]) -> str:
    widths = [max([len(h)] + [len(r[i]) for r in table if i < len(r)]) for i, h in enumerate(header)]

    def line(cells: list[str]) -> str:
        return "  ".join(c.rjust(w) if i >= 2 else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(header), rule] + [line(r) for r in table])


def render_markdown(header: list[str], table: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r + [""] * (len(header) - len(r))) + " |" for r in table]
    return "\n".join(lines)


# ---- targets -------------------------------------------------------------------
def _check(name: str, value: float | None, limit: float, at_least: bool, detail: str,
           rows: Iterable[Row | None] = ()) -> dict[str, Any]:
    """A target's verdict; ``rows``: the measurements it rests on (for the trust marks)."""
    met = None if value is None else (value >= limit if at_least else value <= limit)
    return {"target": name, "value": value, "limit": limit, "met": met, "detail": detail,
            "invalid": False, "doubtful": any(doubtful(r) for r in rows)}


def _floor_check(row: Row, limit: float, detail: str) -> dict[str, Any]:
    """time / GEMM floor: a ratio under the floor's tolerance is invalid, never met."""
    result = _check("time / GEMM floor", row.get("times_floor"), limit, False, detail, [row])
    if row.get("floor_invalid"):
        result.update(met=None, invalid=True)
    return result


def check_targets(rows: list[Row], preset_keys: Iterable[tuple]) -> list[dict[str, Any]]:
    """docs/spec.md §7 targets on the head step at the suite's preset sizes (best backend)."""
    results = []
    for key in preset_keys:
        block = [r for r in rows if r["group"] == "head" and _problem_key(r) == key and _ok(r)]
        ours = [r for r in block if is_backend(r["impl"])]
        if not ours:
            continue
        best = min(ours, key=lambda r: r["median_ms"])
        preset, label = key[0], f"{key[0]} N={key[1]} [{best['impl']}]"
        by_impl = {r["impl"]: r for r in block}
        if preset in SPEED_PRESETS:
            results.append(_check("speed-up vs baseline", best.get("speedup"), MIN_SPEEDUP_VS_BASELINE, True, label,
                                  [best, by_impl.get(BASELINE)]))
            compiled = by_impl.get(COMPILED)
            vs_compiled = compiled["median_ms"] / best["median_ms"] if compiled else None
            results.append(_check("speed-up vs torch.compile", vs_compiled, MIN_SPEEDUP_VS_COMPILED, True, label,
                                  [best, compiled]))
            results.append(_floor_check(best, MAX_TIMES_FLOOR, label))
        if preset in MEMORY_PRESETS:
            results.append(_check("peak memory / baseline", best.get("memory_vs_baseline"),
                                  MAX_MEMORY_VS_BASELINE, False, label))
        for row in ours:
            results.append(_check("host syncs per step", row.get("host_syncs"), 0, False,
                                  f"{key[0]} N={key[1]} [{row['impl']}]"))
    return results


# docs/spec.md §7 pixel-contrast targets.
CONTRAST_MAX_TIMES_FLOOR = 1.3
CONTRAST_MIN_SPEEDUP = 3.0
CONTRAST_MAX_MEMORY_VS_BASELINE = 1 / 20
CONTRAST_SPEED_PRESET = "bank"
# The dense preset's O((A + M)·D) memory: peak extra memory at most this many times the
# inputs' size (the kernels hold prepared copies of both sides and the gradients).
CONTRAST_MAX_MEMORY_VS_INPUTS = 4.0


def _peak(row: Row) -> int | None:
    return row.get("rss_bytes") or row.get("peak_bytes")


def check_contrast_targets(rows: list[Row], problems: Iterable) -> list[dict[str, Any]]:
    """docs/spec.md §7 pixel-contrast targets (best protoseg backend per preset)."""
    results = []
    for p in problems:
        ours = [r for r in rows if r["group"] == "contrast" and _problem_key(r) == p.key and _ok(r)
                and is_backend(r["impl"])]
        if not ours:
            continue
        best = min(ours, key=lambda r: r["median_ms"])
        label = f"{p.label} [{best['impl']}]"
        results.append(_floor_check(best, CONTRAST_MAX_TIMES_FLOOR, label))
        if p.name == CONTRAST_SPEED_PRESET:
            baseline = next((r for r in rows if r["group"] == "contrast" and _problem_key(r) == p.key
                             and r["impl"] == BASELINE and _ok(r)), None)
            results.append(_check("speed-up vs baseline", best.get("speedup"), CONTRAST_MIN_SPEEDUP, True, label,
                                  [best, baseline]))
            results.append(_check("peak memory / baseline", best.get("memory_vs_baseline"),
                                  CONTRAST_MAX_MEMORY_VS_BASELINE, False, label))
        if p.name == "dense":
            peak = _peak(best)
            ratio = None if peak is None else peak / contrast_cases.extra_memory_bound(p)
            results.append(_check("peak memory / (A+M)·D", ratio, CONTRAST_MAX_MEMORY_VS_INPUTS, False, label))
        results += [_check("host syncs per step", r.get("host_syncs"), 0, False, f"{p.label} [{r['impl']}]")
                    for r in ours]
    return results


def check_step_targets(rows: list[Row], problems: Iterable) -> list[dict[str, Any]]:
    """docs/spec.md §7 "everywhere": no host synchronisation in a training step with
    validate=False, anchor sampling and the bank update included (every protoseg backend)."""
    return [
        _check("host syncs per step", r.get("host_syncs"), 0, False, f"{contrast_step.label_of(p)} [{r['impl']}]")
        for p in problems
        for r in rows
        if r["group"] == "contrast_step" and _problem_key(r) == p.key and _ok(r) and is_backend(r["impl"])
    ]


def check_hierarchy_targets(rows: list[Row], problems: Iterable) -> list[dict[str, Any]]:
    """docs/spec.md §7 HSSN targets: at the presets, the best protoseg backend's speed-up and
    peak extra memory against the original code (tree-min ≥ 3×, ≤ 1/5; tree-triplet ≥ 5×,
    ≤ 1/10); everywhere, no host synchronisation (every protoseg backend)."""
    results = []
    for p in problems:
        s = hssn_cases.settings_of(p)
        ours = [r for r in rows if r["group"] == "hierarchy" and _problem_key(r) == p.key and _ok(r)
                and is_backend(r["impl"])]
        if not ours:
            continue
        if s.targets:
            best = min(ours, key=lambda r: r["median_ms"])
            min_speedup, max_memory = hssn_cases.TARGETS[s.op]
            label = f"{s.label} [{best['impl']}]"
            results.append(_check("speed-up vs baseline", best.get("speedup"), min_speedup, True, label))
            results.append(_check("peak memory / baseline", best.get("memory_vs_baseline"), max_memory, False, label))
        results += [_check("host syncs per step", r.get("host_syncs"), 0, False, f"{s.label} [{r['impl']}]")
                    for r in ours]
    return results


def verdict(result: dict[str, Any]) -> str:
    if result.get("invalid"):
        return "INVALID"
    word = {True: "met", False: "MISSED", None: "not measured"}[result["met"]]
    return word + (DOUBT_MARK if result.get("doubtful") and result["met"] is not None else "")


def render_targets(results: list[dict[str, Any]]) -> str:
    lines = []
    for r in results:
        shown = verdict(r)
        value = "-" if r["value"] is None else f"{r['value']:.3g}"
        bound = ">=" if r["target"].startswith("speed-up") else "<="
        lines.append(f"  {shown:<12} {r['target']:<26} {value:>8} (target {bound} {r['limit']:g})  {r['detail']}")
    return "\n".join(lines)


# ---- files ---------------------------------------------------------------------
CSV_FIELDS = ["group", "preset", "n", "d", "c", "k", "m", "contrast", "op", "mode", "impl", "device", "dtype", "status",
              "median_ms", "p20_ms", "p80_ms", "runs", "flops", "gflops", "floor_ms", "times_floor",
              "speedup", "peak_bytes", "rss_bytes", "allocated_bytes", "memory_vs_baseline",
              "host_syncs", "cuda_sync_calls", "floor_invalid", "max_foreign_cores", "noisy", "unstable"]


def write_csv(rows: list[Row], path: Path) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def write_json(document: dict[str, Any], path: Path) -> None:
    path.write_text(json.dumps(document, indent=1) + "\n")
