// ppc_ppd_loss, per pixel: lse_i = log Σ_j exp(S_ij/τ) over all C·K prototypes (an
// online log-sum-exp over the prototype sweep), ppc_i = lse_i − S_it/τ,
// ppd_i = (1 − S_it)², zero where the target is ignored. Backward recomputes S tile by
// tile, as Cut Cross-Entropy does. On the column engine the prototypes are M = C·K
// unlabelled columns and the target is a flat column index.
#include "cuda/kernels.h"
#include "cuda/similarity_backward.cuh"
#include "cuda/similarity_sweep.cuh"

namespace protoseg::cuda {
namespace {

constexpr const char* kForward = "ppc_ppd_forward";
constexpr const char* kBackward = "ppc_ppd_backward";

template <typename acc_t>
struct PpcPpdVisitor {
  struct Params {
    const int64_t* target;  // [n] flat prototype or -1
    acc_t* ppc;             // [n]
    acc_t* ppd;             // [n]
    acc_t* lse;             // [n]
    int64_t m;
    acc_t inverse_temperature;
  };

  PROTOSEG_DEVICE PpcPpdVisitor(const Params& params, int64_t row)
      : p(params), row(row), target(row >= 0 ? params.target[row] : -1) {}

  PROTOSEG_DEVICE void visit(Column column, acc_t s) {
    all.add(s * p.inverse_temperature);
    if (column.index == target) s_target = s;
  }

  PROTOSEG_DEVICE void finish() {
    const acc_t lse = all.value();
    const bool valid = index_in_range(target, p.m);
    p.lse[row] = lse;
    p.ppc[row] = valid ? lse - s_target * p.inverse_temperature : acc_t(0);
    p.ppd[row] = valid ? (acc_t(1) - s_target) * (acc_t(1) - s_target) : acc_t(0);
  }

 private:
  const Params& p;
  int64_t row;
  int64_t target;
  acc_t s_target = acc_t(0);
  OnlineLogSumExp<acc_t> all;
};

// dS_ij = g_ppc_i·(softmax_j(S_i/τ) − [j = t_i])/τ − 2·g_ppd_i·(1 − S_it)·[j = t_i] on
// valid pixels, 0 elsewhere.
template <typename acc_t>
struct PpcPpdGradient {
  struct Params {
    const acc_t* grad_ppc;  // [n] or null
    const acc_t* grad_ppd;  // [n] or null
    const int64_t* target;  // [n]
    const acc_t* lse;       // [n]
    int64_t m;
    acc_t inverse_temperature;
  };

  PROTOSEG_DEVICE explicit PpcPpdGradient(const Params& params) : p(params) {}

  PROTOSEG_DEVICE bool needs_similarity() const { return p.grad_ppc != nullptr || p.grad_ppd != nullptr; }

  PROTOSEG_DEVICE acc_t operator()(int64_t row, Column column, acc_t s) const {
    const int64_t t = p.target[row];
    if (!index_in_range(t, p.m)) return acc_t(0);
    const bool is_target = column.index == t;
    acc_t g = acc_t(0);
    if (p.grad_ppc) {
      const acc_t upstream = p.grad_ppc[row];
      g += upstream * exp(s * p.inverse_temperature - p.lse[row]) * p.inverse_temperature;
      if (is_target) g -= upstream * p.inverse_temperature;
    }
    if (p.grad_ppd && is_target) g -= acc_t(2) * p.grad_ppd[row] * (acc_t(1) - s);
    return g;
  }

 private:
  const Params& p;
};

void check_target(const char* kernel, const at::Tensor& target, const at::Tensor& x) {
  check_tensor(kernel, "target", target, {x.size(0)}, at::kLong, x);
}

void check_temperature(const char* kernel, double temperature) {
  TORCH_CHECK(temperature > 0, kernel, ": temperature must be positive, got ", temperature);
}

}  // namespace

TensorTriple ppc_ppd_forward(const at::Tensor& x_arg, const at::Tensor& prototypes_arg, const at::Tensor& target_arg,
                             bool normalize, double temperature) {
  check_features(kForward, x_arg, prototypes_arg);
  check_target(kForward, target_arg, x_arg);
  check_temperature(kForward, temperature);
  const at::Tensor x = x_arg.contiguous();
  const at::Tensor prototypes = prototypes_arg.contiguous();
  const at::Tensor target = target_arg.contiguous();
  const LaunchScope scope(x);
  const int64_t n = x.size(0);
  const at::TensorOptions acc_options = x.options().dtype(accumulate_dtype(x.scalar_type()));
  at::Tensor ppc = at::empty({n}, acc_options);
  at::Tensor ppd = at::empty({n}, acc_options);
  at::Tensor lse = at::empty({n}, acc_options);
  dispatch_floating(x.scalar_type(), kForward, [&](auto tag) {
    using scalar_t = typename decltype(tag)::type;
    using acc_t = acc_type<scalar_t>;
    const auto prepared = prepare_operands<scalar_t, acc_t>(x, prototypes, normalize, scope.stream());
    typename PpcPpdVisitor<acc_t>::Params params{};
    params.target = data<int64_t>(target);
    params.ppc = mutable_data<acc_t>(ppc);
    params.ppd = mutable_data<acc_t>(ppd);
    params.lse = mutable_data<acc_t>(lse);
    params.m = prepared.ops.columns.count;
    params.inverse_temperature = acc_t(1.0 / temperature);
    launch_similarity_sweep<scalar_t, acc_t, PpcPpdVisitor<acc_t>>(prepared.ops, params, scope.stream());
  });
  return {ppc, ppd, lse};
}

TensorPair ppc_ppd_backward(const OptionalTensor& grad_ppc_arg, const OptionalTensor& grad_ppd_arg,
                            const at::Tensor& x_arg, const at::Tensor& prototypes_arg, const at::Tensor& target_arg,
                            const at::Tensor& lse_arg, bool normalize, double temperature, bool need_prototype_grad) {
  check_features(kBackward, x_arg, prototypes_arg);
  check_target(kBackward, target_arg, x_arg);
  check_temperature(kBackward, temperature);
  const at::Tensor x = x_arg.contiguous();
  const at::Tensor prototypes = prototypes_arg.contiguous();
  const at::Tensor target = target_arg.contiguous();
  const int64_t n = x.size(0);
  const at::ScalarType acc_dtype = accumulate_dtype(x.scalar_type());
  const auto grad_ppc = prepare_grad(kBackward, "grad_ppc", grad_ppc_arg, {n}, acc_dtype, x);
  const auto grad_ppd = prepare_grad(kBackward, "grad_ppd", grad_ppd_arg, {n}, acc_dtype, x);
  at::Tensor lse;
  if (grad_ppc) {
    check_tensor(kBackward, "lse", lse_arg, {n}, acc_dtype, x);
    lse = lse_arg.contiguous();
  }
  const LaunchScope scope(x);
  TensorPair result;
  dispatch_floating(x.scalar_type(), kBackward, [&](auto tag) {
    using scalar_t = typename decltype(tag)::type;
    using acc_t = acc_type<scalar_t>;
    const auto prepared = prepare_operands<scalar_t, acc_t>(x, prototypes, normalize, scope.stream());
    using Rule = PpcPpdGradient<acc_t>;
    typename Rule::Params params{};
    params.grad_ppc = data_or_null<acc_t>(grad_ppc);
    params.grad_ppd = data_or_null<acc_t>(grad_ppd);
    params.target = data<int64_t>(target);
    params.lse = lse.defined() ? data<acc_t>(lse) : nullptr;
    params.m = prepared.ops.columns.count;
    params.inverse_temperature = acc_t(1.0 / temperature);
    result = similarity_backward_from_rule<Rule>(prepared, params, need_prototype_grad, scope.stream());
  });
  return result;
}

}  // namespace protoseg::cuda

PROTOSEG_CUDA_KERNELS(m) {
  using namespace protoseg::cuda;
  PROTOSEG_KERNEL(m, ppc_ppd_forward);
  PROTOSEG_KERNEL(m, ppc_ppd_backward);
}
