// The similarity tile every GEMM-shaped kernel is built on: S[rows, cols] =
// ⟨x̂_row, ĉ_col⟩ (similarity_operands.cuh: rows x against a general column set) for a
// square tile of kTile rows × kTile columns, staged through shared memory one depth
// slice of kDepth features at a time, accumulated in acc_t (fp32, or fp64 for fp64
// inputs) whatever the element type.
//
// A block has 16 × 16 threads; thread (ty, tx) owns the kMicro × kMicro elements
// (ty + 16·a, tx + 16·b) of the tile. The strided ownership keeps the shared-memory
// reads of a warp conflict-free (a row index shared by 16 lanes is a broadcast, the
// 16 consecutive column indices hit 16 banks) and the global writes of a row
// contiguous.
#pragma once

#include "cuda/host.h"
#include "cuda/numeric.cuh"
#include "cuda/similarity_operands.cuh"

namespace protoseg::cuda {

constexpr int kTileSide = 16;  // threads per tile side
constexpr int kTileThreads = kTileSide * kTileSide;
// Resident blocks per SM the tile kernels are compiled for: allows 128 registers per
// thread, which the 4 × 4 micro tiles of the backward kernels need without spilling
// (ptxas otherwise caps registers at the occupancy their shared memory allows).
constexpr int kTileBlocksPerSm = 2;

template <typename acc_t>
struct TileConfig {
  static constexpr int kMicro = 4;  // elements per thread per side
  static constexpr int kTile = kTileSide * kMicro;
  static constexpr int kDepth = 16;  // features per staged slice
};

// fp64 tiles are half as wide so that every kernel's shared memory stays within the
// 48 KiB of static shared memory a block may declare.
template <>
struct TileConfig<double> {
  static constexpr int kMicro = 2;
  static constexpr int kTile = kTileSide * kMicro;
  static constexpr int kDepth = 16;
};

// A square shared tile with one padding column (so column walks do not share a bank).
template <typename acc_t>
using SharedTile = acc_t[TileConfig<acc_t>::kTile][TileConfig<acc_t>::kTile + 1];

// One depth slice of both operands, feature-major: x_slice[k][r] = x[row0 + r, k0 + k].
template <typename acc_t>
struct DepthSlices {
  acc_t x[TileConfig<acc_t>::kDepth][TileConfig<acc_t>::kTile + 1];
  acc_t c[TileConfig<acc_t>::kDepth][TileConfig<acc_t>::kTile + 1];
};

template <typename acc_t>
struct MicroTile {
  static constexpr int kMicro = TileConfig<acc_t>::kMicro;
  acc_t v[kMicro][kMicro];

  PROTOSEG_DEVICE void fill(acc_t value) {
#pragma unroll
    for (int a = 0; a < kMicro; ++a)
#pragma unroll
      for (int b = 0; b < kMicro; ++b) v[a][b] = value;
  }
};

PROTOSEG_DEVICE int tile_ty() { return int(threadIdx.x) / kTileSide; }
PROTOSEG_DEVICE int tile_tx() { return int(threadIdx.x) % kTileSide; }

// Row (or column) of the tile owned by micro index `a` of this thread.
PROTOSEG_DEVICE int micro_row(int a) { return tile_ty() + kTileSide * a; }
PROTOSEG_DEVICE int micro_col(int b) { return tile_tx() + kTileSide * b; }

// dst[k][r] = src[first + r, k0 + k] for r < kTile, k < kDepth; zero outside the
// [count, d] matrix, so ragged edges add nothing to the products.
template <typename acc_t, typename scalar_t>
PROTOSEG_DEVICE void stage_depth_slice(const Vectors<scalar_t, acc_t>& src, int64_t d, int64_t first, int64_t k0,
                                       acc_t (*dst)[TileConfig<acc_t>::kTile + 1]) {
  constexpr int kTile = TileConfig<acc_t>::kTile;
  constexpr int kDepth = TileConfig<acc_t>::kDepth;
  for (int e = threadIdx.x; e < kTile * kDepth; e += kTileThreads) {
    const int r = e / kDepth;  // consecutive threads read consecutive features of a row
    const int k = e % kDepth;
    const int64_t row = first + r;
    const int64_t col = k0 + k;
    dst[k][r] = (row < src.count && col < d) ? to_acc(src.data[row * d + col]) : acc_t(0);
  }
}

// dst[r][c] = src[first + r, k0 + c] · inverse_norm[first + r] for a square kTile tile,
// zero outside the [count, d] matrix (the operand of the backward products).
template <typename acc_t, typename scalar_t>
PROTOSEG_DEVICE void stage_scaled_rows(const Vectors<scalar_t, acc_t>& src, int64_t d, int64_t first, int64_t k0,
                                       SharedTile<acc_t>& dst) {
  constexpr int kTile = TileConfig<acc_t>::kTile;
  for (int e = threadIdx.x; e < kTile * kTile; e += kTileThreads) {
    const int r = e / kTile;
    const int c = e % kTile;
    const int64_t row = first + r;
    const int64_t col = k0 + c;
    acc_t value = acc_t(0);
    if (row < src.count && col < d) {
      value = to_acc(src.data[row * d + col]) * (src.inverse_norm ? src.inverse_norm[row] : acc_t(1));
    }
    dst[r][c] = value;
  }
}

// acc = S[row0 .. row0 + kTile, col0 .. col0 + kTile) (this thread's elements).
// Contains __syncthreads(): every thread of the block must call it.
template <typename scalar_t, typename acc_t>
PROTOSEG_DEVICE void similarity_micro_tile(const SimilarityOperands<scalar_t, acc_t>& ops, int64_t row0, int64_t col0,
                                           DepthSlices<acc_t>& slices, MicroTile<acc_t>& acc) {
  constexpr int kMicro = TileConfig<acc_t>::kMicro;
  constexpr int kDepth = TileConfig<acc_t>::kDepth;
  acc.fill(acc_t(0));
  for (int64_t k0 = 0; k0 < ops.d; k0 += kDepth) {
    __syncthreads();  // the previous slice has been consumed
    stage_depth_slice(ops.rows, ops.d, row0, k0, slices.x);
    stage_depth_slice(ops.columns, ops.d, col0, k0, slices.c);
    __syncthreads();
#pragma unroll
    for (int k = 0; k < kDepth; ++k) {
      acc_t a[kMicro], b[kMicro];
#pragma unroll
      for (int i = 0; i < kMicro; ++i) {
        a[i] = slices.x[k][micro_row(i)];
        b[i] = slices.c[k][micro_col(i)];
      }
#pragma unroll
      for (int i = 0; i < kMicro; ++i)
#pragma unroll
        for (int j = 0; j < kMicro; ++j) acc.v[i][j] += a[i] * b[j];
    }
  }
#pragma unroll
  for (int i = 0; i < kMicro; ++i) {
    const acc_t sx = ops.rows.scale(row0 + micro_row(i));
#pragma unroll
    for (int j = 0; j < kMicro; ++j) acc.v[i][j] *= sx * ops.columns.scale(col0 + micro_col(j));
  }
}

// tile[r][c] = this thread's elements of `acc`.
template <typename acc_t>
PROTOSEG_DEVICE void store_micro_tile(const MicroTile<acc_t>& acc, SharedTile<acc_t>& tile) {
  constexpr int kMicro = TileConfig<acc_t>::kMicro;
#pragma unroll
  for (int i = 0; i < kMicro; ++i)
#pragma unroll
    for (int j = 0; j < kMicro; ++j) tile[micro_row(i)][micro_col(j)] = acc.v[i][j];
}

}  // namespace protoseg::cuda
