// The stage kernels of sinkhorn_assign's β recurrence (docs/spec.md §3.4), orchestrated by
// protoseg_kernels/sinkhorn_assign.py:
//   logits     L_i = S[i, c_i, :]/ε, each pixel against its own class's K prototypes
//   class lse  per class and prototype: max_i L_ik and Σ_i exp(L_ik − max)
//   marginals  u_ck = Σ_{i ∈ c} softmax_k(L_i + β_c)
//   finalize   argmax_k and softmax_k of L_i + β_c
// The per-class sums are deterministic segmented reductions (segmented_reduce.cuh).
#include "cuda/kernels.h"
#include "cuda/row_norms.cuh"
#include "cuda/segmented_reduce.cuh"
#include "cuda/similarity_tile.cuh"

namespace protoseg::cuda {
namespace {

constexpr int kPixelThreads = 256;  // one thread per pixel

// One warp per pixel: K dot products with the prototypes of the pixel's class.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kRowThreads, kSmallKernelBlocksPerSm)
    logits_kernel(SimilarityOperands<scalar_t, acc_t> ops, const int64_t* segment, int64_t classes,
                  int64_t per_class, acc_t epsilon, acc_t* logits) {
  const int64_t i = global_warp_index();
  if (i >= ops.rows.count) return;  // uniform over the warp
  acc_t* out = logits + i * per_class;
  const int64_t cls = segment[i];
  if (!index_in_range(cls, classes)) {
    for (int64_t k = lane_index(); k < per_class; k += kWarpSize) out[k] = acc_t(0);
    return;
  }
  const scalar_t* x_row = ops.rows.data + i * ops.d;
  const acc_t sx = ops.rows.scale(i);
  for (int64_t k = 0; k < per_class; ++k) {
    const int64_t j = cls * per_class + k;
    const scalar_t* p_row = ops.columns.data + j * ops.d;
    acc_t dot = acc_t(0);
    for (int64_t f = lane_index(); f < ops.d; f += kWarpSize) dot += to_acc(x_row[f]) * to_acc(p_row[f]);
    dot = warp_sum(dot);
    const acc_t sp = ops.columns.scale(j);
    if (lane_index() == 0) out[k] = dot * sx * sp / epsilon;
  }
}

// The row of L_i + β_c as a callable of k.
template <typename acc_t>
struct ShiftedRow {
  const acc_t* logits;
  const acc_t* beta;
  PROTOSEG_DEVICE acc_t operator()(int64_t k) const { return logits[k] + beta[k]; }
};

// row_lse[i] = log Σ_k exp(L_ik + β_ck) for pixels of a class (unused elsewhere).
template <typename acc_t>
__global__ void __launch_bounds__(kPixelThreads, kSmallKernelBlocksPerSm)
    row_logsumexp_kernel(const acc_t* logits, const int64_t* segment, const acc_t* beta, int64_t n, int64_t classes,
                         int64_t per_class, acc_t* row_lse) {
  const int64_t i = global_thread_x();
  if (i >= n || !index_in_range(segment[i], classes)) return;
  const ShiftedRow<acc_t> z{logits + i * per_class, beta + segment[i] * per_class};
  row_lse[i] = row_logsumexp_argmax<acc_t>(z, per_class).lse;
}

template <typename acc_t>
__global__ void __launch_bounds__(kPixelThreads, kSmallKernelBlocksPerSm)
    finalize_kernel(const acc_t* logits, const int64_t* segment, const acc_t* beta, int64_t n, int64_t classes,
                    int64_t per_class, int64_t* index, acc_t* q) {
  const int64_t i = global_thread_x();
  if (i >= n) return;
  acc_t* q_row = q ? q + i * per_class : nullptr;
  if (!index_in_range(segment[i], classes)) {
    index[i] = -1;
    if (q_row) {
      for (int64_t k = 0; k < per_class; ++k) q_row[k] = acc_t(0);
    }
    return;
  }
  const acc_t* logit_row = logits + i * per_class;
  const acc_t* beta_row = beta + segment[i] * per_class;
  auto logit = [&](int64_t k) { return logit_row[k]; };
  auto shift = [&](int64_t k) { return beta_row[k]; };
  auto store = [&](int64_t k, acc_t probability) {
    if (q_row) q_row[k] = probability;
  };
  index[i] = sinkhorn_pixel_step<acc_t>(logit, shift, per_class, store);
}

// Segmented-reduction sources (value of pixel p, key g, column k) and writers.
template <typename acc_t>
struct LogitSource {
  const acc_t* logits;
  int64_t per_class;
  PROTOSEG_DEVICE acc_t operator()(int64_t p, int64_t, int64_t k) const { return logits[p * per_class + k]; }
};

template <typename acc_t>
struct SoftmaxSource {
  const acc_t* logits;
  const acc_t* beta;
  const acc_t* row_lse;
  int64_t per_class;
  PROTOSEG_DEVICE acc_t operator()(int64_t p, int64_t cls, int64_t k) const {
    return exp(logits[p * per_class + k] + beta[cls * per_class + k] - row_lse[p]);
  }
};

template <typename acc_t>
struct LogSumExpWriter {
  acc_t* max;  // [C, K]
  acc_t* sum;  // [C, K]
  int64_t per_class;
  PROTOSEG_DEVICE void operator()(int64_t cls, int64_t k, const LogSumExpReduction<acc_t>& state) const {
    max[cls * per_class + k] = state.max;
    sum[cls * per_class + k] = state.sum;
  }
};

template <typename acc_t>
struct SumWriter {
  acc_t* out;  // [G, W]
  int64_t columns;
  PROTOSEG_DEVICE void operator()(int64_t g, int64_t w, const SumReduction<acc_t>& state) const {
    out[g * columns + w] = state.value;
  }
};

// logits [N, K] in float32/float64 and segment [N] int64.
void check_logits(const char* kernel, const at::Tensor& logits, const at::Tensor& segment) {
  check_device(kernel, "logits", logits);
  check_rank(kernel, "logits", logits, 2);
  TORCH_CHECK(logits.scalar_type() == at::kFloat || logits.scalar_type() == at::kDouble, kernel,
              ": logits must be float32 or float64, got ", logits.scalar_type());
  check_tensor(kernel, "segment", segment, {logits.size(0)}, at::kLong, logits);
}

void check_beta(const char* kernel, const at::Tensor& beta, const at::Tensor& logits) {
  check_rank(kernel, "beta", beta, 2);
  TORCH_CHECK(beta.size(0) > 0, kernel, ": beta must have C > 0 rows");
  check_tensor(kernel, "beta", beta, {beta.size(0), logits.size(1)}, logits.scalar_type(), logits);
}

}  // namespace

at::Tensor sinkhorn_logits(const at::Tensor& x_arg, const at::Tensor& prototypes_arg, const at::Tensor& segment_arg,
                           bool normalize, double epsilon) {
  constexpr const char* kKernel = "sinkhorn_logits";
  check_features(kKernel, x_arg, prototypes_arg);
  check_tensor(kKernel, "segment", segment_arg, {x_arg.size(0)}, at::kLong, x_arg);
  TORCH_CHECK(epsilon > 0, kKernel, ": epsilon must be positive, got ", epsilon);
  const at::Tensor x = x_arg.contiguous();
  const at::Tensor prototypes = prototypes_arg.contiguous();
  const at::Tensor segment = segment_arg.contiguous();
  const LaunchScope scope(x);
  const int64_t n = x.size(0), classes = prototypes.size(0), per_class = prototypes.size(1);
  at::Tensor logits = at::empty({n, per_class}, x.options().dtype(accumulate_dtype(x.scalar_type())));
  dispatch_floating(x.scalar_type(), kKernel, [&](auto tag) {
    using scalar_t = typename decltype(tag)::type;
    using acc_t = acc_type<scalar_t>;
    const auto prepared = prepare_operands<scalar_t, acc_t>(x, prototypes, normalize, scope.stream());
    PROTOSEG_LAUNCH((logits_kernel<scalar_t, acc_t>), grid_for(n, kRowsPerBlock), dim3(kRowThreads),
                    scope.stream(), prepared.ops, data<int64_t>(segment), classes, per_class, acc_t(epsilon),
                    mutable_data<acc_t>(logits));
  });
  return logits;
}

TensorPair sinkhorn_class_logsumexp(const at::Tensor& logits_arg, const at::Tensor& segment_arg,
                                    int64_t num_classes) {
  constexpr const char* kKernel = "sinkhorn_class_logsumexp";
  check_logits(kKernel, logits_arg, segment_arg);
  TORCH_CHECK(num_classes > 0, kKernel, ": num_classes must be positive, got ", num_classes);
  const at::Tensor logits = logits_arg.contiguous();
  const at::Tensor segment = segment_arg.contiguous();
  const LaunchScope scope(logits);
  const int64_t n = logits.size(0), per_class = logits.size(1);
  at::Tensor max = at::empty({num_classes, per_class}, logits.options());
  at::Tensor sum = at::empty({num_classes, per_class}, logits.options());
  dispatch_accumulate(logits.scalar_type(), kKernel, [&](auto tag) {
    using acc_t = typename decltype(tag)::type;
    const KeyOrder order = sort_by_key(segment, num_classes, scope.stream());
    segmented_reduce<LogSumExpReduction<acc_t>>(
        order, n, num_classes, per_class, LogitSource<acc_t>{data<acc_t>(logits), per_class},
        LogSumExpWriter<acc_t>{mutable_data<acc_t>(max), mutable_data<acc_t>(sum), per_class}, logits.options(),
        scope.stream());
  });
  return {max, sum};
}

at::Tensor sinkhorn_marginals(const at::Tensor& logits_arg, const at::Tensor& segment_arg, const at::Tensor& beta_arg) {
  constexpr const char* kKernel = "sinkhorn_marginals";
  check_logits(kKernel, logits_arg, segment_arg);
  check_beta(kKernel, beta_arg, logits_arg);
  const at::Tensor logits = logits_arg.contiguous();
  const at::Tensor segment = segment_arg.contiguous();
  const at::Tensor beta = beta_arg.contiguous();
  const LaunchScope scope(logits);
  const int64_t n = logits.size(0), per_class = logits.size(1), classes = beta.size(0);
  at::Tensor marginals = at::empty({classes, per_class}, logits.options());
  at::Tensor row_lse = at::empty({n}, logits.options());
  dispatch_accumulate(logits.scalar_type(), kKernel, [&](auto tag) {
    using acc_t = typename decltype(tag)::type;
    PROTOSEG_LAUNCH(row_logsumexp_kernel<acc_t>, grid_for(n, kPixelThreads), dim3(kPixelThreads), scope.stream(),
                    data<acc_t>(logits), data<int64_t>(segment), data<acc_t>(beta), n, classes, per_class,
                    mutable_data<acc_t>(row_lse));
    const KeyOrder order = sort_by_key(segment, classes, scope.stream());
    const SoftmaxSource<acc_t> source{data<acc_t>(logits), data<acc_t>(beta), data<acc_t>(row_lse), per_class};
    segmented_reduce<SumReduction<acc_t>>(order, n, classes, per_class, source,
                                          SumWriter<acc_t>{mutable_data<acc_t>(marginals), per_class},
                                          logits.options(), scope.stream());
  });
  return marginals;
}

TensorPair sinkhorn_finalize(const at::Tensor& logits_arg, const at::Tensor& segment_arg, const at::Tensor& beta_arg,
                             bool return_q) {
  constexpr const char* kKernel = "sinkhorn_finalize";
  check_logits(kKernel, logits_arg, segment_arg);
  check_beta(kKernel, beta_arg, logits_arg);
  const at::Tensor logits = logits_arg.contiguous();
  const at::Tensor segment = segment_arg.contiguous();
  const at::Tensor beta = beta_arg.contiguous();
  const LaunchScope scope(logits);
  const int64_t n = logits.size(0), per_class = logits.size(1);
  at::Tensor index = at::empty({n}, segment.options());
  at::Tensor q = return_q ? at::empty({n, per_class}, logits.options()) : at::empty({0}, logits.options());
  dispatch_accumulate(logits.scalar_type(), kKernel, [&](auto tag) {
    using acc_t = typename decltype(tag)::type;
    PROTOSEG_LAUNCH(finalize_kernel<acc_t>, grid_for(n, kPixelThreads), dim3(kPixelThreads), scope.stream(),
                    data<acc_t>(logits), data<int64_t>(segment), data<acc_t>(beta), n, beta.size(0), per_class,
                    mutable_data<int64_t>(index), return_q ? mutable_data<acc_t>(q) : nullptr);
  });
  return {index, q};
}

}  // namespace protoseg::cuda

PROTOSEG_CUDA_KERNELS(m) {
  using namespace protoseg::cuda;
  PROTOSEG_KERNEL(m, sinkhorn_logits);
  PROTOSEG_KERNEL(m, sinkhorn_class_logsumexp);
  PROTOSEG_KERNEL(m, sinkhorn_marginals);
  PROTOSEG_KERNEL(m, sinkhorn_finalize);
}
