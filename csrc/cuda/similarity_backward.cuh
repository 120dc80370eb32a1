// Backward of every similarity-based op from an element-wise rule dS_ij = rule(i, j, S_ij):
//
//   dx̂ = dS · P̂   (grad_x_kernel: a block owns kTile pixels and sweeps the prototypes)
//   dP̂ = dSᵀ · x̂  (grad_p_kernel: a block owns kTile prototypes and one split of the
//                  pixels; splits are summed in a fixed order afterwards)
//
// then through the normalisation (finalize_rows_kernel). dS is recomputed tile by
// tile from S (never stored: nothing of size N·C·K), and every sum runs in a fixed
// order without atomics, so gradients are bitwise reproducible.
//
// GradRule concept:
//   bool needs_similarity() const;   // false: the rule ignores s (no recomputation);
//                                    // the same for every thread of a launch
//   acc_t operator()(int64_t row, int64_t col, acc_t s) const;
#pragma once

#include "cuda/similarity_tile.cuh"
#include "cuda/warp_reduce.cuh"

namespace protoseg::cuda {

// grad_s[r][c] = rule(row0 + r, col0 + c, S) for the tile, zero outside [n, m).
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
      grad_s[micro_row(i)][micro_col(j)] = (row < ops.n && col < ops.m) ? rule(row, col, s.v[i][j]) : acc_t(0);
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

// grad_x_hat [n, d] = dS · P̂ for the kTile pixels of this block (rows owned by the
// block: plain read-modify-write, no atomics).
template <typename scalar_t, typename acc_t, typename Rule>
__global__ void __launch_bounds__(kTileThreads, kTileBlocksPerSm)
    grad_x_kernel(SimilarityOperands<scalar_t, acc_t> ops, Rule rule, acc_t* grad_x_hat) {
  constexpr int kTile = TileConfig<acc_t>::kTile;
  constexpr int kMicro = TileConfig<acc_t>::kMicro;
  __shared__ DepthSlices<acc_t> slices;
  __shared__ SharedTile<acc_t> grad_s;       // [pixel][prototype]
  __shared__ SharedTile<acc_t> prototype_tile;  // [prototype][feature]

  const int64_t row0 = int64_t(blockIdx.x) * kTile;
  for (int64_t col0 = 0; col0 < ops.m; col0 += kTile) {
    __syncthreads();  // the previous step's tiles have been consumed
    gradient_tile(ops, rule, row0, col0, slices, grad_s);
    for (int64_t k0 = 0; k0 < ops.d; k0 += kTile) {
      __syncthreads();
      stage_scaled_rows(ops.prototypes, ops.p_inverse_norm, ops.m, ops.d, col0, k0, prototype_tile);
      __syncthreads();
      MicroTile<acc_t> acc;
      acc.fill(acc_t(0));
      for (int c = 0; c < kTile; ++c) {
        acc_t g[kMicro], p[kMicro];
#pragma unroll
        for (int i = 0; i < kMicro; ++i) {
          g[i] = grad_s[micro_row(i)][c];
          p[i] = prototype_tile[c][micro_col(i)];
        }
#pragma unroll
        for (int i = 0; i < kMicro; ++i)
#pragma unroll
          for (int j = 0; j < kMicro; ++j) acc.v[i][j] += g[i] * p[j];
      }
      accumulate_rows(grad_x_hat, ops.n, ops.d, row0, k0, acc, col0 == 0);
    }
  }
}

// partial[split] [m, d] = dSᵀ · x̂ over the pixel tiles of this split, for the kTile
// prototypes of this block.
template <typename scalar_t, typename acc_t, typename Rule>
__global__ void __launch_bounds__(kTileThreads, kTileBlocksPerSm)
    grad_p_kernel(SimilarityOperands<scalar_t, acc_t> ops, Rule rule, acc_t* partial, int64_t tiles_per_split) {
  constexpr int kTile = TileConfig<acc_t>::kTile;
  constexpr int kMicro = TileConfig<acc_t>::kMicro;
  __shared__ DepthSlices<acc_t> slices;
  __shared__ SharedTile<acc_t> grad_s;  // [pixel][prototype]
  __shared__ SharedTile<acc_t> x_tile;  // [pixel][feature]

  const int64_t col0 = int64_t(blockIdx.x) * kTile;
  const int64_t row_tiles = (ops.n + kTile - 1) / kTile;
  const int64_t first_tile = int64_t(blockIdx.y) * tiles_per_split;
  const int64_t end_tile = first_tile + tiles_per_split < row_tiles ? first_tile + tiles_per_split : row_tiles;
  acc_t* out = partial + int64_t(blockIdx.y) * ops.m * ops.d;
  for (int64_t t = first_tile; t < end_tile; ++t) {
    const int64_t row0 = t * kTile;
    __syncthreads();
    gradient_tile(ops, rule, row0, col0, slices, grad_s);
    for (int64_t k0 = 0; k0 < ops.d; k0 += kTile) {
      __syncthreads();
      stage_scaled_rows(ops.x, ops.x_inverse_norm, ops.n, ops.d, row0, k0, x_tile);
      __syncthreads();
      MicroTile<acc_t> acc;  // rows: prototypes, columns: features
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
      accumulate_rows(out, ops.m, ops.d, col0, k0, acc, t == first_tile);
    }
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

// Pixel splits of the prototype gradient: enough blocks to fill a GPU (about 256), every
// split non-empty. Depends on the shapes only, so the summation order is reproducible.
inline int64_t prototype_grad_tiles_per_split(int64_t row_tiles, int64_t col_tiles) {
  constexpr int64_t kTargetBlocks = 256;
  const int64_t wanted_splits = ceil_div(kTargetBlocks, col_tiles);
  const int64_t splits = wanted_splits < row_tiles ? wanted_splits : row_tiles;
  return ceil_div(row_tiles, splits);
}

// (grad_x [n, d] in x's dtype, grad_prototypes [C, K, d] in their dtype, or an empty
// tensor when not needed) for the rule.
template <typename scalar_t, typename acc_t, typename Rule>
std::tuple<at::Tensor, at::Tensor> similarity_backward_from_rule(const at::Tensor& x, const at::Tensor& prototypes,
                                                                 const PreparedOperands<scalar_t, acc_t>& prepared,
                                                                 const Rule& rule, bool normalize,
                                                                 bool need_prototype_grad, cudaStream_t stream) {
  constexpr int kTile = TileConfig<acc_t>::kTile;
  const auto& ops = prepared.ops;
  const at::TensorOptions acc_options = x.options().dtype(c10::CppTypeToScalarType<acc_t>::value);

  at::Tensor grad_x = at::empty_like(x);
  at::Tensor grad_x_hat = at::empty({ops.n, ops.d}, acc_options);
  PROTOSEG_LAUNCH((grad_x_kernel<scalar_t, acc_t, Rule>), grid_for(ops.n, kTile), dim3(kTileThreads), stream, ops,
                  rule, mutable_data<acc_t>(grad_x_hat));
  PROTOSEG_LAUNCH((finalize_rows_kernel<scalar_t, acc_t>), grid_for(ops.n, kRowsPerBlock), dim3(kRowThreads), stream,
                  mutable_data<acc_t>(grad_x_hat), int64_t(1), data<scalar_t>(x), mutable_data<scalar_t>(grad_x),
                  ops.n, ops.d, normalize);
  if (!need_prototype_grad) return {grad_x, at::empty({0}, prototypes.options())};

  at::Tensor grad_p = at::empty_like(prototypes);
  if (ops.n == 0) return {grad_x, grad_p.zero_()};
  const int64_t row_tiles = ceil_div(ops.n, kTile);
  const int64_t col_tiles = ceil_div(ops.m, kTile);
  const int64_t tiles_per_split = prototype_grad_tiles_per_split(row_tiles, col_tiles);
  const int64_t splits = ceil_div(row_tiles, tiles_per_split);
  at::Tensor partial = at::empty({splits, ops.m, ops.d}, acc_options);
  const dim3 grid(grid_for(ops.m, kTile).x, static_cast<unsigned int>(splits));
  PROTOSEG_LAUNCH((grad_p_kernel<scalar_t, acc_t, Rule>), grid, dim3(kTileThreads), stream, ops, rule,
                  mutable_data<acc_t>(partial), tiles_per_split);
  PROTOSEG_LAUNCH((finalize_rows_kernel<scalar_t, acc_t>), grid_for(ops.m, kRowsPerBlock), dim3(kRowThreads), stream,
                  mutable_data<acc_t>(partial), splits, data<scalar_t>(prototypes), mutable_data<scalar_t>(grad_p),
                  ops.m, ops.d, normalize);
  return {grad_x, grad_p};
}

}  // namespace protoseg::cuda
