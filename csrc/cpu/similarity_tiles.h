// The CPU similarity engine: S = x̂·Ĉᵀ between rows x [N, D] and prepared columns
// [M, D] (columns.h), consumed tile by tile so that nothing of size N·M is allocated.
// Clients: prototype_similarity, class_scores, ppc_ppd_loss (columns = prototypes);
// a labelled memory bank (docs/spec.md §10) plugs in the same way.
//
// Forward sweep. Rows are cut into tiles of TilePlan::tile_rows; per row tile, the rows
// of x are normalised into a small buffer, and the columns are swept in blocks of
// `column_block` (all M in one block by default): S_tile = x̂_tile·Ĉ_blockᵀ comes from one
// BLAS call and is handed to the client's epilogue at once. The epilogue keeps per-row
// online statistics (a max shift, running sums, a target's value, ...) in its State
// across the column blocks of a row tile.
//
// Backward sweep. Per row tile and column block, S_tile is recomputed when the client
// needs it, the client's gradient functor turns it into dS_tile in place, and
// dx̂_tile += dS_tile·Ĉ_block comes from a second BLAS call; dĈ = Σ dS_tileᵀ·x̂_tile is
// accumulated per chunk of consecutive row tiles and the chunk partials are added in
// chunk order, then taken through the column normalisation.
//
// Determinism: tile, block and chunk sizes depend on the problem size only, each tile
// is computed by one thread in a fixed order, and every cross-tile sum combines partials
// in a fixed order, so results are bitwise the same whatever the thread count.
//
// ---- The client concepts -------------------------------------------------------------
//
// A client prepares its columns once per call (prepare_columns: any M, normalised or raw,
// optional int64 labels, as given or grouped by class) and passes one struct holding its
// parameters (pointers to its inputs and outputs, temperatures, ...) that implements:
//
//   Forward epilogue E:
//     using State = ...;                               // per-thread scratch and per-row
//     State make_state(const TileShape&) const;        //   statistics; made once per thread
//     void begin_rows(State&, int64_t row_begin, int64_t rows) const;  // new row tile
//     void operator()(State&, const Tile<acc_t>&) const;   // each column block, in order
//     void end_rows(State&, int64_t row_begin, int64_t rows) const;    // after the last
//   E sees S for rows [tile.row_begin, +tile.rows) and prepared columns
//   [tile.column_begin, +tile.columns), with those columns' labels in tile.labels; it
//   writes per-row results at end_rows (or in operator() when it takes whole rows).
//   Optionally, `bool visits(const State&, int64_t column_begin, int64_t columns) const`:
//   false skips that column block for the current row tile, GEMM included (a pass that
//   only needs some columns, e.g. the positives of labels grouped in column ranges).
//
//   Backward gradient functor G:
//     using State = ...;
//     State make_state(const TileShape&) const;
//     void operator()(State&, const Tile<acc_t>&) const;
//       Turns tile.s into dS = ∂loss/∂S for those rows and columns, in place. tile.s holds S
//       when BackwardOptions::recompute is set and unspecified values otherwise: G writes
//       every element. With several column blocks, G sees one block at a time, so what it
//       needs over a whole row (a softmax normaliser) comes from statistics the forward
//       saved.
//
// The engine owns the tiling, the BLAS calls, the row and column normalisation (and its
// backward), the thread split and the order of every cross-tile sum; a client owns only
// its per-element math. A loss that needs two passes over the columns (one statistic
// before another, as ContrastiveSeg's per-positive denominator needs the negatives' sum)
// runs two forward sweeps with two epilogues. StatelessClient below supplies State =
// NoState and empty hooks, for clients that need no state (prototype_similarity,
// ppc_ppd_loss).
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/mm.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include "common/math.h"
#include "cpu/columns.h"
#include "cpu/vectorized.h"

namespace protoseg::cpu {

// ---- what a client sees ----------------------------------------------------------------

// One tile: rows [row_begin, row_begin + rows) of x against prepared columns
// [column_begin, column_begin + columns). s is S (or dS) row-major [rows, columns];
// labels are the labels of those columns (null when the column set has none).
template <typename acc_t>
struct Tile {
  int64_t row_begin;
  int64_t rows;
  int64_t column_begin;
  int64_t columns;
  acc_t* s;
  const int64_t* labels;

  acc_t* row(int64_t i) const { return s + i * columns; }
  bool whole_rows(int64_t total_columns) const { return column_begin == 0 && columns == total_columns; }
};

// The largest tile a thread will see, for sizing its State.
struct TileShape {
  int64_t max_rows;
  int64_t block_columns;  // columns per block (the last block may have fewer)
  int64_t total_columns;  // M
};

struct NoState {};

// Default hooks: no state, nothing to do at row-tile boundaries.
struct StatelessClient {
  using State = NoState;
  NoState make_state(const TileShape&) const { return {}; }
  void begin_rows(NoState&, int64_t, int64_t) const {}
  void end_rows(NoState&, int64_t, int64_t) const {}
};

struct SweepOptions {
  bool normalize_rows = true;
  int64_t column_block = 0;  // columns per block; 0: all M in one block
};

struct BackwardOptions {
  bool normalize_rows = true;
  bool recompute = true;          // the gradient functor reads S
  bool need_column_grad = false;  // also return dC (needs up to kMaxChunks × [M, D] partials)
  int64_t column_block = 0;       // as in SweepOptions
};

// ---- tiling plan -------------------------------------------------------------------

constexpr int64_t kTileRows = 128;  // [128, M] fp32 stays in L2 for M up to ~2000
constexpr int64_t kMaxChunks = 8;   // dC partials: at most 8 × [M, D] in the compute dtype

struct TilePlan {
  int64_t rows = 0;
  int64_t tile_rows = 1;
  int64_t num_tiles = 0;
  int64_t tiles_per_chunk = 1;
  int64_t num_chunks = 0;

  // At least two tiles (and two chunks) whenever N >= 2: the work is then spread by an
  // active parallel region on any multi-threaded run, inside which BLAS runs every tile
  // GEMM on one thread, so no GEMM result depends on the thread count either.
  static TilePlan make(int64_t rows, bool chunked) {
    TilePlan plan;
    plan.rows = rows;
    plan.tile_rows = std::max<int64_t>(1, std::min(kTileRows, (rows + 1) / 2));
    plan.num_tiles = (rows + plan.tile_rows - 1) / plan.tile_rows;
    plan.tiles_per_chunk = chunked ? std::max<int64_t>(1, (plan.num_tiles + kMaxChunks - 1) / kMaxChunks) : 1;
    plan.num_chunks = (plan.num_tiles + plan.tiles_per_chunk - 1) / plan.tiles_per_chunk;
    return plan;
  }

  int64_t tile_begin(int64_t tile) const { return tile * tile_rows; }
  int64_t tile_size(int64_t tile) const { return std::min(tile_rows, rows - tile_begin(tile)); }
  int64_t chunk_first_tile(int64_t chunk) const { return chunk * tiles_per_chunk; }
  int64_t chunk_end_tile(int64_t chunk) const {
    return std::min(num_tiles, (chunk + 1) * tiles_per_chunk);
  }
};

// Column blocks [b·width, min(M, (b + 1)·width)).
struct ColumnBlocks {
  int64_t total = 0;
  int64_t width = 0;
  int64_t count = 0;

  static ColumnBlocks make(int64_t total, int64_t requested) {
    ColumnBlocks blocks;
    blocks.total = total;
    blocks.width = requested > 0 ? std::min(requested, total) : total;
    blocks.count = blocks.width > 0 ? (total + blocks.width - 1) / blocks.width : 0;
    return blocks;
  }
  int64_t begin(int64_t block) const { return block * width; }
  int64_t size(int64_t block) const { return std::min(width, total - begin(block)); }
};

// ---- BLAS ----------------------------------------------------------------------------

// A row-major [rows, cols] matrix with leading dimension ld, viewed as a tensor (no copy).
template <typename acc_t>
at::Tensor matrix_view(const acc_t* data, int64_t rows, int64_t cols, int64_t ld) {
  return at::from_blob(const_cast<acc_t*>(data), {rows, cols}, {ld, 1},
                       at::TensorOptions().dtype(c10::CppTypeToScalarType<acc_t>::value));
}

// C[m, n] = op(A)·op(B) (+ C when `accumulate`) with row-major A, B, C (op = transpose
// when asked), through ATen's matrix product (BLAS).
template <typename acc_t>
void gemm_row_major(bool transpose_a, bool transpose_b, int64_t m, int64_t n, int64_t k,
                    const acc_t* a, int64_t lda, const acc_t* b, int64_t ldb, bool accumulate, acc_t* c,
                    int64_t ldc) {
  const at::Tensor op_a = transpose_a ? matrix_view(a, k, m, lda).t() : matrix_view(a, m, k, lda);
  const at::Tensor op_b = transpose_b ? matrix_view(b, n, k, ldb).t() : matrix_view(b, k, n, ldb);
  at::Tensor out = matrix_view(c, m, n, ldc);
  if (accumulate) {
    out.addmm_(op_a, op_b);
  } else {
    at::mm_out(out, op_a, op_b);
  }
}

// ---- per-thread tile buffers ---------------------------------------------------------

// One allocation per thread, cut into 64-byte aligned pieces: x̂ [T, D], ‖x‖² [T],
// S or dS [T, block], dx̂ [T, D] (backward only).
template <typename acc_t>
struct TileBuffers {
  at::Tensor storage;
  acc_t* x_hat;
  acc_t* sum_sq;
  acc_t* s;
  acc_t* dx_hat;

  static int64_t aligned(int64_t count) { return (count + 15) / 16 * 16; }

  TileBuffers(int64_t tile_rows, int64_t d, int64_t block, bool with_input_grad) {
    const int64_t xs = aligned(tile_rows * d), ns = aligned(tile_rows), ss = aligned(tile_rows * block);
    const int64_t total = xs + ns + ss + (with_input_grad ? xs : 0);
    storage = at::empty({total}, at::TensorOptions().dtype(c10::CppTypeToScalarType<acc_t>::value));
    x_hat = storage.template data_ptr<acc_t>();
    sum_sq = x_hat + xs;
    s = sum_sq + ns;
    dx_hat = with_input_grad ? s + ss : nullptr;
  }
};

// S_tile [rows, block] = x̂_tile·Ĉ_blockᵀ for the columns of `block`.
template <typename acc_t>
void similarity_gemm(const TileBuffers<acc_t>& buf, int64_t rows, const PreparedColumns<acc_t>& cols,
                     const ColumnBlocks& blocks, int64_t block) {
  const int64_t d = cols.dim, width = blocks.size(block);
  gemm_row_major<acc_t>(false, true, rows, width, d, buf.x_hat, d, cols.hat + blocks.begin(block) * d, d,
                        false, buf.s, width);
}

template <typename acc_t>
Tile<acc_t> make_tile(const TileBuffers<acc_t>& buf, const PreparedColumns<acc_t>& cols,
                      const ColumnBlocks& blocks, int64_t row_begin, int64_t rows, int64_t block) {
  const int64_t c0 = blocks.begin(block);
  return Tile<acc_t>{row_begin, rows, c0, blocks.size(block), buf.s,
                     cols.labels != nullptr ? cols.labels + c0 : nullptr};
}

// ---- forward -------------------------------------------------------------------------

// Whether the epilogue has the optional visits() hook (see the concepts at the top).
template <typename Epilogue, typename State, typename = void>
struct HasVisits : std::false_type {};
template <typename Epilogue, typename State>
struct HasVisits<Epilogue, State,
                 std::void_t<decltype(std::declval<const Epilogue&>().visits(
                     std::declval<const State&>(), int64_t{}, int64_t{}))>> : std::true_type {};

template <typename Epilogue, typename State>
bool visits_block(const Epilogue& epilogue, const State& state, int64_t column_begin, int64_t columns) {
  if constexpr (HasVisits<Epilogue, State>::value) {
    return epilogue.visits(state, column_begin, columns);
  } else {
    return true;
  }
}

// Runs the epilogue over every tile of S = x̂·Ĉᵀ, row tiles in parallel.
template <typename scalar_t, typename acc_t, typename Epilogue>
void similarity_sweep(const at::Tensor& x, const PreparedColumns<acc_t>& cols, const SweepOptions& options,
                      const Epilogue& epilogue) {
  const int64_t d = x.size(1);
  const TilePlan plan = TilePlan::make(x.size(0), false);
  const ColumnBlocks blocks = ColumnBlocks::make(cols.count, options.column_block);
  const scalar_t* x_data = x.const_data_ptr<scalar_t>();
  at::parallel_for(0, plan.num_tiles, 1, [&](int64_t begin, int64_t end) {
    TileBuffers<acc_t> buf(plan.tile_rows, d, blocks.width, false);
    auto state = epilogue.make_state(TileShape{plan.tile_rows, blocks.width, cols.count});
    for (int64_t tile = begin; tile < end; ++tile) {
      const int64_t r0 = plan.tile_begin(tile), rows = plan.tile_size(tile);
      load_rows(x_data + r0 * d, rows, d, options.normalize_rows, buf.x_hat, buf.sum_sq);
      epilogue.begin_rows(state, r0, rows);
      for (int64_t block = 0; block < blocks.count; ++block) {
        if (!visits_block(epilogue, state, blocks.begin(block), blocks.size(block))) continue;
        similarity_gemm(buf, rows, cols, blocks, block);
        epilogue(state, make_tile(buf, cols, blocks, r0, rows, block));
      }
      epilogue.end_rows(state, r0, rows);
    }
  });
}

// ---- backward ------------------------------------------------------------------------

// dx rows of one tile from dx̂ = dS·Ĉ, through the row normalisation when asked.
template <typename scalar_t, typename acc_t>
void write_input_grad(const TileBuffers<acc_t>& buf, int64_t rows, int64_t d, bool normalize,
                      scalar_t* out) {
  for (int64_t i = 0; i < rows; ++i) {
    const acc_t* g = buf.dx_hat + i * d;
    scalar_t* dst = out + i * d;
    if (!normalize) {
      for (int64_t j = 0; j < d; ++j) dst[j] = static_cast<scalar_t>(g[j]);
      continue;
    }
    const acc_t* v_hat = buf.x_hat + i * d;
    const acc_t ss = buf.sum_sq[i];
    const acc_t inv = inverse_norm(ss);
    const bool clamped = norm_is_clamped(ss);
    const acc_t g_dot = dot(g, v_hat, d);
    for (int64_t j = 0; j < d; ++j) {
      dst[j] = static_cast<scalar_t>(normalize_backward(g[j], v_hat[j], g_dot, inv, clamped));
    }
  }
}

// dC in the shape and dtype of the column source, from the chunk partials of dĈ
// [chunks, M, D]: partials added in chunk order, then through the column normalisation.
template <typename scalar_t, typename acc_t>
at::Tensor reduce_column_grad(const at::Tensor& partials, int64_t num_chunks, const PreparedColumns<acc_t>& cols) {
  at::Tensor grad = at::empty_like(cols.source);
  scalar_t* out = grad.data_ptr<scalar_t>();
  const acc_t* parts = num_chunks > 0 ? partials.const_data_ptr<acc_t>() : nullptr;
  const int64_t d = cols.dim, m = cols.count;
  at::parallel_for(0, m, row_grain(d * std::max<int64_t>(1, num_chunks)), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> row(d);
    for (int64_t j = begin; j < end; ++j) {
      std::fill(row.begin(), row.end(), acc_t(0));
      for (int64_t chunk = 0; chunk < num_chunks; ++chunk) {
        const acc_t* part = parts + (chunk * m + j) * d;
        for (int64_t e = 0; e < d; ++e) row[e] += part[e];
      }
      scalar_t* dst = out + cols.order.source_of(j) * d;
      if (!cols.normalized) {
        for (int64_t e = 0; e < d; ++e) dst[e] = static_cast<scalar_t>(row[e]);
        continue;
      }
      const acc_t* hat = cols.hat + j * d;
      const acc_t inv = inverse_norm(cols.sum_sq[j]);
      const bool clamped = norm_is_clamped(cols.sum_sq[j]);
      const acc_t g_dot = dot(row.data(), hat, d);
      for (int64_t e = 0; e < d; ++e) {
        dst[e] = static_cast<scalar_t>(normalize_backward(row[e], hat[e], g_dot, inv, clamped));
      }
    }
  });
  return grad;
}

// Backward through S = x̂·Ĉᵀ with the client's gradient functor (see the concepts at the
// top). Returns (dx, dC in the source's shape, or an empty tensor).
template <typename scalar_t, typename acc_t, typename Gradient>
std::tuple<at::Tensor, at::Tensor> similarity_backward_sweep(const at::Tensor& x,
                                                             const PreparedColumns<acc_t>& cols,
                                                             const BackwardOptions& options,
                                                             const Gradient& gradient) {
  const int64_t d = x.size(1), m = cols.count;
  const TilePlan plan = TilePlan::make(x.size(0), options.need_column_grad);
  const ColumnBlocks blocks = ColumnBlocks::make(m, options.column_block);
  at::Tensor grad_x = at::empty_like(x);
  at::Tensor partials;
  if (options.need_column_grad && plan.num_chunks > 0) {
    partials = at::empty({plan.num_chunks, m, d}, cols.storage.options());
  }
  const scalar_t* x_data = x.const_data_ptr<scalar_t>();
  scalar_t* gx = grad_x.data_ptr<scalar_t>();
  acc_t* parts = partials.defined() ? partials.template data_ptr<acc_t>() : nullptr;
  at::parallel_for(0, plan.num_chunks, 1, [&](int64_t begin, int64_t end) {
    TileBuffers<acc_t> buf(plan.tile_rows, d, blocks.width, true);
    auto state = gradient.make_state(TileShape{plan.tile_rows, blocks.width, m});
    for (int64_t chunk = begin; chunk < end; ++chunk) {
      for (int64_t tile = plan.chunk_first_tile(chunk); tile < plan.chunk_end_tile(chunk); ++tile) {
        const int64_t r0 = plan.tile_begin(tile), rows = plan.tile_size(tile);
        const bool first_of_chunk = tile == plan.chunk_first_tile(chunk);
        load_rows(x_data + r0 * d, rows, d, options.normalize_rows, buf.x_hat, buf.sum_sq);
        if (blocks.count == 0) std::fill(buf.dx_hat, buf.dx_hat + rows * d, acc_t(0));
        for (int64_t block = 0; block < blocks.count; ++block) {
          const int64_t c0 = blocks.begin(block), width = blocks.size(block);
          if (options.recompute) similarity_gemm(buf, rows, cols, blocks, block);
          gradient(state, make_tile(buf, cols, blocks, r0, rows, block));
          gemm_row_major<acc_t>(false, false, rows, d, width, buf.s, width, cols.hat + c0 * d, d, block > 0,
                                buf.dx_hat, d);
          if (parts != nullptr) {
            gemm_row_major<acc_t>(true, false, width, d, rows, buf.s, width, buf.x_hat, d, !first_of_chunk,
                                  parts + (chunk * m + c0) * d, d);
          }
        }
        write_input_grad(buf, rows, d, options.normalize_rows, gx + r0 * d);
      }
    }
  });
  at::Tensor grad_columns = options.need_column_grad
                                ? reduce_column_grad<scalar_t, acc_t>(partials, plan.num_chunks, cols)
                                : at::empty({0}, cols.source.options());
  return {grad_x, grad_columns};
}

}  // namespace protoseg::cpu
