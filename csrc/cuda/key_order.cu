// The stable counting sort of key_order.h.
#include "cuda/host.h"
#include "cuda/key_order.h"
#include "cuda/warp_reduce.cuh"

namespace protoseg::cuda {
namespace {

constexpr int kSortTile = 256;  // pixels ranked per block
constexpr int kScanThreads = 256;

// rank[i] = number of earlier pixels of i's tile with i's key; tile_counts[tile][g] =
// number of pixels with key g in the tile (written by the first of them; the rest of
// the matrix was zero-filled).
__global__ void __launch_bounds__(kSortTile, kSmallKernelBlocksPerSm)
    tile_rank_kernel(const int64_t* keys, int64_t n, int64_t groups, int32_t* rank, int32_t* tile_counts) {
  __shared__ int64_t tile_keys[kSortTile];
  const int t = threadIdx.x;
  const int64_t i = global_thread_x();
  int64_t key = -1;
  if (i < n && index_in_range(keys[i], groups)) key = keys[i];
  tile_keys[t] = key;
  __syncthreads();
  if (key < 0) return;
  int32_t before = 0, total = 0;
  for (int q = 0; q < kSortTile; ++q) {
    if (tile_keys[q] != key) continue;
    before += q < t;
    ++total;
  }
  rank[i] = before;
  if (before == 0) tile_counts[int64_t(blockIdx.x) * groups + key] = total;
}

// In place: tile_counts[tile][g] becomes the number of key-g pixels in earlier tiles;
// counts[g] = number of key-g pixels. One thread per key.
__global__ void __launch_bounds__(kScanThreads, kSmallKernelBlocksPerSm)
    key_prefix_kernel(int32_t* tile_counts, int64_t tiles, int64_t groups, int64_t* counts) {
  const int64_t g = global_thread_x();
  if (g >= groups) return;
  int64_t running = 0;
  for (int64_t tile = 0; tile < tiles; ++tile) {
    int32_t* cell = tile_counts + tile * groups + g;
    const int32_t here = *cell;
    *cell = static_cast<int32_t>(running);
    running += here;
  }
  counts[g] = running;
}

// starts[g] = Σ_{g' < g} counts[g'] for g <= groups (starts[groups] = valid pixels).
// One block; chunks of kScanThreads keys carry their total to the next.
__global__ void __launch_bounds__(kScanThreads, kSmallKernelBlocksPerSm)
    exclusive_scan_kernel(const int64_t* counts, int64_t groups, int64_t* starts) {
  constexpr int kWarps = kScanThreads / kWarpSize;
  __shared__ int64_t warp_totals[kWarps];
  const int warp = warp_index();
  int64_t carry = 0;
  for (int64_t base = 0; base < groups; base += kScanThreads) {
    const int64_t g = base + threadIdx.x;
    const int64_t value = g < groups ? counts[g] : 0;
    const int64_t inclusive = warp_inclusive_scan(value);
    if (lane_index() == kWarpSize - 1) warp_totals[warp] = inclusive;
    __syncthreads();
    int64_t before_warp = 0, block_total = 0;
    for (int w = 0; w < kWarps; ++w) {
      before_warp += w < warp ? warp_totals[w] : 0;
      block_total += warp_totals[w];
    }
    if (g < groups) starts[g] = carry + before_warp + inclusive - value;
    carry += block_total;
    __syncthreads();  // warp_totals is rewritten by the next chunk
  }
  if (threadIdx.x == 0) starts[groups] = carry;
}

// perm[p] = pixel at sorted position p, sorted_key[p] = its key.
__global__ void __launch_bounds__(kSortTile, kSmallKernelBlocksPerSm)
    scatter_kernel(const int64_t* keys, int64_t n, int64_t groups, const int32_t* rank, const int32_t* tile_offsets,
                   const int64_t* starts, int64_t* perm, int64_t* sorted_key) {
  const int64_t i = global_thread_x();
  if (i >= n || !index_in_range(keys[i], groups)) return;
  const int64_t key = keys[i];
  const int64_t tile = i / kSortTile;
  const int64_t position = starts[key] + tile_offsets[tile * groups + key] + rank[i];
  if (position < 0 || position >= n) return;  // cannot happen; never write out of bounds
  perm[position] = i;
  sorted_key[position] = key;
}

}  // namespace

KeyOrder sort_by_key(const at::Tensor& keys, int64_t groups, cudaStream_t stream) {
  const int64_t n = keys.size(0);
  TORCH_CHECK(n < std::numeric_limits<int32_t>::max(), "protoseg cuda: at most 2^31 - 1 pixels per call, got ", n);
  const int64_t tiles = ceil_div(n, kSortTile);
  const at::TensorOptions int64_options = keys.options().dtype(at::kLong);
  const at::TensorOptions int32_options = keys.options().dtype(at::kInt);
  KeyOrder order{at::empty({n}, int64_options), at::empty({n}, int64_options), at::empty({groups + 1}, int64_options),
                 at::empty({groups}, int64_options)};
  at::Tensor rank = at::empty({n}, int32_options);
  at::Tensor tile_counts = at::zeros({tiles, groups}, int32_options);
  const int64_t* key_data = data<int64_t>(keys);
  PROTOSEG_LAUNCH(tile_rank_kernel, grid_for(n, kSortTile), dim3(kSortTile), stream, key_data, n, groups,
                  mutable_data<int32_t>(rank), mutable_data<int32_t>(tile_counts));
  PROTOSEG_LAUNCH(key_prefix_kernel, grid_for(groups, kScanThreads), dim3(kScanThreads), stream,
                  mutable_data<int32_t>(tile_counts), tiles, groups, mutable_data<int64_t>(order.counts));
  PROTOSEG_LAUNCH(exclusive_scan_kernel, dim3(1), dim3(kScanThreads), stream, data<int64_t>(order.counts), groups,
                  mutable_data<int64_t>(order.starts));
  PROTOSEG_LAUNCH(scatter_kernel, grid_for(n, kSortTile), dim3(kSortTile), stream, key_data, n, groups,
                  data<int32_t>(rank), data<int32_t>(tile_counts), data<int64_t>(order.starts),
                  mutable_data<int64_t>(order.perm), mutable_data<int64_t>(order.sorted_key));
  return order;
}

}  // namespace protoseg::cuda
