// class_scores: per pixel and class, the max over the K prototypes (with the first
// argmax) or τ·log Σ_k exp(S/τ), and optionally lse = log Σ_j exp(S_j/τ') over all C·K
// prototypes, all in one sweep over the prototypes. Backward recomputes S tile by
// tile (only when the rule needs it: the max path without lse routes the gradient
// by the saved index alone). On the column engine, the prototypes are M = C·K
// unlabelled columns; the class grouping K is this op's parameter (per_class).
#include "cuda/kernels.h"
#include "cuda/similarity_backward.cuh"
#include "cuda/similarity_sweep.cuh"

namespace protoseg::cuda {
namespace {

constexpr const char* kForward = "class_scores_forward";
constexpr const char* kBackward = "class_scores_backward";

bool is_soft(c10::string_view reduction, const char* kernel) {
  TORCH_CHECK(reduction == "max" || reduction == "logsumexp", kernel,
              ": reduction must be 'max' or 'logsumexp', got '", reduction, "'");
  return reduction == "logsumexp";
}

// One pixel's reductions, fed its similarities in prototype order (class by class:
// K consecutive columns per class, counted here rather than divided out of the index).
template <typename scalar_t, typename acc_t>
struct ClassScoresVisitor {
  struct Params {
    scalar_t* scores;   // [n, C] or null
    int64_t* index;     // [n, C] first argmax over K, or null
    acc_t* class_lse;   // [n, C] log Σ_k exp(S/τ), or null
    acc_t* lse;         // [n] log Σ_j exp(S_j/τ'), or null
    int64_t classes;
    int64_t per_class;
    bool soft;          // reduction "logsumexp"
    acc_t temperature;
    acc_t inverse_temperature;
    acc_t inverse_lse_temperature;
  };

  PROTOSEG_DEVICE ClassScoresVisitor(const Params& params, int64_t row) : p(params), row(row) {}

  PROTOSEG_DEVICE void visit(Column, acc_t s) {
    if (slot == 0 || replaces_max(s, best)) {  // the first maximum wins ties; the first NaN
      best = s;
      best_slot = slot;
    }
    if (p.soft) in_class.add(s * p.inverse_temperature);
    if (p.lse) all.add(s * p.inverse_lse_temperature);
    if (++slot == p.per_class) {
      write_class();
      ++cls;
      slot = 0;
    }
  }

  PROTOSEG_DEVICE void finish() {
    if (p.lse) p.lse[row] = all.value();
  }

 private:
  PROTOSEG_DEVICE void write_class() {
    const int64_t at = row * p.classes + cls;
    if (p.index) p.index[at] = best_slot;
    if (p.scores) p.scores[at] = from_acc<scalar_t>(p.soft ? p.temperature * in_class.value() : best);
    if (p.class_lse) p.class_lse[at] = in_class.value();
    in_class = OnlineLogSumExp<acc_t>();
  }

  const Params& p;
  int64_t row;
  int64_t cls = 0;
  int64_t slot = 0;
  acc_t best = acc_t(0);
  int64_t best_slot = 0;
  OnlineLogSumExp<acc_t> in_class;
  OnlineLogSumExp<acc_t> all;
};

// dS_ick = g_ic·[k = index_ic] (max) or g_ic·softmax_k(S_ic/τ) (logsumexp),
// plus g_lse_i·softmax_j(S_i/τ')_ck/τ'.
template <typename scalar_t, typename acc_t>
struct ClassScoresGradient {
  struct Params {
    const scalar_t* grad_scores;  // [n, C] or null
    const acc_t* grad_lse;        // [n] or null
    const int64_t* index;         // [n, C]
    const acc_t* class_lse;       // [n, C] (logsumexp) or null
    const acc_t* lse;             // [n]
    int64_t classes;
    int64_t per_class;
    bool soft;
    acc_t inverse_temperature;
    acc_t inverse_lse_temperature;
  };

  PROTOSEG_DEVICE explicit ClassScoresGradient(const Params& params) : p(params) {}

  PROTOSEG_DEVICE bool needs_similarity() const {
    return p.grad_lse != nullptr || (p.grad_scores != nullptr && p.soft);
  }

  PROTOSEG_DEVICE acc_t operator()(int64_t row, Column column, acc_t s) const {
    acc_t g = acc_t(0);
    if (p.grad_scores) {
      const int64_t cls = column.index / p.per_class;
      const int64_t at = row * p.classes + cls;
      const acc_t upstream = to_acc(p.grad_scores[at]);
      if (p.soft) {
        g += upstream * exp(s * p.inverse_temperature - p.class_lse[at]);
      } else if (p.index[at] == column.index - cls * p.per_class) {
        g += upstream;
      }
    }
    if (p.grad_lse) {
      g += p.grad_lse[row] * exp(s * p.inverse_lse_temperature - p.lse[row]) * p.inverse_lse_temperature;
    }
    return g;
  }

 private:
  const Params& p;
};

template <typename scalar_t, typename acc_t>
typename ClassScoresVisitor<scalar_t, acc_t>::Params visitor_params(const at::Tensor& prototypes, bool soft,
                                                                    double temperature,
                                                                    std::optional<double> lse_temperature) {
  typename ClassScoresVisitor<scalar_t, acc_t>::Params params{};
  params.classes = prototypes.size(0);
  params.per_class = prototypes.size(1);
  params.soft = soft;
  params.temperature = acc_t(temperature);
  params.inverse_temperature = acc_t(1.0 / temperature);
  params.inverse_lse_temperature = lse_temperature ? acc_t(1.0 / *lse_temperature) : acc_t(0);
  return params;
}

void check_temperatures(const char* kernel, double temperature, std::optional<double> lse_temperature) {
  TORCH_CHECK(temperature > 0, kernel, ": temperature must be positive, got ", temperature);
  TORCH_CHECK(!lse_temperature || *lse_temperature > 0, kernel, ": lse_temperature must be positive, got ",
              *lse_temperature);
}

}  // namespace

TensorTriple class_scores_forward(const at::Tensor& x_arg, const at::Tensor& prototypes_arg, bool normalize,
                                  c10::string_view reduction, double temperature,
                                  std::optional<double> lse_temperature) {
  check_features(kForward, x_arg, prototypes_arg);
  check_temperatures(kForward, temperature, lse_temperature);
  const bool soft = is_soft(reduction, kForward);
  const at::Tensor x = x_arg.contiguous();
  const at::Tensor prototypes = prototypes_arg.contiguous();
  const LaunchScope scope(x);
  const int64_t n = x.size(0), classes = prototypes.size(0);
  const at::TensorOptions acc_options = x.options().dtype(accumulate_dtype(x.scalar_type()));
  at::Tensor scores = at::empty({n, classes}, x.options());
  at::Tensor index = at::empty({n, classes}, x.options().dtype(at::kLong));
  at::Tensor lse = at::empty({lse_temperature ? n : 0}, acc_options);
  dispatch_floating(x.scalar_type(), kForward, [&](auto tag) {
    using scalar_t = typename decltype(tag)::type;
    using acc_t = acc_type<scalar_t>;
    using Visitor = ClassScoresVisitor<scalar_t, acc_t>;
    const auto prepared = prepare_operands<scalar_t, acc_t>(x, prototypes, normalize, scope.stream());
    auto params = visitor_params<scalar_t, acc_t>(prototypes, soft, temperature, lse_temperature);
    params.scores = mutable_data<scalar_t>(scores);
    params.index = mutable_data<int64_t>(index);
    params.lse = lse_temperature ? mutable_data<acc_t>(lse) : nullptr;
    launch_similarity_sweep<scalar_t, acc_t, Visitor>(prepared.ops, params, scope.stream());
  });
  return {scores, index, lse};
}

TensorPair class_scores_backward(const OptionalTensor& grad_scores_arg, const OptionalTensor& grad_lse_arg,
                                 const at::Tensor& x_arg, const at::Tensor& prototypes_arg, const at::Tensor& index_arg,
                                 const at::Tensor& lse_arg, bool normalize, c10::string_view reduction,
                                 double temperature, std::optional<double> lse_temperature,
                                 bool need_prototype_grad) {
  check_features(kBackward, x_arg, prototypes_arg);
  check_temperatures(kBackward, temperature, lse_temperature);
  const bool soft = is_soft(reduction, kBackward);
  const at::Tensor x = x_arg.contiguous();
  const at::Tensor prototypes = prototypes_arg.contiguous();
  const int64_t n = x.size(0), classes = prototypes.size(0);
  const at::ScalarType acc_dtype = accumulate_dtype(x.scalar_type());
  const auto grad_scores = prepare_grad(kBackward, "grad_scores", grad_scores_arg, {n, classes}, x.scalar_type(), x);
  const auto grad_lse =
      lse_temperature ? prepare_grad(kBackward, "grad_lse", grad_lse_arg, {n}, acc_dtype, x) : std::nullopt;
  check_tensor(kBackward, "index", index_arg, {n, classes}, at::kLong, x);
  const at::Tensor index = index_arg.contiguous();
  at::Tensor lse;
  if (grad_lse) {
    check_tensor(kBackward, "lse", lse_arg, {n}, acc_dtype, x);
    lse = lse_arg.contiguous();
  }
  const LaunchScope scope(x);
  TensorPair result;
  dispatch_floating(x.scalar_type(), kBackward, [&](auto tag) {
    using scalar_t = typename decltype(tag)::type;
    using acc_t = acc_type<scalar_t>;
    using Visitor = ClassScoresVisitor<scalar_t, acc_t>;
    const auto prepared = prepare_operands<scalar_t, acc_t>(x, prototypes, normalize, scope.stream());
    // The soft weights need each class's log-sum-exp, which the forward did not save:
    // one more sweep (N·C values, no N·C·K).
    at::Tensor class_lse;
    if (soft && grad_scores) {
      class_lse = at::empty({n, classes}, x.options().dtype(acc_dtype));
      auto params = visitor_params<scalar_t, acc_t>(prototypes, soft, temperature, lse_temperature);
      params.class_lse = mutable_data<acc_t>(class_lse);
      launch_similarity_sweep<scalar_t, acc_t, Visitor>(prepared.ops, params, scope.stream());
    }
    using Rule = ClassScoresGradient<scalar_t, acc_t>;
    typename Rule::Params params{};
    params.grad_scores = data_or_null<scalar_t>(grad_scores);
    params.grad_lse = data_or_null<acc_t>(grad_lse);
    params.index = data<int64_t>(index);
    params.class_lse = class_lse.defined() ? data<acc_t>(class_lse) : nullptr;
    params.lse = lse.defined() ? data<acc_t>(lse) : nullptr;
    params.classes = classes;
    params.per_class = prototypes.size(1);
    params.soft = soft;
    params.inverse_temperature = acc_t(1.0 / temperature);
    params.inverse_lse_temperature = lse_temperature ? acc_t(1.0 / *lse_temperature) : acc_t(0);
    result = similarity_backward_from_rule<Rule>(prepared, params, need_prototype_grad, scope.stream());
  });
  return result;
}

}  // namespace protoseg::cuda

PROTOSEG_CUDA_KERNELS(m) {
  using namespace protoseg::cuda;
  PROTOSEG_KERNEL(m, class_scores_forward);
  PROTOSEG_KERNEL(m, class_scores_backward);
}
