"""Block sizes of the Triton kernels, chosen per problem shape on the host.

On a GPU the tiles are sized for A100/H100 (checked for register spills by
``benchmarks/kernel_report.py`` at the docs/spec.md §7 presets). Under the interpreter the
GEMM blocks are the smallest legal ones, so that the small test shapes still cross
several pixel, prototype and embedding blocks and every loop runs more than once;
row-wise kernels use moderate blocks there (the interpreter's cost is per program
and per operation, not per element), still crossing blocks at the test shapes. For the
same reason the rows and the flat column tiles of a larger problem (a few hundred rows or
columns) get wider blocks there, as long as each dimension still spans several of them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import triton

from ._host import INTERPRETING, dot_precision

MIN_DOT = 16  # tl.dot needs every block dimension >= 16
DEFAULT_SM_COUNT = 132  # H100 SXM; used when compiling without a GPU (kernel report)


def interpreted(device: torch.device) -> bool:
    """True when kernels for ``device`` run in the interpreter (meta tensors: compiled)."""
    return INTERPRETING and device.type != "meta"


def sm_count(device: torch.device) -> int:
    if interpreted(device):
        return 2
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return DEFAULT_SM_COUNT


def next_pow2(n: int) -> int:
    return triton.next_power_of_2(max(int(n), 1))


@dataclass(frozen=True)
class GemmTiles:
    """A row × column tile of the similarity GEMM, for columns in groups (``c`` groups
    of ``k``: prototypes are C classes of K; a memory bank is M groups of 1).

    ``flat``: the tile holds ``k_slots·block_c`` consecutive columns; else ``block_c``
    groups × ``k_slots`` slots of a group (see ``_tiles.column_tile``).
    """

    block_n: int
    block_d: int
    k_slots: int
    block_c: int
    flat: bool
    num_warps: int
    num_stages: int

    @property
    def width(self) -> int:
        return self.k_slots * self.block_c

    def num_column_tiles(self, c: int, k: int) -> int:
        if self.flat:
            return triton.cdiv(c * k, self.width)
        return triton.cdiv(c, self.block_c) * triton.cdiv(k, self.k_slots)

    def constexprs(self) -> dict[str, Any]:
        return {"BN": self.block_n, "BD": self.block_d, "KS": self.k_slots, "BC": self.block_c,
                "FLAT": self.flat, "num_warps": self.num_warps, "num_stages": self.num_stages}


# Wider tiles re-read x less often; a block size may pad this much more than the tightest one.
PADDING_SLACK = 1.125


def _least_padding(options: list[int], size: int) -> int:
    """The largest option (block size) that pads ``size`` to at most PADDING_SLACK times
    the tightest option's padding."""
    padded = {b: triton.cdiv(size, b) * b for b in options}
    tightest = min(padded.values())
    return max(b for b in options if padded[b] <= PADDING_SLACK * tightest)


def _powers_of_two(lo: int, hi: int) -> list[int]:
    out, b = [], 1
    while b <= hi:
        if b >= lo:
            out.append(b)
        b *= 2
    return out


def _class_layout(c: int, k: int, min_width: int, max_width: int, whole_classes: bool) -> tuple[int, int]:
    """(k_slots, block_c) of a class-layout tile between ``min_width`` (if K allows) and
    ``max_width`` columns wide."""
    if whole_classes:
        slots = next_pow2(k)
    else:
        slots = _least_padding(_powers_of_two(1, min(next_pow2(k), max_width)), k)
    widths_ok = [b for b in _powers_of_two(1, max(max_width // slots, 1)) if b * slots >= min_width]
    block_c = _least_padding(widths_ok or [max(min_width // slots, 1)], c)
    return slots, block_c


LAYOUTS = ("flat", "class", "whole_classes")


# Blocks along a dimension that the interpreted GEMM tiles keep (when the dimension allows).
INTERPRETED_MIN_BLOCKS = 4
INTERPRETED_MAX_BLOCK = 64


def _interpreted_block(size: int | None) -> int:
    """The interpreted block along a dimension of ``size`` (None: unknown): the smallest
    legal one, doubled while the dimension still spans INTERPRETED_MIN_BLOCKS blocks.
    The interpreter's cost is per block visited, not per element."""
    block = MIN_DOT
    while size is not None and block < INTERPRETED_MAX_BLOCK and size >= 2 * block * INTERPRETED_MIN_BLOCKS:
        block *= 2
    return block


def _gemm(device: torch.device, dtype: torch.dtype, layout: str, c: int, k: int, *, block_n: int, width: int,
          num_warps: int, num_stages: int, n: int | None = None) -> GemmTiles:
    """Tiles for the tensor cores (16-bit inputs, or fp32 as TF32); fp32 without TF32
    runs ``tl.dot`` as FMAs in registers, so its tiles are smaller. ``n``, the number of
    rows (None: unknown), matters only to the interpreted tiles."""
    block_d = 64
    if dtype == torch.float32:
        block_d = 32
        if dot_precision(dtype)["PRECISION"] == "ieee":
            block_n, width, block_d = min(block_n, 64), min(width, 64), 16
    min_width = 32  # narrower tiles re-read x from L2 more often than they save in padding
    if interpreted(device):
        block_n, width, block_d, min_width = _interpreted_block(n), MIN_DOT, MIN_DOT, MIN_DOT
        if layout == "flat":
            width = _interpreted_block(c * k)
    if layout == "flat":
        return GemmTiles(block_n, block_d, 1, width, True, num_warps, num_stages)
    slots, block_c = _class_layout(c, k, min_width, width, whole_classes=layout == "whole_classes")
    return GemmTiles(block_n, block_d, slots, block_c, False, num_warps, num_stages)


def class_scores_forward_tiles(device: torch.device, dtype: torch.dtype, c: int, k: int) -> GemmTiles:
    """Class layout: per-class max/logsumexp over the slots of a tile, merged across slot blocks."""
    return _gemm(device, dtype, "class", c, k, block_n=64, width=64, num_warps=8, num_stages=3)


def flat_forward_tiles(device: torch.device, dtype: torch.dtype, c: int, k: int) -> GemmTiles:
    """Flat layout for the forward passes over all C·K prototypes (ppc_ppd, similarity)."""
    return _gemm(device, dtype, "flat", c, k, block_n=128, width=64, num_warps=8, num_stages=3)


def contrast_forward_tiles(device: torch.device, dtype: torch.dtype, m: int, n: int) -> GemmTiles:
    """Flat layout for the pixel-contrast sweeps over M labelled columns, ``n`` rows. Their
    per-tile work (label masks, the positives' softplus, two log-sum-exps) holds more
    [rows × columns] values than a plain log-sum-exp: narrower tiles keep it in registers
    (and two stages: at sm_80 a third costs a spill in-batch)."""
    return _gemm(device, dtype, "flat", m, 1, block_n=128, width=32, num_warps=8, num_stages=2, n=n)


def gradient_tiles(device: torch.device, dtype: torch.dtype, c: int, k: int, layout: str,
                   n: int | None = None, split_ds: bool = False) -> GemmTiles:
    """Tiles of the dx and dP passes (``layout``: one of LAYOUTS); ``n`` rows, if known.
    ``split_ds`` (dS held as a 16-bit hi + lo pair besides its fp32 tile): half as wide,
    to stay in registers."""
    return _gemm(device, dtype, layout, c, k, block_n=64, width=64 if split_ds else 128, num_warps=8, num_stages=3,
                 n=n)


def gradient_splits(device: torch.device, n: int, num_prototypes: int, d: int, pixel_blocks: int,
                    column_tiles: int) -> int:
    """Pixel splits of the dP pass: each (column tile, split) program owns a partial
    [tile, D] sum, reduced in split order afterwards. Enough programs to fill the GPU
    twice, but the partials never outgrow an fp32 copy of x ([N, D])."""
    wanted = triton.cdiv(2 * sm_count(device), max(column_tiles, 1))
    memory_cap = max(n // max(num_prototypes, 1), 1)
    return max(1, min(wanted, pixel_blocks, memory_cap))


@dataclass(frozen=True)
class RowTiles:
    """Blocks of row-wise kernels: ``block_r`` rows × ``block_d`` columns at a time."""

    block_r: int
    block_d: int
    num_warps: int = 4

    def constexprs(self) -> dict[str, Any]:
        return {"BR": self.block_r, "BD": self.block_d, "num_warps": self.num_warps}


def row_tiles(device: torch.device, block_r: int = 32, block_d: int = 64) -> RowTiles:
    if interpreted(device):
        return RowTiles(16, 32)
    return RowTiles(block_r, block_d)


@dataclass(frozen=True)
class SegmentTiles:
    """Sinkhorn's per-class reductions: each program reduces ``pixels`` consecutive
    pixels, ``block_n`` at a time, into ``block_c`` classes × ``k_pad`` slots."""

    pixels: int
    block_n: int
    block_c: int
    k_pad: int
    num_warps: int = 4

    def constexprs(self) -> dict[str, Any]:
        return {"BN": self.block_n, "BCC": self.block_c, "KP": self.k_pad, "num_warps": self.num_warps}


def segment_tiles(device: torch.device, c: int, k: int) -> SegmentTiles:
    k_pad = next_pow2(k)
    if interpreted(device):
        return SegmentTiles(pixels=64, block_n=32, block_c=min(4, next_pow2(c)), k_pad=k_pad)
    block_n = 32
    block_c = max(1, min(4096 // (block_n * k_pad), next_pow2(c)))
    return SegmentTiles(pixels=1024, block_n=block_n, block_c=block_c, k_pad=k_pad)


def own_class_tiles(device: torch.device, k: int) -> tuple[int, int, int]:
    """(block_n, k_pad, block_d) of the per-pixel own-class dot products of Sinkhorn."""
    k_pad = next_pow2(k)
    if interpreted(device):
        return 32, k_pad, 16
    block_n = 32
    return block_n, k_pad, max(8, min(64, 8192 // (block_n * k_pad)))
