// A small CUDA program run through the host emulation of csrc/emulation, by
// test_cuda_backend.py: a block reduction through shared memory and __syncthreads,
// warp shuffles (down, up, broadcast), a ballot and atomics; then a divergent barrier
// and an invalid launch, which must be reported as errors; then half-precision
// rounding. Prints `name value...` lines that the test compares with Python.
#include <cstdio>
#include <stdexcept>
#include <vector>

#include "cuda/portable.cuh"

namespace {

constexpr int kThreads = 128;
constexpr unsigned int kAll = 0xffffffffu;

__global__ void block_reduce_kernel(const int* values, int n, int* block_sums, int* warp_scan, int* lane0,
                                    int* positives, int* total, int* maximum) {
  __shared__ int partial[kThreads];
  const int t = threadIdx.x;
  const int i = blockIdx.x * kThreads + t;
  const int v = i < n ? values[i] : 0;
  partial[t] = v;
  __syncthreads();
  for (int stride = kThreads / 2; stride >= 32; stride /= 2) {
    if (t < stride) partial[t] += partial[t + stride];
    __syncthreads();
  }
  if (t < 32) {  // one whole warp finishes with shuffles
    int sum = partial[t];
    for (int offset = 16; offset > 0; offset /= 2) sum += __shfl_down_sync(kAll, sum, offset);
    if (t == 0) {
      block_sums[blockIdx.x] = sum;
      atomicAdd(total, sum);
    }
  }
  int scan = v;
  for (int offset = 1; offset < 32; offset *= 2) {
    const int below = __shfl_up_sync(kAll, scan, offset);
    if (t % 32 >= offset) scan += below;
  }
  const int first = __shfl_sync(kAll, v, 0);
  const unsigned int ballot = __ballot_sync(kAll, v > 0);
  if (i < n) {
    warp_scan[i] = scan;
    lane0[i] = first;
  }
  if (t % 32 == 0) atomicAdd(positives, __popc(ballot));
  atomicMax(maximum, v);
}

// Only the first warp reaches the barrier: undefined on a GPU, an error here.
__global__ void divergent_barrier_kernel(int* out) {
  if (threadIdx.x < 32) __syncthreads();
  out[threadIdx.x] = 1;
}

void print_ints(const char* name, const std::vector<int>& values) {
  std::printf("%s", name);
  for (int v : values) std::printf(" %d", v);
  std::printf("\n");
}

}  // namespace

int main() {
  const int n = 1000;
  const int blocks = (n + kThreads - 1) / kThreads;
  std::vector<int> values(n), block_sums(blocks), warp_scan(n), lane0(n);
  for (int i = 0; i < n; ++i) values[i] = (i * 37) % 201 - 100;
  int positives = 0, total = 0, maximum = -1000;
  PROTOSEG_LAUNCH(block_reduce_kernel, dim3(blocks), dim3(kThreads), nullptr, values.data(), n, block_sums.data(),
                  warp_scan.data(), lane0.data(), &positives, &total, &maximum);
  print_ints("block_sums", block_sums);
  print_ints("warp_scan", warp_scan);
  print_ints("lane0", lane0);
  print_ints("totals", {total, positives, maximum});

  std::vector<int> out(kThreads);
  try {
    PROTOSEG_LAUNCH(divergent_barrier_kernel, dim3(2), dim3(kThreads), nullptr, out.data());
    std::printf("divergent_barrier no error\n");
  } catch (const std::runtime_error& error) {
    std::printf("divergent_barrier error: %s\n", error.what());
  }
  try {
    PROTOSEG_LAUNCH(divergent_barrier_kernel, dim3(1), dim3(2048), nullptr, out.data());
    std::printf("oversized_block no error\n");
  } catch (const std::invalid_argument& error) {
    std::printf("oversized_block error: %s\n", error.what());
  }

  const float samples[] = {1.0f, 0.1f, -3.14159265f, 65504.0f, 70000.0f, 1e-7f, 6.0e-8f, 1.00048828125f, 1.0009765625f,
                           -0.0f, 3.0e38f, 1.00390625f, 1.01171875f};
  std::vector<int> half_bits, bfloat_bits;
  for (float f : samples) {
    half_bits.push_back(__float2half_rn(f).bits);
    bfloat_bits.push_back(__float2bfloat16_rn(f).bits);
  }
  print_ints("half_bits", half_bits);
  print_ints("bfloat16_bits", bfloat_bits);
  return 0;
}
