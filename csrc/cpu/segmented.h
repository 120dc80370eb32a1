// Deterministic segmented reductions over pixels into small per-class buffers (Sinkhorn's
// [C, K] sums, maxima and marginals).
//
// Pixels are cut into chunks of a fixed number of rows; each chunk reduces into its own
// partial buffer, and the partials are combined in chunk order. Chunk size is a constant,
// so the summation order depends on N only, never on the thread count.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/full.h>
#include <ATen/Parallel.h>

namespace protoseg::cpu {

constexpr int64_t kSegmentChunkRows = 2048;

// accumulate(row_begin, row_end, partial) adds rows [row_begin, row_end) into `partial`
// (`width` values starting at `identity`); combine(total, partial_value) folds the
// partials, in chunk order, into the result [width] (dtype of `options`).
template <typename acc_t, typename Accumulate, typename Combine>
at::Tensor segmented_reduce(int64_t rows, int64_t width, acc_t identity, const at::TensorOptions& options,
                            const Accumulate& accumulate, const Combine& combine) {
  const int64_t num_chunks = (rows + kSegmentChunkRows - 1) / kSegmentChunkRows;
  at::Tensor partials = at::full({std::max<int64_t>(num_chunks, 1), width}, identity, options);
  acc_t* parts = partials.data_ptr<acc_t>();
  at::parallel_for(0, num_chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t chunk = begin; chunk < end; ++chunk) {
      const int64_t first = chunk * kSegmentChunkRows;
      accumulate(first, std::min(rows, first + kSegmentChunkRows), parts + chunk * width);
    }
  });
  at::Tensor result = at::full({width}, identity, options);
  acc_t* total = result.data_ptr<acc_t>();
  for (int64_t chunk = 0; chunk < num_chunks; ++chunk) {
    for (int64_t j = 0; j < width; ++j) total[j] = combine(total[j], parts[chunk * width + j]);
  }
  return result;
}

}  // namespace protoseg::cpu
