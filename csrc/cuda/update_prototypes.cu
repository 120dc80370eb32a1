// The stage kernels of update_prototypes (docs/spec.md §3.5), orchestrated by
// protoseg_kernels/update_prototypes.py:
//   prototype_sums   s_j = Σ_{i: key_i = j} x̂_i and n_j, a deterministic segmented sum
//                    (pixels sorted by prototype, runs folded in a fixed order)
//   momentum_update  P_j ← normalize(γ·P̂_j + (1 − γ)·normalize(s_j)) where n_j > 0
#include "cuda/kernels.h"
#include "cuda/row_norms.cuh"
#include "cuda/segmented_reduce.cuh"

namespace protoseg::cuda {
namespace {

// x̂[p, w] (or x[p, w] when not normalising).
template <typename scalar_t, typename acc_t>
struct NormalizedRowSource {
  const scalar_t* x;
  const acc_t* inverse_norm;  // [n] or null
  int64_t d;
  PROTOSEG_DEVICE acc_t operator()(int64_t p, int64_t, int64_t w) const {
    const acc_t v = to_acc(x[p * d + w]);
    return inverse_norm ? v * inverse_norm[p] : v;
  }
};

template <typename acc_t>
struct RowSumWriter {
  acc_t* sums;  // [m, d]
  int64_t d;
  PROTOSEG_DEVICE void operator()(int64_t j, int64_t w, const SumReduction<acc_t>& state) const {
    sums[j * d + w] = state.value;
  }
};

// One warp per prototype row.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kRowThreads, kSmallKernelBlocksPerSm)
    momentum_kernel(const scalar_t* prototypes, const acc_t* sums, const int64_t* counts, int64_t m, int64_t d,
                    acc_t momentum, bool normalize, scalar_t* updated) {
  const int64_t j = global_warp_index();
  if (j >= m) return;  // uniform over the warp
  const scalar_t* p_row = prototypes + j * d;
  const acc_t* s_row = sums + j * d;
  scalar_t* out = updated + j * d;
  const acc_t p_scale = normalize ? inverse_norm(warp_row_sum_squares<acc_t>(p_row, d)) : acc_t(1);
  if (counts[j] <= 0) {
    for (int64_t k = lane_index(); k < d; k += kWarpSize) out[k] = from_acc<scalar_t>(to_acc(p_row[k]) * p_scale);
    return;
  }
  const acc_t s_scale = inverse_norm(warp_row_sum_squares<acc_t>(s_row, d));
  auto blended = [&](int64_t k) { return momentum_blend(to_acc(p_row[k]) * p_scale, s_row[k], s_scale, momentum); };
  acc_t sum_sq = acc_t(0);
  for (int64_t k = lane_index(); k < d; k += kWarpSize) {
    const acc_t b = blended(k);
    sum_sq += b * b;
  }
  const acc_t out_scale = inverse_norm(warp_sum(sum_sq));
  for (int64_t k = lane_index(); k < d; k += kWarpSize) out[k] = from_acc<scalar_t>(blended(k) * out_scale);
}

}  // namespace

TensorPair prototype_sums(const at::Tensor& x_arg, const at::Tensor& key_arg, int64_t num_prototypes, bool normalize) {
  constexpr const char* kKernel = "prototype_sums";
  check_device(kKernel, "x", x_arg);
  check_rank(kKernel, "x", x_arg, 2);
  check_tensor(kKernel, "key", key_arg, {x_arg.size(0)}, at::kLong, x_arg);
  TORCH_CHECK(num_prototypes > 0, kKernel, ": num_prototypes must be positive, got ", num_prototypes);
  const at::Tensor x = x_arg.contiguous();
  const at::Tensor key = key_arg.contiguous();
  const LaunchScope scope(x);
  const int64_t n = x.size(0), d = x.size(1);
  const at::TensorOptions acc_options = x.options().dtype(accumulate_dtype(x.scalar_type()));
  at::Tensor sums = at::empty({num_prototypes, d}, acc_options);
  at::Tensor counts;
  dispatch_floating(x.scalar_type(), kKernel, [&](auto tag) {
    using scalar_t = typename decltype(tag)::type;
    using acc_t = acc_type<scalar_t>;
    const at::Tensor inverse = inverse_norms<scalar_t, acc_t>(x, n, d, normalize, scope.stream());
    const KeyOrder order = sort_by_key(key, num_prototypes, scope.stream());
    const NormalizedRowSource<scalar_t, acc_t> source{data<scalar_t>(x), data_if_defined<acc_t>(inverse), d};
    segmented_reduce<SumReduction<acc_t>>(order, n, num_prototypes, d, source,
                                          RowSumWriter<acc_t>{mutable_data<acc_t>(sums), d}, acc_options,
                                          scope.stream());
    counts = order.counts;
  });
  return {sums, counts};
}

at::Tensor momentum_update(const at::Tensor& prototypes_arg, const at::Tensor& sums_arg, const at::Tensor& counts_arg,
                           double momentum, bool normalize) {
  constexpr const char* kKernel = "momentum_update";
  check_device(kKernel, "prototypes", prototypes_arg);
  check_rank(kKernel, "prototypes", prototypes_arg, 3);
  const int64_t m = prototypes_arg.size(0) * prototypes_arg.size(1), d = prototypes_arg.size(2);
  const at::ScalarType acc_dtype = accumulate_dtype(prototypes_arg.scalar_type());
  TORCH_CHECK(sums_arg.sizes() == at::IntArrayRef({m, d}), kKernel, ": sums must have shape [C·K, D] = [", m, ", ",
              d, "], got ", sums_arg.sizes());
  TORCH_CHECK(sums_arg.is_floating_point(), kKernel, ": sums must be floating, got ", sums_arg.scalar_type());
  check_tensor(kKernel, "counts", counts_arg, {m}, at::kLong, prototypes_arg);
  TORCH_CHECK(momentum >= 0 && momentum <= 1, kKernel, ": momentum must be in [0, 1], got ", momentum);
  const at::Tensor prototypes = prototypes_arg.contiguous();
  // Sums come in x's accumulation dtype, which may differ from the prototypes' one.
  const at::Tensor sums = sums_arg.to(prototypes.device(), acc_dtype).contiguous();
  const at::Tensor counts = counts_arg.contiguous();
  const LaunchScope scope(prototypes);
  at::Tensor updated = at::empty_like(prototypes);
  dispatch_floating(prototypes.scalar_type(), kKernel, [&](auto tag) {
    using scalar_t = typename decltype(tag)::type;
    using acc_t = acc_type<scalar_t>;
    PROTOSEG_LAUNCH((momentum_kernel<scalar_t, acc_t>), grid_for(m, kRowsPerBlock), dim3(kRowThreads),
                    scope.stream(), data<scalar_t>(prototypes), data<acc_t>(sums), data<int64_t>(counts), m, d,
                    acc_t(momentum), normalize, mutable_data<scalar_t>(updated));
  });
  return updated;
}

}  // namespace protoseg::cuda

PROTOSEG_CUDA_KERNELS(m) {
  using namespace protoseg::cuda;
  PROTOSEG_KERNEL(m, prototype_sums);
  PROTOSEG_KERNEL(m, momentum_update);
}
