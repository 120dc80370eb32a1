// Forward passes that reduce each pixel's C·K similarities (class scores, PPC/PPD):
// a block owns kTile pixels and sweeps over all prototypes in tiles of kTile, like
// the key loop of FlashAttention. Each similarity tile goes through shared memory to
// one thread per pixel, which feeds the tile's columns in prototype order to a
// per-pixel Visitor kept in registers across tiles. Nothing of size N·C·K exists.
//
// Visitor concept:
//   struct Visitor {
//     struct Params;                               // kernel argument (outputs, options)
//     Visitor(const Params&, int64_t row);         // row < 0: the thread owns no pixel
//     void visit(acc_t s);                         // S[row, j] for j = 0, 1, ... in order
//     void finish();                               // after the last prototype
//   };
#pragma once

#include "cuda/similarity_tile.cuh"

namespace protoseg::cuda {

template <typename scalar_t, typename acc_t, typename Visitor>
__global__ void __launch_bounds__(kTileThreads, kTileBlocksPerSm)
    similarity_sweep_kernel(SimilarityOperands<scalar_t, acc_t> ops, typename Visitor::Params params) {
  constexpr int kTile = TileConfig<acc_t>::kTile;
  __shared__ DepthSlices<acc_t> slices;
  __shared__ SharedTile<acc_t> tile;

  const int local_row = threadIdx.x;
  const int64_t row0 = int64_t(blockIdx.x) * kTile;
  const bool owns_row = local_row < kTile && row0 + local_row < ops.n;
  Visitor visitor(params, owns_row ? row0 + local_row : int64_t(-1));

  for (int64_t col0 = 0; col0 < ops.m; col0 += kTile) {
    MicroTile<acc_t> acc;
    similarity_micro_tile(ops, row0, col0, slices, acc);
    store_micro_tile(acc, tile);
    __syncthreads();
    if (owns_row) {
      const int64_t remaining = ops.m - col0;
      const int cols = remaining < kTile ? int(remaining) : kTile;
      for (int c = 0; c < cols; ++c) visitor.visit(tile[local_row][c]);
    }
    __syncthreads();  // the tile is read before the next sweep step overwrites it
  }
  if (owns_row) visitor.finish();
}

// Runs the sweep of Visitor over every pixel of x.
template <typename scalar_t, typename acc_t, typename Visitor>
void launch_similarity_sweep(const SimilarityOperands<scalar_t, acc_t>& ops, const typename Visitor::Params& params,
                             cudaStream_t stream) {
  PROTOSEG_LAUNCH((similarity_sweep_kernel<scalar_t, acc_t, Visitor>), grid_for(ops.n, TileConfig<acc_t>::kTile),
                  dim3(kTileThreads), stream, ops, params);
}

}  // namespace protoseg::cuda
