// The forward sweep of the column engine, for ops that reduce each row's M similarities
// to a few values per row (class scores, PPC/PPD; a label-masked log-sum-exp over a
// memory bank, docs/spec.md §10): a block owns kTile rows and sweeps over all columns in tiles
// of kTile, like the key loop of FlashAttention. Each similarity tile goes through
// shared memory (on tensor cores or FMA units: similarity_block.cuh) to one thread per
// row, which feeds the tile's columns in column order
// to a per-row Visitor kept in registers across tiles. Nothing of size N·M exists.
//
// Visitor concept (the op's side; the engine never looks inside Params):
//   struct Visitor {
//     struct Params;                          // kernel argument: outputs, saved inputs
//                                             // (row labels, ...), options; one struct
//     Visitor(const Params&, int64_t row);    // row < 0: the thread owns no row, and
//                                             // no other member is called
//     void visit(Column column, acc_t s);     // s = S[row, column.index], called for
//                                             // column.index = 0, 1, ..., M − 1 in order,
//                                             // column.label its label (or kUnlabelled)
//     void finish();                          // after the last column
//   };
// The visit order is fixed, so a visitor's online reductions are bitwise reproducible.
// An op with a class grouping (prototypes: K per class) keeps it in its Params; a
// label-driven op reads its row's label in the constructor and compares it with
// column.label in visit. Two-pass statistics (e.g. the positives' terms of docs/spec.md §10,
// which need the negatives' sum first) are two sweeps with two visitors.
#pragma once

#include "cuda/similarity_block.cuh"

namespace protoseg::cuda {

template <typename scalar_t, typename acc_t, typename Visitor, TileMath math>
__global__ void __launch_bounds__(kTileThreads, kTileBlocksPerSm)
    similarity_sweep_kernel(SimilarityOperands<scalar_t, acc_t> ops, typename Visitor::Params params) {
  // One thread per row walks the tile's columns: a column-major tile keeps its reads conflict-free.
  using Tiles = BlockSimilarity<scalar_t, acc_t, math, nvcuda::wmma::mem_col_major>;
  constexpr int kTile = Tiles::kTile;
  __shared__ typename Tiles::Storage storage;

  const int local_row = threadIdx.x;
  const int64_t row0 = int64_t(blockIdx.x) * kTile;
  const bool owns_row = local_row < kTile && row0 + local_row < ops.rows.count;
  Visitor visitor(params, owns_row ? row0 + local_row : int64_t(-1));

  for (int64_t col0 = 0; col0 < ops.columns.count; col0 += kTile) {
    Tiles::compute(ops, row0, col0, storage);
    if (owns_row) {
      const int64_t remaining = ops.columns.count - col0;
      const int cols = remaining < kTile ? int(remaining) : kTile;
      for (int c = 0; c < cols; ++c) visitor.visit(ops.column(col0 + c), Tiles::at(storage, local_row, c));
    }
    __syncthreads();  // the tile is read before the next sweep step overwrites it
  }
  if (owns_row) visitor.finish();
}

// Runs the sweep of Visitor over every row of the operands, on the math of ops.
template <typename scalar_t, typename acc_t, typename Visitor>
void launch_similarity_sweep(const SimilarityOperands<scalar_t, acc_t>& ops, const typename Visitor::Params& params,
                             cudaStream_t stream) {
  with_tile_math<scalar_t>(ops.math, [&](auto math) {
    PROTOSEG_LAUNCH((similarity_sweep_kernel<scalar_t, acc_t, Visitor, decltype(math)::value>),
                    grid_for(ops.rows.count, TileConfig<acc_t>::kTile), dim3(kTileThreads), stream, ops, params);
  });
}

}  // namespace protoseg::cuda
