// The column engine's tiles on tensor cores, through the warp matrix functions of
// `nvcuda::wmma` (emulated on the host by csrc/emulation/wmma_emulation.h).
//
// A block tile is kTile × kTile = 64 × 64, as the FMA tiles of fp32 (so grids and row
// splits do not depend on the math). Its 8 warps own 16 × 32 of it each: warp w holds
// the two 16 × 16 accumulator fragments at rows 16·(w mod 4), columns 32·(w div 4) and
// 32·(w div 4) + 16.
//
//   similarity_tile    S[row0.., col0..] = ⟨x̂, ĉ⟩: depth slices of 32 features of both
//                      operands staged in the fragment type (fp16 / bf16, or fp32 rounded
//                      to tf32), then one wmma per 16 (8 for tf32) features; the inverse
//                      norms scale the fp32 result, which lands in a shared tile.
//   accumulate_product acc += A·B for two 64 × 64 fp32 tiles in shared memory, in tf32
//                      (the backward products: dS·Ĉ and dSᵀ·x̂, with the inverse norms
//                      folded into dS so that the other operand is the raw input, exact
//                      in tf32 for fp16 / bf16; dS then runs as two tf32 halves).
//
// bf16 and tf32 fragments need sm_80 or newer: setup.py refuses older targets.
// Shared tiles of floats have a leading dimension of kTile + 4 (wmma wants a multiple of
// 16 bytes); every fragment pointer is 32-byte aligned (checked by the emulation).
#pragma once

#include "cuda/host.h"
#include "cuda/numeric.cuh"
#include "cuda/similarity_operands.cuh"
#include "cuda/similarity_tile.cuh"

namespace protoseg::cuda::tc {

namespace wmma = nvcuda::wmma;

constexpr int kThreads = kTileThreads;  // the engine's block
constexpr int kTile = 64;
constexpr int kDepth = 32;      // features per staged slice of the forward
constexpr int kFragment = 16;   // fragment rows and columns
constexpr int kTf32Depth = 8;   // k of a tf32 fragment
constexpr int kTileLd = kTile + 4;
constexpr int kWarpFragments = 2;  // accumulators per warp

// The fragment element of the forward operands of scalar_t, and its k.
template <typename scalar_t>
struct Operand;
template <>
struct Operand<__half> {
  using fragment_t = __half;
  using storage_t = __half;
  static constexpr int kK = 16;
};
template <>
struct Operand<__nv_bfloat16> {
  using fragment_t = __nv_bfloat16;
  using storage_t = __nv_bfloat16;
  static constexpr int kK = 16;
};
template <>
struct Operand<float> {
  using fragment_t = wmma::precision::tf32;
  using storage_t = float;
  static constexpr int kK = kTf32Depth;
};

PROTOSEG_DEVICE __half to_operand(__half v) { return v; }
PROTOSEG_DEVICE __nv_bfloat16 to_operand(__nv_bfloat16 v) { return v; }
PROTOSEG_DEVICE float to_operand(float v) { return wmma::__float_to_tf32(v); }

// One depth slice of both forward operands, feature-minor: x[r][k] is matrix_a
// (row-major), c[n][k] is matrix_b read column-major.
template <typename scalar_t>
struct Slices {
  using storage_t = typename Operand<scalar_t>::storage_t;
  static constexpr int kLd = kDepth + int(16 / sizeof(storage_t));
  alignas(32) storage_t x[kTile][kLd];
  alignas(32) storage_t c[kTile][kLd];
};

struct FloatTile {
  alignas(32) float v[kTile][kTileLd];
};

// Shared storage used first for the slices of a similarity, then for a float tile.
template <typename scalar_t>
struct SlicesOrTile {
  static constexpr std::size_t kBytes =
      sizeof(Slices<scalar_t>) > sizeof(FloatTile) ? sizeof(Slices<scalar_t>) : sizeof(FloatTile);
  alignas(32) unsigned char bytes[kBytes];
  PROTOSEG_DEVICE Slices<scalar_t>& slices() { return *reinterpret_cast<Slices<scalar_t>*>(bytes); }
  PROTOSEG_DEVICE FloatTile& tile() { return *reinterpret_cast<FloatTile*>(bytes); }
};

using Accumulator = wmma::fragment<wmma::accumulator, kFragment, kFragment, kTf32Depth, float>;
template <typename scalar_t>
using ForwardAccumulator = wmma::fragment<wmma::accumulator, kFragment, kFragment, Operand<scalar_t>::kK, float>;

PROTOSEG_DEVICE int warp_in_block() { return int(threadIdx.x) / kWarpSize; }
// First tile row of this warp's fragments, and first column of its fragment j.
PROTOSEG_DEVICE int fragment_row() { return warp_in_block() % 4 * kFragment; }
PROTOSEG_DEVICE int fragment_col(int j) { return (warp_in_block() / 4 * kWarpFragments + j) * kFragment; }

// dst[r][k] = src[first + r, k0 + k] as a fragment operand, zero outside the [count, d]
// matrix, so ragged edges add nothing.
template <typename scalar_t, typename acc_t>
PROTOSEG_DEVICE void stage_operand_slice(const Vectors<scalar_t, acc_t>& src, int64_t d, int64_t first, int64_t k0,
                                         typename Operand<scalar_t>::storage_t (*dst)[Slices<scalar_t>::kLd]) {
  const auto zero = to_operand(from_acc<scalar_t>(acc_t(0)));
  for (int e = threadIdx.x; e < kTile * kDepth; e += kThreads) {
    const int r = e / kDepth;  // consecutive threads read consecutive features of a row
    const int k = e % kDepth;
    const int64_t row = first + r;
    const int64_t col = k0 + k;
    dst[r][k] = (row < src.count && col < d) ? to_operand(src.data[row * d + col]) : zero;
  }
}

// tile = S[row0 .., col0 ..) for the block tile, tile.v[r][c] (layout mem_row_major) or
// tile.v[c][r] (mem_col_major). Contains __syncthreads() and ends with one: every
// thread of the block calls it, and may read the tile on return.
template <typename scalar_t, typename acc_t>
PROTOSEG_DEVICE void similarity_tile(const SimilarityOperands<scalar_t, acc_t>& ops, int64_t row0, int64_t col0,
                                     Slices<scalar_t>& slices, FloatTile& tile, wmma::layout_t layout) {
  using O = Operand<scalar_t>;
  ForwardAccumulator<scalar_t> acc[kWarpFragments];
  for (auto& a : acc) wmma::fill_fragment(a, 0.0f);
  for (int64_t k0 = 0; k0 < ops.d; k0 += kDepth) {
    __syncthreads();  // the previous slice has been consumed
    stage_operand_slice(ops.rows, ops.d, row0, k0, slices.x);
    stage_operand_slice(ops.columns, ops.d, col0, k0, slices.c);
    __syncthreads();
    // Two k steps at a time: fully unrolled, the tf32 loads of a heavy client kernel
    // (the contrast gradient) would not fit its 128 registers.
#pragma unroll 2
    for (int kk = 0; kk < kDepth; kk += O::kK) {
      wmma::fragment<wmma::matrix_a, kFragment, kFragment, O::kK, typename O::fragment_t, wmma::row_major> a;
      wmma::load_matrix_sync(a, &slices.x[fragment_row()][kk], Slices<scalar_t>::kLd);
#pragma unroll
      for (int j = 0; j < kWarpFragments; ++j) {
        wmma::fragment<wmma::matrix_b, kFragment, kFragment, O::kK, typename O::fragment_t, wmma::col_major> b;
        wmma::load_matrix_sync(b, &slices.c[fragment_col(j)][kk], Slices<scalar_t>::kLd);
        wmma::mma_sync(acc[j], a, b, acc[j]);
      }
    }
  }
  const bool by_row = layout == wmma::mem_row_major;
#pragma unroll
  for (int j = 0; j < kWarpFragments; ++j) {
    float* at = by_row ? &tile.v[fragment_row()][fragment_col(j)] : &tile.v[fragment_col(j)][fragment_row()];
    wmma::store_matrix_sync(at, acc[j], kTileLd, layout);
  }
  __syncthreads();
  if (ops.rows.inverse_norm || ops.columns.inverse_norm) {  // uniform over the block
    for (int e = threadIdx.x; e < kTile * kTile; e += kThreads) {
      const int r = e / kTile, c = e % kTile;
      float& s = by_row ? tile.v[r][c] : tile.v[c][r];
      s *= ops.rows.scale(row0 + r) * ops.columns.scale(col0 + c);
    }
    __syncthreads();
  }
}

// A fragment of fp32 values as tf32: rounded (hi), and when `split` also the rounded
// remainder (lo), so that hi + lo carries 22 of fp32's 24 significant bits.
template <typename Fragment>
PROTOSEG_DEVICE void split_to_tf32(Fragment& hi, Fragment& lo, bool split) {
#pragma unroll
  for (int i = 0; i < hi.num_elements; ++i) {
    const float v = hi.x[i];
    const float h = wmma::__float_to_tf32(v);
    hi.x[i] = h;
    // An infinite h takes no remainder (inf − inf would turn ±inf into NaN); h − h is 0
    // exactly for a finite h and NaN otherwise.
    const bool finite = h - h == 0.0f;
    lo.x[i] = (split && finite) ? wmma::__float_to_tf32(v - h) : 0.0f;
  }
}

// acc[j] += A · B over the kTile depth of two shared fp32 tiles, on tf32 tensor cores:
// A[m][k] = a.v[m][k] (ALayout row_major) or a.v[k][m] (col_major), B[k][n] = b.v[k][n]
// (already tf32 values), for this warp's fragments (rows fragment_row(), columns
// fragment_col(j)). kSplitA runs A as hi + lo (two products): with B exact in tf32, the
// result is as accurate as an fp32 product (the backward of fp16 / bf16 inputs).
template <typename ALayout, bool kSplitA>
PROTOSEG_DEVICE void accumulate_product(const FloatTile& a, const FloatTile& b, Accumulator (&acc)[kWarpFragments]) {
  using AFragment = wmma::fragment<wmma::matrix_a, kFragment, kFragment, kTf32Depth, wmma::precision::tf32, ALayout>;
  constexpr bool a_by_row = std::is_same_v<ALayout, wmma::row_major>;
#pragma unroll 1
  for (int kk = 0; kk < kTile; kk += kTf32Depth) {
    AFragment hi, lo;
    wmma::load_matrix_sync(hi, a_by_row ? &a.v[fragment_row()][kk] : &a.v[kk][fragment_row()], kTileLd);
    split_to_tf32(hi, lo, kSplitA);
#pragma unroll
    for (int j = 0; j < kWarpFragments; ++j) {
      wmma::fragment<wmma::matrix_b, kFragment, kFragment, kTf32Depth, wmma::precision::tf32, wmma::row_major> fb;
      wmma::load_matrix_sync(fb, &b.v[kk][fragment_col(j)], kTileLd);
      wmma::mma_sync(acc[j], hi, fb, acc[j]);
      if constexpr (kSplitA) wmma::mma_sync(acc[j], lo, fb, acc[j]);
    }
  }
}

// tile.v[r][c] = this warp's accumulators (row-major).
PROTOSEG_DEVICE void store_accumulators(const Accumulator (&acc)[kWarpFragments], FloatTile& tile) {
#pragma unroll
  for (int j = 0; j < kWarpFragments; ++j) {
    wmma::store_matrix_sync(&tile.v[fragment_row()][fragment_col(j)], acc[j], kTileLd, wmma::mem_row_major);
  }
}

// tile.v[r][c] = src[first + r, k0 + c] as tf32 (exact for fp16 / bf16 elements), zero
// outside the [count, d] matrix: the second operand of the backward products, unscaled
// (the inverse norms are folded into dS, which keeps this operand exact).
template <typename scalar_t, typename acc_t>
PROTOSEG_DEVICE void stage_rows_tf32(const Vectors<scalar_t, acc_t>& src, int64_t d, int64_t first, int64_t k0,
                                     FloatTile& tile) {
  for (int e = threadIdx.x; e < kTile * kTile; e += kThreads) {
    const int r = e / kTile;
    const int c = e % kTile;
    const int64_t row = first + r;
    const int64_t col = k0 + c;
    tile.v[r][c] = (row < src.count && col < d) ? wmma::__float_to_tf32(to_acc(src.data[row * d + col])) : 0.0f;
  }
}

}  // namespace protoseg::cuda::tc
