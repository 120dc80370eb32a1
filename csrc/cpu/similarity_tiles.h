// The tiled "normalise + GEMM tile + epilogue" machinery shared by the CPU kernels that
// need similarities to all C·K prototypes (prototype_similarity, class_scores,
// ppc_ppd_loss).
//
// Pixels are cut into tiles of rows. Per tile, the rows of x are normalised into a small
// buffer, S_tile = x̂_tile·P̂ᵀ [rows, C·K] comes from one BLAS call against the prototypes
// prepared once per call, and an op-specific epilogue consumes S_tile at once: nothing of
// size N·C·K is ever allocated. Backward recomputes S_tile (when the gradient needs it),
// turns it into dS_tile in place, and gets dx̂_tile = dS_tile·P̂ from a second BLAS call;
// dP̂ = Σ dS_tileᵀ·x̂_tile is accumulated per chunk of consecutive tiles and the chunk
// partials are added in chunk order.
//
// Determinism: tile and chunk sizes depend on the problem size only, each tile is
// computed by one thread in a fixed order, and every cross-tile sum combines partials in
// a fixed order, so results are bitwise the same whatever the thread count.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/mm.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

#include "common/math.h"
#include "cpu/vectorized.h"

namespace protoseg::cpu {

// ---- tiling plan -------------------------------------------------------------------

constexpr int64_t kTileRows = 128;  // [128, C·K] fp32 stays in L2 for C·K up to ~2000
constexpr int64_t kMaxChunks = 8;   // dP partials: at most 8 × [C·K, D] in the compute dtype

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

// ---- prepared prototypes -----------------------------------------------------------

// Row order of the prepared prototypes. ClassMajor: row c·K + k (the flat index of the
// API). PrototypeMajor: row k·C + c, so that S_tile holds, per pixel, K contiguous
// vectors over the classes and every reduction over k (max, argmax, log-sum-exp per
// class) is element-wise over contiguous memory, which vectorises.
enum class PrototypeOrder { ClassMajor, PrototypeMajor };

template <typename acc_t>
struct PreparedPrototypes {
  at::Tensor storage;
  const acc_t* hat = nullptr;     // [M, D]: P̂ (or P when not normalising), compute dtype
  const acc_t* sum_sq = nullptr;  // [M]: ‖P_j‖² of the raw prototype
  int64_t classes = 0;
  int64_t per_class = 0;
  int64_t count = 0;  // M = C·K
  int64_t dim = 0;
  PrototypeOrder order = PrototypeOrder::ClassMajor;

  int64_t row_of(int64_t c, int64_t k) const {
    return order == PrototypeOrder::ClassMajor ? c * per_class + k : k * classes + c;
  }
  // The API's flat index c·K + k of prepared row j.
  int64_t flat_index_of(int64_t row) const {
    if (order == PrototypeOrder::ClassMajor) return row;
    return (row % classes) * per_class + row / classes;
  }
};

// Per-row work of at least ~16K elements per thread, so small problems stay serial.
inline int64_t row_grain(int64_t row_length) {
  return std::max<int64_t>(1, (int64_t{1} << 14) / std::max<int64_t>(1, row_length));
}

// Copies `rows` rows of length d into `out` in the compute dtype, normalised when asked,
// and stores each row's ‖x_i‖² in `sum_sq`.
template <typename scalar_t, typename acc_t>
void load_rows(const scalar_t* in, int64_t rows, int64_t d, bool normalize, acc_t* out, acc_t* sum_sq) {
  for (int64_t i = 0; i < rows; ++i) {
    const scalar_t* src = in + i * d;
    acc_t* dst = out + i * d;
    for (int64_t j = 0; j < d; ++j) dst[j] = static_cast<acc_t>(src[j]);
    const acc_t ss = sum_of_squares(dst, d);
    sum_sq[i] = ss;
    if (normalize) {
      const acc_t inv = inverse_norm(ss);
      for (int64_t j = 0; j < d; ++j) dst[j] *= inv;
    }
  }
}

template <typename scalar_t, typename acc_t>
PreparedPrototypes<acc_t> prepare_prototypes(const at::Tensor& prototypes, bool normalize,
                                             PrototypeOrder order) {
  PreparedPrototypes<acc_t> p;
  p.classes = prototypes.size(0);
  p.per_class = prototypes.size(1);
  p.count = p.classes * p.per_class;
  p.dim = prototypes.size(2);
  p.order = order;
  p.storage = at::empty({p.count * p.dim + p.count},
                        prototypes.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
  acc_t* hat = p.storage.template data_ptr<acc_t>();
  acc_t* sum_sq = hat + p.count * p.dim;
  const scalar_t* src = prototypes.const_data_ptr<scalar_t>();
  const int64_t d = p.dim;
  at::parallel_for(0, p.count, row_grain(d), [&](int64_t begin, int64_t end) {
    for (int64_t flat = begin; flat < end; ++flat) {
      const int64_t row = p.row_of(flat / p.per_class, flat % p.per_class);
      load_rows(src + flat * d, 1, d, normalize, hat + row * d, sum_sq + row);
    }
  });
  p.hat = hat;
  p.sum_sq = sum_sq;
  return p;
}

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
// S or dS [T, M], dx̂ [T, D] (backward only).
template <typename acc_t>
struct TileBuffers {
  at::Tensor storage;
  acc_t* x_hat;
  acc_t* sum_sq;
  acc_t* s;
  acc_t* dx_hat;

  static int64_t aligned(int64_t count) { return (count + 15) / 16 * 16; }

  TileBuffers(int64_t tile_rows, int64_t d, int64_t m, bool with_input_grad) {
    const int64_t xs = aligned(tile_rows * d), ns = aligned(tile_rows), ss = aligned(tile_rows * m);
    const int64_t total = xs + ns + ss + (with_input_grad ? xs : 0);
    storage = at::empty({total}, at::TensorOptions().dtype(c10::CppTypeToScalarType<acc_t>::value));
    x_hat = storage.template data_ptr<acc_t>();
    sum_sq = x_hat + xs;
    s = sum_sq + ns;
    dx_hat = with_input_grad ? s + ss : nullptr;
  }
};

// S_tile [rows, M] = x̂_tile·P̂ᵀ.
template <typename acc_t>
void similarity_gemm(const TileBuffers<acc_t>& buf, int64_t rows, const PreparedPrototypes<acc_t>& p) {
  gemm_row_major<acc_t>(false, true, rows, p.count, p.dim, buf.x_hat, p.dim, p.hat, p.dim, false, buf.s,
                        p.count);
}

// One tile as seen by an epilogue: pixels [begin, begin + rows), S (or dS) rows of
// length M in prepared order.
template <typename acc_t>
struct Tile {
  int64_t begin;
  int64_t rows;
  acc_t* s;
};

// ---- forward -------------------------------------------------------------------------

// Calls epilogue(Tile) once per tile with S_tile computed, tiles in parallel.
template <typename scalar_t, typename acc_t, typename Epilogue>
void for_each_similarity_tile(const at::Tensor& x, const PreparedPrototypes<acc_t>& p, bool normalize,
                              const Epilogue& epilogue) {
  const int64_t d = x.size(1);
  const TilePlan plan = TilePlan::make(x.size(0), false);
  const scalar_t* x_data = x.const_data_ptr<scalar_t>();
  at::parallel_for(0, plan.num_tiles, 1, [&](int64_t begin, int64_t end) {
    TileBuffers<acc_t> buf(plan.tile_rows, d, p.count, false);
    for (int64_t tile = begin; tile < end; ++tile) {
      const int64_t r0 = plan.tile_begin(tile), rows = plan.tile_size(tile);
      load_rows(x_data + r0 * d, rows, d, normalize, buf.x_hat, buf.sum_sq);
      similarity_gemm(buf, rows, p);
      epilogue(Tile<acc_t>{r0, rows, buf.s});
    }
  });
}

// ---- backward ------------------------------------------------------------------------

// dx rows of one tile from dx̂ = dS·P̂, through the row normalisation when asked.
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

// dP [C, K, D] in prototypes' dtype from the chunk partials of dP̂ [chunks, M, D]:
// partials added in chunk order, then through the prototype normalisation.
template <typename scalar_t, typename acc_t>
at::Tensor reduce_prototype_grad(const at::Tensor& partials, int64_t num_chunks,
                                 const PreparedPrototypes<acc_t>& p, const at::Tensor& prototypes,
                                 bool normalize) {
  at::Tensor grad = at::empty_like(prototypes);
  scalar_t* out = grad.data_ptr<scalar_t>();
  const acc_t* parts = num_chunks > 0 ? partials.const_data_ptr<acc_t>() : nullptr;
  const int64_t d = p.dim, m = p.count;
  at::parallel_for(0, m, row_grain(d * std::max<int64_t>(1, num_chunks)), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> row(d);
    for (int64_t j = begin; j < end; ++j) {
      std::fill(row.begin(), row.end(), acc_t(0));
      for (int64_t chunk = 0; chunk < num_chunks; ++chunk) {
        const acc_t* part = parts + (chunk * m + j) * d;
        for (int64_t e = 0; e < d; ++e) row[e] += part[e];
      }
      scalar_t* dst = out + p.flat_index_of(j) * d;
      if (!normalize) {
        for (int64_t e = 0; e < d; ++e) dst[e] = static_cast<scalar_t>(row[e]);
        continue;
      }
      const acc_t* hat = p.hat + j * d;
      const acc_t inv = inverse_norm(p.sum_sq[j]);
      const bool clamped = norm_is_clamped(p.sum_sq[j]);
      const acc_t g_dot = dot(row.data(), hat, d);
      for (int64_t e = 0; e < d; ++e) {
        dst[e] = static_cast<scalar_t>(normalize_backward(row[e], hat[e], g_dot, inv, clamped));
      }
    }
  });
  return grad;
}

// Backward through S = x̂·P̂ᵀ. Per tile: S_tile is recomputed when `recompute` is set,
// fill(Tile) turns the tile buffer into dS_tile (in place), then dx̂ = dS·P̂ and, when
// `need_prototype_grad`, dP̂ += dSᵀ·x̂. Returns (dx, dP or an empty tensor).
template <typename scalar_t, typename acc_t, typename FillGrad>
std::tuple<at::Tensor, at::Tensor> similarity_tiles_backward(
    const at::Tensor& x, const at::Tensor& prototypes, const PreparedPrototypes<acc_t>& p,
    bool normalize, bool recompute, bool need_prototype_grad, const FillGrad& fill) {
  const int64_t d = x.size(1), m = p.count;
  const TilePlan plan = TilePlan::make(x.size(0), need_prototype_grad);
  at::Tensor grad_x = at::empty_like(x);
  at::Tensor partials;
  if (need_prototype_grad && plan.num_chunks > 0) {
    partials = at::empty({plan.num_chunks, m, d}, p.storage.options());
  }
  const scalar_t* x_data = x.const_data_ptr<scalar_t>();
  scalar_t* gx = grad_x.data_ptr<scalar_t>();
  acc_t* parts = partials.defined() ? partials.template data_ptr<acc_t>() : nullptr;
  at::parallel_for(0, plan.num_chunks, 1, [&](int64_t begin, int64_t end) {
    TileBuffers<acc_t> buf(plan.tile_rows, d, m, true);
    for (int64_t chunk = begin; chunk < end; ++chunk) {
      for (int64_t tile = plan.chunk_first_tile(chunk); tile < plan.chunk_end_tile(chunk); ++tile) {
        const int64_t r0 = plan.tile_begin(tile), rows = plan.tile_size(tile);
        load_rows(x_data + r0 * d, rows, d, normalize, buf.x_hat, buf.sum_sq);
        if (recompute) similarity_gemm(buf, rows, p);
        fill(Tile<acc_t>{r0, rows, buf.s});
        gemm_row_major<acc_t>(false, false, rows, d, m, buf.s, m, p.hat, d, false, buf.dx_hat, d);
        write_input_grad(buf, rows, d, normalize, gx + r0 * d);
        if (parts != nullptr) {
          const bool accumulate = tile != plan.chunk_first_tile(chunk);
          gemm_row_major<acc_t>(true, false, m, d, rows, buf.s, m, buf.x_hat, d, accumulate,
                                parts + chunk * m * d, d);
        }
      }
    }
  });
  at::Tensor grad_p = need_prototype_grad
                          ? reduce_prototype_grad<scalar_t, acc_t>(partials, plan.num_chunks, p,
                                                                   prototypes, normalize)
                          : at::empty({0}, prototypes.options());
  return {grad_x, grad_p};
}

}  // namespace protoseg::cpu
