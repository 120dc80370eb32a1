// A block's tile of the similarity S in shared memory, on either math (tile_math.cuh):
// the FMA micro tiles of similarity_tile.cuh or the wmma fragments of
// tensor_core_tile.cuh. The forward kernels of the engine (the sweep, the plain
// similarity) are written once against it:
//
//   using Tiles = BlockSimilarity<scalar_t, acc_t, math, layout>;
//   __shared__ typename Tiles::Storage storage;
//   Tiles::compute(ops, row0, col0, storage);   // every thread; ends with a barrier
//   acc_t s = Tiles::at(storage, r, c);          // S[row0 + r, col0 + c]
//
// `layout` is how the threads will read the tile: mem_col_major when each thread owns a
// row and walks its columns (the sweep), mem_row_major when consecutive threads take
// consecutive columns of a row (writing S out). The FMA tile's padding serves both.
#pragma once

#include "cuda/similarity_tile.cuh"
#include "cuda/tensor_core_tile.cuh"
#include "cuda/tile_math.cuh"

namespace protoseg::cuda {

template <typename scalar_t, typename acc_t, TileMath math, nvcuda::wmma::layout_t layout>
struct BlockSimilarity;

template <typename scalar_t, typename acc_t, nvcuda::wmma::layout_t layout>
struct BlockSimilarity<scalar_t, acc_t, TileMath::kFma, layout> {
  static constexpr int kTile = TileConfig<acc_t>::kTile;
  struct Storage {
    DepthSlices<acc_t> slices;
    SharedTile<acc_t> tile;
  };

  PROTOSEG_DEVICE static void compute(const SimilarityOperands<scalar_t, acc_t>& ops, int64_t row0, int64_t col0,
                                      Storage& storage) {
    MicroTile<acc_t> acc;
    similarity_micro_tile(ops, row0, col0, storage.slices, acc);
    store_micro_tile(acc, storage.tile);
    __syncthreads();
  }

  PROTOSEG_DEVICE static acc_t at(const Storage& storage, int r, int c) { return storage.tile[r][c]; }
};

template <typename scalar_t, typename acc_t, nvcuda::wmma::layout_t layout>
struct BlockSimilarity<scalar_t, acc_t, TileMath::kTensorCore, layout> {
  static constexpr int kTile = tc::kTile;
  static_assert(tc::kTile == TileConfig<acc_t>::kTile, "grids are sized by TileConfig whatever the math");
  struct Storage {
    tc::Slices<scalar_t> slices;
    tc::FloatTile tile;
  };

  PROTOSEG_DEVICE static void compute(const SimilarityOperands<scalar_t, acc_t>& ops, int64_t row0, int64_t col0,
                                      Storage& storage) {
    tc::similarity_tile(ops, row0, col0, storage.slices, storage.tile, layout);
  }

  PROTOSEG_DEVICE static acc_t at(const Storage& storage, int r, int c) {
    return layout == nvcuda::wmma::mem_row_major ? storage.tile.v[r][c] : storage.tile.v[c][r];
  }
};

}  // namespace protoseg::cuda
