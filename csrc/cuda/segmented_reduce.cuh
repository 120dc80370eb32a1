// Deterministic segmented reductions: out[g, w] = ⊕_{i : key_i = g} value(i, g, w) for
// keys in [0, G) (-1 or out-of-range keys are skipped), ⊕ a sum or a log-sum-exp,
// w < W columns. Used for the Sinkhorn marginals ([C, K] over pixels by class) and the
// prototype sums ([C·K, D] over pixels by prototype). No floating-point atomics: the
// order of every sum is a function of the keys alone, so results are bitwise
// reproducible.
//
// 1. KeyOrder (key_order.h): the pixels stably sorted by key.
// 2. run_partials_kernel: the sorted positions are cut into chunks of kChunk; a block
//    folds each run (a maximal stretch of one key inside a chunk) in position order.
// 3. combine_runs_kernel: one block per key folds its runs in position order.
// A run starts either at a chunk boundary (slot = chunk index) or where its key's
// segment starts inside a chunk (slot = chunks + key), so the partials need
// (N / kChunk + G) rows, not N.
#pragma once

#include "cuda/host.h"
#include "cuda/key_order.h"

namespace protoseg::cuda {

constexpr int kChunk = 256;  // sorted positions folded per block
// The fold evaluates its source in the loop (an fp64 exp for the Sinkhorn marginals),
// which needs more than the 64 registers of the other small kernels.
constexpr int kRunPartialsBlocksPerSm = 2;

// ---- reductions --------------------------------------------------------------------

template <typename acc_t>
struct SumReduction {
  acc_t value = acc_t(0);
  PROTOSEG_DEVICE void add(acc_t v) { value += v; }
  PROTOSEG_DEVICE void merge(const SumReduction& other) { value += other.value; }
};

template <typename acc_t>
using LogSumExpReduction = OnlineLogSumExp<acc_t>;

// ---- 2. run partials ---------------------------------------------------------------

PROTOSEG_DEVICE int64_t run_slot(int64_t position, int64_t key, int64_t chunks) {
  return position % kChunk == 0 ? position / kChunk : chunks + key;
}

// Source concept: acc_t operator()(int64_t pixel, int64_t key, int64_t column) const.
template <typename Reduction, typename Source>
__global__ void __launch_bounds__(kChunk, kRunPartialsBlocksPerSm)
    run_partials_kernel(const int64_t* perm, const int64_t* sorted_key, const int64_t* starts, int64_t groups,
                        int64_t chunks, int64_t columns, Source source, Reduction* partial) {
  __shared__ int64_t chunk_pixels[kChunk];
  __shared__ int64_t chunk_keys[kChunk];
  const int64_t first = int64_t(blockIdx.x) * kChunk;
  const int64_t valid = starts[groups];
  if (first >= valid) return;  // uniform over the block
  const int length = valid - first < kChunk ? int(valid - first) : kChunk;
  for (int q = threadIdx.x; q < length; q += blockDim.x) {
    chunk_pixels[q] = perm[first + q];
    chunk_keys[q] = sorted_key[first + q];
  }
  __syncthreads();
  for (int64_t w = threadIdx.x; w < columns; w += blockDim.x) {
    Reduction state;
    int64_t run_start = 0;
    for (int q = 0; q < length; ++q) {
      if (q > 0 && chunk_keys[q] != chunk_keys[q - 1]) {
        partial[run_slot(first + run_start, chunk_keys[run_start], chunks) * columns + w] = state;
        state = Reduction();
        run_start = q;
      }
      state.add(source(chunk_pixels[q], chunk_keys[q], w));
    }
    partial[run_slot(first + run_start, chunk_keys[run_start], chunks) * columns + w] = state;
  }
}

// ---- 3. combine ----------------------------------------------------------------------

// Writer concept: void operator()(int64_t key, int64_t column, const Reduction&) const.
template <typename Reduction, typename Writer>
__global__ void __launch_bounds__(kChunk, kSmallKernelBlocksPerSm)
    combine_runs_kernel(const int64_t* starts, int64_t chunks, int64_t columns, const Reduction* partial,
                        Writer writer) {
  const int64_t key = blockIdx.x;
  const int64_t begin = starts[key];
  const int64_t end = starts[key + 1];
  for (int64_t w = threadIdx.x; w < columns; w += blockDim.x) {
    Reduction state;
    if (begin < end) state.merge(partial[run_slot(begin, key, chunks) * columns + w]);
    for (int64_t boundary = (begin / kChunk + 1) * kChunk; boundary < end; boundary += kChunk) {
      state.merge(partial[(boundary / kChunk) * columns + w]);
    }
    writer(key, w, state);
  }
}

// Runs 2 and 3 over an existing order: writer(g, w, ⊕ value) for every g < G, w < W
// (empty segments give the identity of the reduction).
template <typename Reduction, typename Source, typename Writer>
void segmented_reduce(const KeyOrder& order, int64_t n, int64_t groups, int64_t columns, const Source& source,
                      const Writer& writer, const at::TensorOptions& options, cudaStream_t stream) {
  static_assert(sizeof(Reduction) % sizeof(float) == 0, "partials are stored as a float tensor");
  const int64_t chunks = ceil_div(n, kChunk);
  const int64_t words = int64_t(sizeof(Reduction) / sizeof(float));
  at::Tensor partial = at::empty({(chunks + groups) * columns * words}, options.dtype(at::kFloat));
  auto* partial_data = reinterpret_cast<Reduction*>(partial.mutable_data_ptr<float>());
  const int threads = columns < kChunk ? int(ceil_div(columns, kWarpSize) * kWarpSize) : kChunk;
  PROTOSEG_LAUNCH((run_partials_kernel<Reduction, Source>), grid_for(n, kChunk), dim3(threads), stream,
                  data<int64_t>(order.perm), data<int64_t>(order.sorted_key), data<int64_t>(order.starts), groups,
                  chunks, columns, source, partial_data);
  PROTOSEG_LAUNCH((combine_runs_kernel<Reduction, Writer>), grid_for(groups, 1), dim3(threads), stream,
                  data<int64_t>(order.starts), chunks, columns, partial_data, writer);
}

}  // namespace protoseg::cuda
