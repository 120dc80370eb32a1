"""PNG plots of the sweep: time and peak extra memory versus N per implementation."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .flops import HEAD_FLOOR
from .implementations import FLOOR, display_name

MiB = 2**20


def _series(rows: list[dict[str, Any]], preset: str, value_key: str) -> dict[str, list[tuple[int, Any]]]:
    series: dict[str, list[tuple[int, Any]]] = {}
    for r in rows:
        if r.get("status") != "ok" or r["preset"] != preset or r.get(value_key) is None:
            continue
        if r["group"] == "head" or (r["impl"] == FLOOR and r["mode"] == HEAD_FLOOR):
            series.setdefault(r["impl"], []).append((r["n"], r))
    return {impl: sorted(points, key=lambda p: p[0]) for impl, points in series.items()}


def _axes(title: str, ylabel: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("N (pixels per step)")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    return fig, ax


def plot_time(rows: list[dict[str, Any]], preset: str, path: Path, subtitle: str) -> bool:
    series = _series(rows, preset, "median_ms")
    if not any(len(points) > 1 for points in series.values()):
        return False
    fig, ax = _axes(f"Head step time, {preset} ({subtitle})", "median time per step (ms)")
    for impl, points in series.items():
        ns = [n for n, _ in points]
        med = [r["median_ms"] for _, r in points]
        low = [r["median_ms"] - r["p20_ms"] for _, r in points]
        high = [r["p80_ms"] - r["median_ms"] for _, r in points]
        label = "GEMM floor (3 GEMMs)" if impl == FLOOR else display_name(impl)
        style = "--" if impl == FLOOR else "-"
        ax.errorbar(ns, med, yerr=[low, high], fmt=style, marker="o", capsize=3, label=label)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return True


def plot_memory(rows: list[dict[str, Any]], preset: str, path: Path, subtitle: str) -> bool:
    series = _series(rows, preset, "peak_bytes")
    if not any(len(points) > 1 for points in series.values()):
        return False
    fig, ax = _axes(f"Head step peak extra memory, {preset} ({subtitle})", "peak extra memory (MiB)")
    for impl, points in series.items():
        ns = [n for n, _ in points]
        (line,) = ax.plot(ns, [r["peak_bytes"] / MiB for _, r in points], marker="o",
                          label=f"{display_name(impl)} (allocator)")
        rss = [(n, r["rss_bytes"] / MiB) for n, r in points if r.get("rss_bytes") is not None]
        if rss:
            ax.plot(*zip(*rss), linestyle=":", marker="x", color=line.get_color(),
                    label=f"{display_name(impl)} (RSS)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return True
