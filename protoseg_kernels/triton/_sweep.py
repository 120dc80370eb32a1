"""The forward sweep of the similarity engine: online per-row statistics over column
tiles (FlashAttention-style), for clients such as ppc_ppd_loss's log-sum-exp.

One program per block of rows computes S tile by tile and hands each tile to the
client, which folds it into a per-row state; S is never stored. The client gives
three ``triton.jit`` functions (constexprs of the kernel):

    start(rows, row_ok, op, FLAGS) -> state                      (a tuple of [BN] tensors)
    step(state, s, rows, row_ok, cols, tile, op, FLAGS, KS, BC) -> state
    finish(state, rows, row_ok, op, FLAGS)                       (stores the results)

with ``op`` its tensors and scalars (one tuple argument), ``FLAGS`` its constexprs,
``cols`` the columns (``_columns.ColumnArgs``) and ``tile`` the (j, c, k, valid) of
``_tiles.column_tile``. S is masked nowhere: ``step`` masks the invalid columns.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import triton
import triton.language as tl
from torch import Tensor

from ._columns import Columns, row_args
from ._config import GemmTiles
from ._host import dot_precision, launch
from ._norms import inverse_norms
from ._tiles import column_tile, dot_tile, load_inverse_norms, num_column_tiles, row_inverse_norms


@dataclass
class SweepClient:
    """A client of the forward sweep: its three functions, ``args`` (tensors and
    scalars, one tuple kernel argument) and ``flags`` (a tuple of constexprs)."""

    start: Any
    step: Any
    finish: Any
    args: tuple[Any, ...] = ()
    flags: tuple[Any, ...] = ()


@triton.jit
def _row_sweep_kernel(
    x, cols, inv_p_ptr, op,
    START: tl.constexpr, STEP: tl.constexpr, FINISH: tl.constexpr, FLAGS: tl.constexpr,
    NORMALIZE: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, KS: tl.constexpr, BC: tl.constexpr,
    FLAT: tl.constexpr, PRECISION: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BN + tl.arange(0, BN).to(tl.int64)
    row_ok = rows < x.n
    inv_x = tl.where(row_ok, 1.0, 0.0)
    if NORMALIZE:
        inv_x = row_inverse_norms(x.ptr, x.stride_n, x.stride_d, rows, row_ok, x.d, BN, BD)
    state = START(rows, row_ok, op, FLAGS)
    for t in range(num_column_tiles(cols, FLAT, KS, BC)):
        tile = column_tile(t, cols, FLAT, KS, BC)
        j, c, k, col_ok = tile
        s = dot_tile(x, rows, row_ok, cols, j, col_ok, BN, KS * BC, BD, PRECISION)
        # The column norms are loaded after the dot: not live during its loop.
        s = s * inv_x[:, None] * load_inverse_norms(inv_p_ptr, j, col_ok, NORMALIZE)[None, :]
        state = STEP(state, s, rows, row_ok, cols, tile, op, FLAGS, KS, BC)
    FINISH(state, rows, row_ok, op, FLAGS)


def row_sweep(x: Tensor, columns: Columns, client: SweepClient, normalize: bool, tiles: GemmTiles) -> None:
    """Run ``client`` over every row of x against every column tile of ``columns``."""
    columns.check_rows(x)
    launch(_row_sweep_kernel, (triton.cdiv(x.shape[0], tiles.block_n),), row_args(x), columns.kernel_arg(),
           inverse_norms(columns.values, normalize), client.args, START=client.start, STEP=client.step,
           FINISH=client.finish, FLAGS=client.flags, NORMALIZE=normalize, **tiles.constexprs(),
           **dot_precision(x.dtype))
