// Backward of every op built on the column engine, from an element-wise rule
// dS_ij = rule(i, column j, S_ij):
//
//   dx̂ = dS · Ĉ   (grad_x_kernel: a block owns kTile rows and sweeps the columns)
//   dĈ = dSᵀ · x̂  (grad_c_kernel: a block owns kTile columns and one split of the
//                  rows; splits are summed in a fixed order afterwards)
//
// on tensor cores in tf32 or on FMA units (tile_math.cuh), then through the
// normalisation (finalize_rows_kernel); when the columns are the rows
// themselves (in-batch contrast), one gradient of both roles, dS·x̂ + dSᵀ·x̂
// (similarity_backward_both_roles_from_rule). dS is recomputed tile by
// tile from S (never stored: nothing of size N·M), and every sum runs in a fixed
// order without atomics, so gradients are bitwise reproducible.
//
// GradientRule concept (the op's side, like the sweep's Visitor):
//   struct Rule {
//     struct Params;                        // kernel argument: upstream gradients,
//                                           // saved statistics, options; one struct
//     explicit Rule(const Params&);
//     bool needs_similarity() const;        // false: the rule ignores s (no
//                                           // recomputation); uniform over a launch
//     acc_t operator()(int64_t row, Column column, acc_t s) const;  // dS[row, column.index]
//   };
// The rule is called only inside [N, M); column.label is the column's label (or
// kUnlabelled), so a label-masked loss needs nothing from the engine beyond this.
#pragma once

#include "cuda/similarity_tile.cuh"
#include "cuda/tensor_core_tile.cuh"
#include "cuda/tile_math.cuh"
#include "cuda/warp_reduce.cuh"

namespace protoseg::cuda {

// grad_s[r][c] = rule(row0 + r, column col0 + c, S) for the tile, zero outside [n, m).
template <typename scalar_t, typename acc_t, typename Rule>
PROTOSEG_DEVICE void gradient_tile(const SimilarityOperands<scalar_t, acc_t>& ops, const Rule& rule, int64_t row0,
                                   int64_t col0, DepthSlices<acc_t>& slices, SharedTile<acc_t>& grad_s) {
  constexpr int kMicro = TileConfig<acc_t>::kMicro;
  MicroTile<acc_t> s;
  if (rule.needs_similarity()) {  // uniform: every thread reaches the barriers inside
    similarity_micro_tile(ops, row0, col0, slices, s);
  } else {
    s.fill(acc_t(0));
  }
#pragma unroll
  for (int i = 0; i < kMicro; ++i) {
    const int64_t row = row0 + micro_row(i);
#pragma unroll
    for (int j = 0; j < kMicro; ++j) {
      const int64_t col = col0 + micro_col(j);
      const bool inside = row < ops.rows.count && col < ops.columns.count;
      grad_s[micro_row(i)][micro_col(j)] = inside ? rule(row, ops.column(col), s.v[i][j]) : acc_t(0);
    }
  }
}

// out[r, k0 + c] (+)= acc for this thread's elements inside [rows, d); `first`
// overwrites (no zero-fill pass needed).
template <typename acc_t>
PROTOSEG_DEVICE void accumulate_rows(acc_t* out, int64_t rows, int64_t d, int64_t row0, int64_t k0,
                                     const MicroTile<acc_t>& acc, bool first) {
  constexpr int kMicro = TileConfig<acc_t>::kMicro;
#pragma unroll
  for (int i = 0; i < kMicro; ++i) {
    const int64_t row = row0 + micro_row(i);
    if (row >= rows) continue;
#pragma unroll
    for (int j = 0; j < kMicro; ++j) {
      const int64_t col = k0 + micro_col(j);
      if (col >= d) continue;
      acc_t* target = out + row * d + col;
      *target = first ? acc.v[i][j] : *target + acc.v[i][j];
    }
  }
}

// grad_x_hat [n, d] = dS · Ĉ for the kTile rows of this block (rows owned by the
// block: plain read-modify-write, no atomics), on FMA units.
template <typename scalar_t, typename acc_t, typename Rule>
PROTOSEG_DEVICE void grad_x_fma(const SimilarityOperands<scalar_t, acc_t>& ops, const typename Rule::Params& params,
                                acc_t* grad_x_hat) {
  constexpr int kTile = TileConfig<acc_t>::kTile;
  constexpr int kMicro = TileConfig<acc_t>::kMicro;
  __shared__ DepthSlices<acc_t> slices;
  __shared__ SharedTile<acc_t> grad_s;       // [row][column]
  __shared__ SharedTile<acc_t> column_tile;  // [column][feature]

  const Rule rule(params);
  const int64_t row0 = int64_t(blockIdx.x) * kTile;
  for (int64_t col0 = 0; col0 < ops.columns.count; col0 += kTile) {
    __syncthreads();  // the previous step's tiles have been consumed
    gradient_tile(ops, rule, row0, col0, slices, grad_s);
    for (int64_t k0 = 0; k0 < ops.d; k0 += kTile) {
      __syncthreads();
      stage_scaled_rows(ops.columns, ops.d, col0, k0, column_tile);
      __syncthreads();
      MicroTile<acc_t> acc;
      acc.fill(acc_t(0));
      for (int c = 0; c < kTile; ++c) {
        acc_t g[kMicro], p[kMicro];
#pragma unroll
        for (int i = 0; i < kMicro; ++i) {
          g[i] = grad_s[micro_row(i)][c];
          p[i] = column_tile[c][micro_col(i)];
        }
#pragma unroll
        for (int i = 0; i < kMicro; ++i)
#pragma unroll
          for (int j = 0; j < kMicro; ++j) acc.v[i][j] += g[i] * p[j];
      }
      accumulate_rows(grad_x_hat, ops.rows.count, ops.d, row0, k0, acc, col0 == 0);
    }
  }
}

// partial[split] [m, d] = dSᵀ · x̂ over the row tiles of this split, for the kTile
// columns of this block, on FMA units.
template <typename scalar_t, typename acc_t, typename Rule>
PROTOSEG_DEVICE void grad_c_fma(const SimilarityOperands<scalar_t, acc_t>& ops, const typename Rule::Params& params,
                                acc_t* partial, int64_t tiles_per_split) {
  constexpr int kTile = TileConfig<acc_t>::kTile;
  constexpr int kMicro = TileConfig<acc_t>::kMicro;
  __shared__ DepthSlices<acc_t> slices;
  __shared__ SharedTile<acc_t> grad_s;  // [row][column]
  __shared__ SharedTile<acc_t> x_tile;  // [row][feature]

  const Rule rule(params);
  const int64_t col0 = int64_t(blockIdx.x) * kTile;
  const int64_t row_tiles = (ops.rows.count + kTile - 1) / kTile;
  const int64_t first_tile = int64_t(blockIdx.y) * tiles_per_split;
  const int64_t end_tile = first_tile + tiles_per_split < row_tiles ? first_tile + tiles_per_split : row_tiles;
  acc_t* out = partial + int64_t(blockIdx.y) * ops.columns.count * ops.d;
  for (int64_t t = first_tile; t < end_tile; ++t) {
    const int64_t row0 = t * kTile;
    __syncthreads();
    gradient_tile(ops, rule, row0, col0, slices, grad_s);
    for (int64_t k0 = 0; k0 < ops.d; k0 += kTile) {
      __syncthreads();
      stage_scaled_rows(ops.rows, ops.d, row0, k0, x_tile);
      __syncthreads();
      MicroTile<acc_t> acc;  // rows: columns of S, columns: features
      acc.fill(acc_t(0));
      for (int r = 0; r < kTile; ++r) {
        acc_t g[kMicro], v[kMicro];
#pragma unroll
        for (int i = 0; i < kMicro; ++i) {
          g[i] = grad_s[r][micro_row(i)];
          v[i] = x_tile[r][micro_col(i)];
        }
#pragma unroll
        for (int i = 0; i < kMicro; ++i)
#pragma unroll
          for (int j = 0; j < kMicro; ++j) acc.v[i][j] += g[i] * v[j];
      }
      accumulate_rows(out, ops.columns.count, ops.d, col0, k0, acc, t == first_tile);
    }
  }
}

// The tensor-core versions. dS, times the inverse norm of the side being summed over,
// and the raw operand tile go through shared memory into tf32 wmma fragments; each
// product lands in the stage buffer and is added to the output rows from there. For
// fp16 / bf16 inputs the raw operand is exact in tf32 and dS runs as two tf32 halves,
// so the gradient is as accurate as with fp32 FMA; fp32 inputs (TF32 allowed) run one
// tf32 product.
template <typename scalar_t>
constexpr bool kSplitGradient = kAlwaysTensorCores<scalar_t>;

// Which inverse norm the gradient tile carries: the columns' (for dS·Ĉ = (dS·diag(1/‖c‖))·C)
// or the rows' (for dSᵀ·x̂).
enum class FoldedScale { kColumns, kRows };

// grad_s.v[r][c] = rule(row0 + r, column col0 + c, S) · the folded inverse norm, in fp32,
// zero outside [n, m). The caller synchronises before reading grad_s.
template <FoldedScale fold, typename scalar_t, typename acc_t, typename Rule>
PROTOSEG_DEVICE void gradient_tile_tc(const SimilarityOperands<scalar_t, acc_t>& ops, const Rule& rule, int64_t row0,
                                      int64_t col0, tc::Slices<scalar_t>& slices, tc::FloatTile& grad_s) {
  const bool with_similarity = rule.needs_similarity();  // uniform over the block
  if (with_similarity) tc::similarity_tile(ops, row0, col0, slices, grad_s, nvcuda::wmma::mem_row_major);
#pragma unroll 1  // one rule evaluation live at a time: a heavy rule would spill if unrolled
  for (int e = threadIdx.x; e < tc::kTile * tc::kTile; e += kTileThreads) {
    const int r = e / tc::kTile, c = e % tc::kTile;
    const int64_t row = row0 + r, col = col0 + c;
    const bool inside = row < ops.rows.count && col < ops.columns.count;
    const acc_t s = with_similarity ? grad_s.v[r][c] : acc_t(0);
    const acc_t scale = fold == FoldedScale::kColumns ? ops.columns.scale(col) : ops.rows.scale(row);
    grad_s.v[r][c] = inside ? rule(row, ops.column(col), s) * scale : 0.0f;
  }
}

// out[row0 + r, k0 + c] (+)= tile.v[r][c] inside [rows, d); `first` overwrites.
PROTOSEG_DEVICE void accumulate_tile_rows(float* out, int64_t rows, int64_t d, int64_t row0, int64_t k0,
                                          const tc::FloatTile& tile, bool first) {
  for (int e = threadIdx.x; e < tc::kTile * tc::kTile; e += kTileThreads) {
    const int r = e / tc::kTile, c = e % tc::kTile;
    const int64_t row = row0 + r, col = k0 + c;
    if (row >= rows || col >= d) continue;
    float* target = out + row * d + col;
    *target = first ? tile.v[r][c] : *target + tile.v[r][c];
  }
}

// out rows [row0, row0 + kTile) (+)= A · B_k0 for k0 = 0, kTile, ... over the features,
// B_k0 = the raw rows of `operand` from feature k0, A = grad_s (ALayout row_major) or
// its transpose (col_major).
template <typename ALayout, bool kSplitA, typename scalar_t, typename acc_t>
PROTOSEG_DEVICE void product_rows_tc(const tc::FloatTile& grad_s, const Vectors<scalar_t, acc_t>& operand,
                                     int64_t operand_first, tc::FloatTile& stage, float* out, int64_t rows, int64_t d,
                                     int64_t row0, bool first) {
  for (int64_t k0 = 0; k0 < d; k0 += tc::kTile) {
    __syncthreads();  // grad_s is written; the previous product has been added
    tc::stage_rows_tf32(operand, d, operand_first, k0, stage);
    __syncthreads();
    tc::Accumulator acc[tc::kWarpFragments];
    for (auto& a : acc) nvcuda::wmma::fill_fragment(a, 0.0f);
    tc::accumulate_product<ALayout, kSplitA>(grad_s, stage, acc);
    __syncthreads();  // every warp has read the operand tile
    tc::store_accumulators(acc, stage);
    __syncthreads();
    accumulate_tile_rows(out, rows, d, row0, k0, stage, first);
  }
}

template <typename scalar_t, typename acc_t, typename Rule>
PROTOSEG_DEVICE void grad_x_tc(const SimilarityOperands<scalar_t, acc_t>& ops, const typename Rule::Params& params,
                               acc_t* grad_x_hat) {
  __shared__ tc::FloatTile grad_s;                // [row][column]
  __shared__ tc::SlicesOrTile<scalar_t> stage;   // S's slices, then C [column][feature], then the product
  const Rule rule(params);
  const int64_t row0 = int64_t(blockIdx.x) * tc::kTile;
  for (int64_t col0 = 0; col0 < ops.columns.count; col0 += tc::kTile) {
    __syncthreads();  // the previous step's tiles have been consumed
    gradient_tile_tc<FoldedScale::kColumns>(ops, rule, row0, col0, stage.slices(), grad_s);
    product_rows_tc<nvcuda::wmma::row_major, kSplitGradient<scalar_t>>(
        grad_s, ops.columns, col0, stage.tile(), grad_x_hat, ops.rows.count, ops.d, row0, col0 == 0);
  }
}

template <typename scalar_t, typename acc_t, typename Rule>
PROTOSEG_DEVICE void grad_c_tc(const SimilarityOperands<scalar_t, acc_t>& ops, const typename Rule::Params& params,
                               acc_t* partial, int64_t tiles_per_split) {
  __shared__ tc::FloatTile grad_s;                // [row][column]
  __shared__ tc::SlicesOrTile<scalar_t> stage;   // S's slices, then x [row][feature], then the product
  const Rule rule(params);
  const int64_t col0 = int64_t(blockIdx.x) * tc::kTile;
  const int64_t row_tiles = (ops.rows.count + tc::kTile - 1) / tc::kTile;
  const int64_t first_tile = int64_t(blockIdx.y) * tiles_per_split;
  const int64_t end_tile = first_tile + tiles_per_split < row_tiles ? first_tile + tiles_per_split : row_tiles;
  acc_t* out = partial + int64_t(blockIdx.y) * ops.columns.count * ops.d;
  for (int64_t t = first_tile; t < end_tile; ++t) {
    const int64_t row0 = t * tc::kTile;
    __syncthreads();
    gradient_tile_tc<FoldedScale::kRows>(ops, rule, row0, col0, stage.slices(), grad_s);
    // A = dSᵀ: grad_s read column-major.
    product_rows_tc<nvcuda::wmma::col_major, kSplitGradient<scalar_t>>(
        grad_s, ops.rows, row0, stage.tile(), out, ops.columns.count, ops.d, col0, t == first_tile);
  }
}

// The kernels: one block's share of dS·Ĉ (grad_x) or of a row split of dSᵀ·x̂ (grad_c),
// on the math chosen for the launch.
template <typename scalar_t, typename acc_t, typename Rule, TileMath math>
__global__ void __launch_bounds__(kTileThreads, kTileBlocksPerSm)
    grad_x_kernel(SimilarityOperands<scalar_t, acc_t> ops, typename Rule::Params params, acc_t* grad_x_hat) {
  if constexpr (math == TileMath::kTensorCore) {
    grad_x_tc<scalar_t, acc_t, Rule>(ops, params, grad_x_hat);
  } else {
    grad_x_fma<scalar_t, acc_t, Rule>(ops, params, grad_x_hat);
  }
}

template <typename scalar_t, typename acc_t, typename Rule, TileMath math>
__global__ void __launch_bounds__(kTileThreads, kTileBlocksPerSm)
    grad_c_kernel(SimilarityOperands<scalar_t, acc_t> ops, typename Rule::Params params, acc_t* partial,
                  int64_t tiles_per_split) {
  if constexpr (math == TileMath::kTensorCore) {
    grad_c_tc<scalar_t, acc_t, Rule>(ops, params, partial, tiles_per_split);
  } else {
    grad_c_fma<scalar_t, acc_t, Rule>(ops, params, partial, tiles_per_split);
  }
}

// grad[r] = normalize_backward(Σ_s partial[s][r], v[r]) (or the plain sum when not
// normalising), cast to scalar_t; one warp per row. The split sum is written back to
// partial[0][r] between the two passes over the row.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kRowThreads, kSmallKernelBlocksPerSm)
    finalize_rows_kernel(acc_t* partial, int64_t splits, const scalar_t* v, scalar_t* grad, int64_t rows,
                         int64_t length, bool normalize) {
  const int64_t row = global_warp_index();
  if (row >= rows) return;  // uniform over the warp
  const int64_t split_stride = rows * length;
  acc_t* sum_row = partial + row * length;
  const scalar_t* v_row = v + row * length;
  acc_t g_dot_v = acc_t(0);
  for (int64_t k = lane_index(); k < length; k += kWarpSize) {
    acc_t g = acc_t(0);
    for (int64_t s = 0; s < splits; ++s) g += sum_row[s * split_stride + k];
    sum_row[k] = g;
    g_dot_v += g * to_acc(v_row[k]);
  }
  g_dot_v = warp_sum(g_dot_v);
  const acc_t sum_sq = warp_row_sum_squares<acc_t>(v_row, length);
  const acc_t inverse = inverse_norm(sum_sq);
  const bool clamped = norm_is_clamped(sum_sq);
  for (int64_t k = lane_index(); k < length; k += kWarpSize) {
    const acc_t g = sum_row[k];
    const acc_t out = normalize ? normalize_backward(g, to_acc(v_row[k]) * inverse, g_dot_v * inverse, inverse, clamped)
                                : g;
    grad[row * length + k] = from_acc<scalar_t>(out);
  }
}

// Row splits of the column gradient: enough blocks to fill a GPU (about 256), every
// split non-empty. Depends on the shapes only, so the summation order is reproducible.
inline int64_t column_grad_tiles_per_split(int64_t row_tiles, int64_t col_tiles) {
  constexpr int64_t kTargetBlocks = 256;
  const int64_t wanted_splits = ceil_div(kTargetBlocks, col_tiles);
  const int64_t splits = wanted_splits < row_tiles ? wanted_splits : row_tiles;
  return ceil_div(row_tiles, splits);
}

// How grad_c_kernel splits the rows of an [n, m] similarity (n, m > 0).
struct RowSplits {
  int64_t tiles_per_split;
  int64_t count;
};

inline RowSplits column_grad_row_splits(int64_t n, int64_t m, int64_t tile) {
  const int64_t row_tiles = ceil_div(n, tile);
  const int64_t tiles_per_split = column_grad_tiles_per_split(row_tiles, ceil_div(m, tile));
  return RowSplits{tiles_per_split, ceil_div(row_tiles, tiles_per_split)};
}

// out [n, d] = dS · Ĉ in acc_t (n, m > 0).
template <typename Rule, typename scalar_t, typename acc_t>
void launch_row_gradient(const SimilarityOperands<scalar_t, acc_t>& ops, const typename Rule::Params& params,
                         acc_t* out, cudaStream_t stream) {
  with_tile_math<scalar_t>(ops.math, [&](auto math) {
    PROTOSEG_LAUNCH((grad_x_kernel<scalar_t, acc_t, Rule, decltype(math)::value>),
                    grid_for(ops.rows.count, TileConfig<acc_t>::kTile), dim3(kTileThreads), stream, ops, params, out);
  });
}

// partial [splits.count, m, d] = dSᵀ · x̂ per row split, in acc_t (n, m > 0).
template <typename Rule, typename scalar_t, typename acc_t>
void launch_column_gradient(const SimilarityOperands<scalar_t, acc_t>& ops, const typename Rule::Params& params,
                            RowSplits splits, acc_t* partial, cudaStream_t stream) {
  const dim3 grid(grid_for(ops.columns.count, TileConfig<acc_t>::kTile).x, static_cast<unsigned int>(splits.count));
  with_tile_math<scalar_t>(ops.math, [&](auto math) {
    PROTOSEG_LAUNCH((grad_c_kernel<scalar_t, acc_t, Rule, decltype(math)::value>), grid, dim3(kTileThreads), stream, ops,
                    params, partial, splits.tiles_per_split);
  });
}

// grad [rows, d] = the fixed-order sum of the `splits` slices of partial, through the
// normalisation of v when `normalize`, in scalar_t.
template <typename scalar_t, typename acc_t>
void launch_finalize_rows(acc_t* partial, int64_t splits, const scalar_t* v, scalar_t* grad, int64_t rows, int64_t d,
                          bool normalize, cudaStream_t stream) {
  PROTOSEG_LAUNCH((finalize_rows_kernel<scalar_t, acc_t>), grid_for(rows, kRowsPerBlock), dim3(kRowThreads), stream,
                  partial, splits, v, grad, rows, d, normalize);
}

// (grad_x [n, d] in x's dtype, grad_columns shaped like the prepared columns tensor in
// its dtype, or an empty tensor when not needed) for the rule with `params`.
template <typename Rule, typename scalar_t, typename acc_t>
std::tuple<at::Tensor, at::Tensor> similarity_backward_from_rule(const PreparedOperands<scalar_t, acc_t>& prepared,
                                                                 const typename Rule::Params& params,
                                                                 bool need_column_grad, cudaStream_t stream) {
  const auto& ops = prepared.ops;
  const int64_t n = ops.rows.count, m = ops.columns.count, d = ops.d;
  const at::TensorOptions acc_options = prepared.x.options().dtype(c10::CppTypeToScalarType<acc_t>::value);

  at::Tensor grad_x = at::empty_like(prepared.x);
  at::Tensor grad_x_hat = at::empty({n, d}, acc_options);
  if (m == 0) {
    grad_x_hat.zero_();  // an empty column set (an empty memory bank): dS has no column
  } else {
    launch_row_gradient<Rule>(ops, params, mutable_data<acc_t>(grad_x_hat), stream);
  }
  launch_finalize_rows(mutable_data<acc_t>(grad_x_hat), int64_t(1), ops.rows.data, mutable_data<scalar_t>(grad_x), n,
                       d, prepared.normalize, stream);
  if (!need_column_grad) return {grad_x, at::empty({0}, prepared.columns.options())};

  at::Tensor grad_c = at::empty_like(prepared.columns);
  if (n == 0 || m == 0) return {grad_x, grad_c.zero_()};
  const RowSplits splits = column_grad_row_splits(n, m, TileConfig<acc_t>::kTile);
  at::Tensor partial = at::empty({splits.count, m, d}, acc_options);
  launch_column_gradient<Rule>(ops, params, splits, mutable_data<acc_t>(partial), stream);
  launch_finalize_rows(mutable_data<acc_t>(partial), splits.count, ops.columns.data, mutable_data<scalar_t>(grad_c),
                       m, d, prepared.normalize, stream);
  return {grad_x, grad_c};
}

// grad_x [n, d] in x's dtype when the columns are the rows themselves
// (prepare_operands(x, x, ...): in-batch contrast, docs/spec.md §10.1): each row gets both of its
// roles, dS·x̂ + dSᵀ·x̂, added in acc_t before the normalisation. grad_x_kernel writes
// the first slice of the partial sums and grad_c_kernel's row splits the others, so one
// finalize adds them in a fixed order (no atomics).
template <typename Rule, typename scalar_t, typename acc_t>
at::Tensor similarity_backward_both_roles_from_rule(const PreparedOperands<scalar_t, acc_t>& prepared,
                                                    const typename Rule::Params& params, cudaStream_t stream) {
  const auto& ops = prepared.ops;
  const int64_t n = ops.rows.count, d = ops.d;
  TORCH_INTERNAL_ASSERT(ops.columns.count == n && ops.columns.data == ops.rows.data,
                        "similarity backward: both roles need the rows as the columns");
  at::Tensor grad_x = at::empty_like(prepared.x);
  if (n == 0) return grad_x;
  const RowSplits splits = column_grad_row_splits(n, n, TileConfig<acc_t>::kTile);
  at::Tensor partial =
      at::empty({1 + splits.count, n, d}, prepared.x.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
  acc_t* as_row = mutable_data<acc_t>(partial);
  launch_row_gradient<Rule>(ops, params, as_row, stream);
  launch_column_gradient<Rule>(ops, params, splits, as_row + n * d, stream);
  launch_finalize_rows(as_row, 1 + splits.count, ops.rows.data, mutable_data<scalar_t>(grad_x), n, d,
                       prepared.normalize, stream);
  return grad_x;
}

}  // namespace protoseg::cuda
