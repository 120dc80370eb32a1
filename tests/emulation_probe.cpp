// A small CUDA program run through the host emulation of csrc/emulation, by
// test_cuda_backend.py: a block reduction through shared memory and __syncthreads,
// warp shuffles (down, up, broadcast), a ballot and atomics; then a divergent barrier
// and an invalid launch, which must be reported as errors; then half-precision
// rounding; then the warp matrix functions (nvcuda::wmma): a 32×32 product of two
// warps in fp16, bf16 and tf32, a misaligned fragment pointer and a warp whose lanes
// do not all call mma_sync (both errors). Prints `name value...` lines that the test
// compares with Python.
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

namespace wmma = nvcuda::wmma;
constexpr int kSide = 32;  // the product: [32, 32] = [32, 32] · [32, 32], one 16 × 32 half per warp

// c = a · b with a row-major, b column-major, for fragment element T (k = K per mma).
template <typename T, typename Storage, int K>
__global__ void wmma_product_kernel(const Storage* a, const Storage* b, float* c) {
  const int warp = threadIdx.x / 32;
  for (int j = 0; j < kSide / 16; ++j) {
    wmma::fragment<wmma::accumulator, 16, 16, K, float> acc;
    wmma::fill_fragment(acc, 0.0f);
    for (int k = 0; k < kSide; k += K) {
      wmma::fragment<wmma::matrix_a, 16, 16, K, T, wmma::row_major> fa;
      wmma::fragment<wmma::matrix_b, 16, 16, K, T, wmma::col_major> fb;
      wmma::load_matrix_sync(fa, a + 16 * warp * kSide + k, kSide);
      wmma::load_matrix_sync(fb, b + 16 * j * kSide + k, kSide);
      wmma::mma_sync(acc, fa, fb, acc);
    }
    wmma::store_matrix_sync(c + 16 * warp * kSide + 16 * j, acc, kSide, wmma::mem_row_major);
  }
}

__global__ void wmma_misaligned_kernel(const float* a, float* c) {
  wmma::fragment<wmma::accumulator, 16, 16, 8, float> acc;
  wmma::load_matrix_sync(acc, a + 1, 16, wmma::mem_row_major);  // 4 bytes past a 32-byte boundary
  wmma::store_matrix_sync(c, acc, 16, wmma::mem_row_major);
}

// Lane 0 skips the product: undefined on a GPU, an error here.
__global__ void wmma_divergent_kernel(const float* a, float* c) {
  wmma::fragment<wmma::accumulator, 16, 16, 8, float> acc;
  wmma::fill_fragment(acc, 0.0f);
  if (threadIdx.x != 0) {
    wmma::fragment<wmma::matrix_a, 16, 16, 8, wmma::precision::tf32, wmma::row_major> fa;
    wmma::fragment<wmma::matrix_b, 16, 16, 8, wmma::precision::tf32, wmma::col_major> fb;
    wmma::load_matrix_sync(fa, a, 16);
    wmma::load_matrix_sync(fb, a, 16);
    wmma::mma_sync(acc, fa, fb, acc);
  }
  wmma::store_matrix_sync(c, acc, 16, wmma::mem_row_major);
}

void print_floats(const char* name, const std::vector<float>& values) {
  std::printf("%s", name);
  for (float v : values) std::printf(" %.9g", v);
  std::printf("\n");
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

  // Operands: a[i][k] = ((7i + 3k) mod 23 - 11) / 8 and b (column-major) b[j][k] =
  // ((5j + 11k) mod 19 - 9) / 16 + 2^-12 (exact in bf16 only without the 2^-12 term,
  // which tf32 truncation must drop when not rounded: the test knows).
  std::vector<float> a(kSide * kSide), b(kSide * kSide);
  for (int i = 0; i < kSide; ++i)
    for (int k = 0; k < kSide; ++k) {
      a[i * kSide + k] = float((7 * i + 3 * k) % 23 - 11) / 8.0f;
      b[i * kSide + k] = float((5 * i + 11 * k) % 19 - 9) / 16.0f + 1.0f / 4096.0f;
    }
  alignas(32) static __half a_half[kSide * kSide], b_half[kSide * kSide];
  alignas(32) static __nv_bfloat16 a_bf16[kSide * kSide], b_bf16[kSide * kSide];
  alignas(32) static float a_tf32[kSide * kSide], b_tf32[kSide * kSide], b_raw[kSide * kSide], c[kSide * kSide];
  for (int e = 0; e < kSide * kSide; ++e) {
    a_half[e] = __float2half_rn(a[e]);
    b_half[e] = __float2half_rn(b[e]);
    a_bf16[e] = __float2bfloat16_rn(a[e]);
    b_bf16[e] = __float2bfloat16_rn(b[e]);
    a_tf32[e] = wmma::__float_to_tf32(a[e]);
    b_tf32[e] = wmma::__float_to_tf32(b[e]);
    b_raw[e] = b[e];
  }
  PROTOSEG_LAUNCH((wmma_product_kernel<__half, __half, 16>), dim3(1), dim3(64), nullptr, a_half, b_half, c);
  print_floats("wmma_fp16", std::vector<float>(c, c + kSide * kSide));
  PROTOSEG_LAUNCH((wmma_product_kernel<__nv_bfloat16, __nv_bfloat16, 16>), dim3(1), dim3(64), nullptr, a_bf16, b_bf16,
                  c);
  print_floats("wmma_bf16", std::vector<float>(c, c + kSide * kSide));
  PROTOSEG_LAUNCH((wmma_product_kernel<wmma::precision::tf32, float, 8>), dim3(1), dim3(64), nullptr, a_tf32, b_tf32,
                  c);
  print_floats("wmma_tf32", std::vector<float>(c, c + kSide * kSide));
  PROTOSEG_LAUNCH((wmma_product_kernel<wmma::precision::tf32, float, 8>), dim3(1), dim3(64), nullptr, a_tf32, b_raw,
                  c);
  print_floats("wmma_tf32_unrounded", std::vector<float>(c, c + kSide * kSide));
  print_floats("tf32_rounding", {wmma::__float_to_tf32(1.0f + 1.0f / 4096.0f), wmma::__float_to_tf32(1.0f + 1.0f / 2048.0f),
                                 wmma::__float_to_tf32(-(1.0f + 3.0f / 4096.0f))});
  try {
    PROTOSEG_LAUNCH(wmma_misaligned_kernel, dim3(1), dim3(32), nullptr, a_tf32, c);
    std::printf("wmma_misaligned no error\n");
  } catch (const std::runtime_error& error) {
    std::printf("wmma_misaligned error: %s\n", error.what());
  }
  try {
    PROTOSEG_LAUNCH(wmma_divergent_kernel, dim3(1), dim3(32), nullptr, a_tf32, c);
    std::printf("wmma_divergent no error\n");
  } catch (const std::runtime_error& error) {
    std::printf("wmma_divergent error: %s\n", error.what());
  }
  return 0;
}
