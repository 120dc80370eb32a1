// class_scores (docs/spec.md §3.2): per-class max (first argmax) or τ·log-sum-exp over the K
// prototypes of each class, and optionally the log-sum-exp over all C·K prototypes at
// temperature τ', all from one similarity GEMM per tile. Backward recomputes the tile,
// forms dS in place and needs one more GEMM for dx (two more with dP).
//
// The prepared prototypes are in PrototypeMajor order: a pixel's S row is K contiguous
// vectors over the classes, so every per-class reduction over k is element-wise. The
// epilogue and the gradient functor read whole S rows: the sweeps run with all columns
// in one block (the engine's default).
#include <cmath>
#include <vector>

#include "cpu/checks.h"
#include "cpu/kernels.h"
#include "cpu/similarity_tiles.h"

namespace protoseg::cpu {
namespace {

constexpr const char* kForward = "protoseg_kernels::class_scores_forward";
constexpr const char* kBackward = "protoseg_kernels::class_scores_backward";

bool is_max_reduction(const char* kernel, c10::string_view reduction) {
  TORCH_CHECK(reduction == "max" || reduction == "logsumexp", kernel,
              ": reduction must be 'max' or 'logsumexp', got '", std::string(reduction), "'");
  return reduction == "max";
}

// Per-class statistics of one pixel's S row: best[c] = max_k S[k, c], arg[c] its first
// argmax, and (for the log-sum-exp reduction) sum[c] = Σ_k exp((S[k, c] − best[c])/τ).
template <typename acc_t>
struct ClassStats {
  int64_t classes, per_class;
  std::vector<acc_t> best, sum;
  std::vector<int32_t> arg;

  ClassStats(int64_t c, int64_t k) : classes(c), per_class(k), best(c), sum(c), arg(c) {}

  void max_over_prototypes(const acc_t* s) {
    std::copy(s, s + classes, best.begin());
    std::fill(arg.begin(), arg.end(), 0);
    for (int64_t k = 1; k < per_class; ++k) {
      const acc_t* v = s + k * classes;
      for (int64_t c = 0; c < classes; ++c) {
        const bool take = replaces_max(v[c], best[c]);  // the first maximum; the first NaN
        best[c] = take ? v[c] : best[c];
        arg[c] = take ? static_cast<int32_t>(k) : arg[c];
      }
    }
  }

  // Needs max_over_prototypes first.
  void shifted_sums(const acc_t* s, acc_t inv_temperature) {
    std::fill(sum.begin(), sum.end(), acc_t(0));
    for (int64_t k = 0; k < per_class; ++k) {
      const acc_t* v = s + k * classes;
      for (int64_t c = 0; c < classes; ++c) sum[c] += vexp((v[c] - lse_shift(best[c])) * inv_temperature);
    }
  }
};

struct ScoreOptions {
  bool max_reduction;
  double temperature;
  std::optional<double> lse_temperature;
};

// Forward epilogue: per pixel, the class scores, their argmax and (with lse_temperature)
// the log-sum-exp over all C·K, from the pixel's whole S row.
template <typename scalar_t, typename acc_t>
struct ClassScoresEpilogue {
  using State = ClassStats<acc_t>;
  scalar_t* scores = nullptr;  // [N, C]
  int64_t* index = nullptr;    // [N, C]
  acc_t* lse = nullptr;        // [N] or null
  bool max_reduction = true;
  acc_t tau = 1, inv_tau = 1, inv_lse_tau = 1;
  int64_t classes = 0, per_class = 0;

  State make_state(const TileShape&) const { return State(classes, per_class); }
  void begin_rows(State&, int64_t, int64_t) const {}
  void end_rows(State&, int64_t, int64_t) const {}

  void operator()(State& stats, const Tile<acc_t>& tile) const {
    const int64_t m = tile.columns;
    for (int64_t i = 0; i < tile.rows; ++i) {
      const acc_t* s = tile.row(i);
      const int64_t pixel = tile.row_begin + i;
      stats.max_over_prototypes(s);
      scalar_t* row_scores = scores + pixel * classes;
      int64_t* row_index = index + pixel * classes;
      if (max_reduction) {
        for (int64_t c = 0; c < classes; ++c) row_scores[c] = static_cast<scalar_t>(stats.best[c]);
      } else {
        stats.shifted_sums(s, inv_tau);
        for (int64_t c = 0; c < classes; ++c) {
          row_scores[c] = static_cast<scalar_t>(stats.best[c] + tau * std::log(stats.sum[c]));
        }
      }
      for (int64_t c = 0; c < classes; ++c) row_index[c] = stats.arg[c];
      if (lse != nullptr) {
        const acc_t top = lane_max(stats.best.data(), classes);  // the max over all C·K
        lse[pixel] = top * inv_lse_tau + std::log(sum_exp(s, m, lse_shift(top), inv_lse_tau));
      }
    }
  }
};

template <typename scalar_t, typename acc_t>
void class_scores_forward_impl(const at::Tensor& x, const at::Tensor& prototypes, bool normalize,
                               const ScoreOptions& opt, at::Tensor& scores, at::Tensor& index,
                               at::Tensor& lse) {
  const auto cols = prepare_prototypes<scalar_t, acc_t>(prototypes, normalize, ClassGrouping::PrototypeMajor);
  ClassScoresEpilogue<scalar_t, acc_t> epilogue;
  epilogue.scores = scores.data_ptr<scalar_t>();
  epilogue.index = index.data_ptr<int64_t>();
  epilogue.lse = opt.lse_temperature ? lse.data_ptr<acc_t>() : nullptr;
  epilogue.max_reduction = opt.max_reduction;
  epilogue.tau = static_cast<acc_t>(opt.temperature);
  epilogue.inv_tau = acc_t(1) / epilogue.tau;
  epilogue.inv_lse_tau = opt.lse_temperature ? acc_t(1) / static_cast<acc_t>(*opt.lse_temperature) : acc_t(0);
  epilogue.classes = cols.order.classes;
  epilogue.per_class = cols.order.per_class;
  similarity_sweep<scalar_t, acc_t>(x, cols, SweepOptions{normalize}, epilogue);
}

// Turns a tile of S into dS, in place. Per pixel i, class c, prototype k:
//   dS = g_lse_i·softmax_j(S_i/τ')/τ'          with lse_temperature and a gradient for lse
//      + g_ic·exp((S − best_ic)/τ)/sum_ic      logsumexp reduction (softmax over k)
//      + g_ic·[k = index_ic]                   max reduction
// Both softmaxes are recomputed from the tile (see scaled_softmax); the saved lse is not
// needed.
template <typename acc_t>
struct ClassScoresGrad {
  const acc_t* grad_scores = nullptr;  // [N, C] or null
  const acc_t* grad_lse = nullptr;     // [N] or null
  const int64_t* index = nullptr;      // [N, C] (max reduction)
  bool max_reduction = true;
  acc_t inv_tau = 1, inv_lse_tau = 1;
  int64_t classes = 0, per_class = 0;

  bool soft_term() const { return grad_scores != nullptr && !max_reduction; }
  bool lse_term() const { return grad_lse != nullptr; }

  struct State {
    ClassStats<acc_t> stats;
    std::vector<acc_t> weight;    // [C]: g_ic / sum_ic
    std::vector<acc_t> lse_part;  // [M]: the lse term, when the soft term still needs S
  };

  State make_state(const TileShape& shape) const {
    return State{ClassStats<acc_t>(classes, per_class), std::vector<acc_t>(classes),
                 std::vector<acc_t>(soft_term() && lse_term() ? shape.total_columns : 0)};
  }

  void operator()(State& state, const Tile<acc_t>& tile) const {
    const int64_t m = tile.columns;
    const bool soft_term = this->soft_term(), lse_term = this->lse_term();
    ClassStats<acc_t>& stats = state.stats;
    std::vector<acc_t>& weight = state.weight;
    std::vector<acc_t>& lse_part = state.lse_part;
    for (int64_t i = 0; i < tile.rows; ++i) {
      acc_t* s = tile.row(i);
      const int64_t pixel = tile.row_begin + i;
      const acc_t* g = grad_scores == nullptr ? nullptr : grad_scores + pixel * classes;
      if (soft_term) {
        stats.max_over_prototypes(s);
        stats.shifted_sums(s, inv_tau);
        for (int64_t c = 0; c < classes; ++c) weight[c] = g[c] / stats.sum[c];
      }
      if (lse_term) {  // in place, unless the soft term still needs S
        scaled_softmax(s, soft_term ? lse_part.data() : s, m, inv_lse_tau, grad_lse[pixel] * inv_lse_tau);
      }
      if (soft_term) {
        add_soft_term(s, stats.best.data(), weight.data(), lse_term ? lse_part.data() : nullptr);
      } else if (!lse_term) {
        std::fill(s, s + m, acc_t(0));
      }
      if (g != nullptr && max_reduction) {
        const int64_t* row_index = index + pixel * classes;
        for (int64_t c = 0; c < classes; ++c) {
          // The index comes from the forward pass; checked anyway, never trusted as an address.
          if (index_in_range(row_index[c], per_class)) s[row_index[c] * classes + c] += g[c];
        }
      }
    }
  }

  // s[k, c] = w[c]·exp((s[k, c] − best[c])/τ) (+ base[k, c] when given).
  void add_soft_term(acc_t* s, const acc_t* best, const acc_t* w, const acc_t* base) const {
    for (int64_t k = 0; k < per_class; ++k) {
      acc_t* v = s + k * classes;
      if (base != nullptr) {
        const acc_t* b = base + k * classes;
        for (int64_t c = 0; c < classes; ++c) v[c] = b[c] + w[c] * vexp((v[c] - best[c]) * inv_tau);
      } else {
        for (int64_t c = 0; c < classes; ++c) v[c] = w[c] * vexp((v[c] - best[c]) * inv_tau);
      }
    }
  }
};

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> class_scores_forward(
    const at::Tensor& x_in, const at::Tensor& prototypes_in, bool normalize, c10::string_view reduction,
    double temperature, std::optional<double> lse_temperature) {
  at::Tensor x = x_in, prototypes = prototypes_in;
  check_features_and_prototypes(kForward, x, prototypes);
  const ScoreOptions opt{is_max_reduction(kForward, reduction), temperature, lse_temperature};
  const int64_t n = x.size(0), classes = prototypes.size(0);
  at::Tensor scores = at::empty({n, classes}, x.options());
  at::Tensor index = at::empty({n, classes}, x.options().dtype(at::kLong));
  at::Tensor lse = at::empty({lse_temperature ? n : 0}, x.options().dtype(compute_dtype(x.scalar_type())));
  PROTOSEG_DISPATCH_FLOATING(x.scalar_type(), kForward, [&] {
    class_scores_forward_impl<scalar_t, acc_t>(x, prototypes, normalize, opt, scores, index, lse);
  });
  return {scores, index, lse};
}

std::tuple<at::Tensor, at::Tensor> class_scores_backward(
    const std::optional<at::Tensor>& grad_scores, const std::optional<at::Tensor>& grad_lse,
    const at::Tensor& x_in, const at::Tensor& prototypes_in, const at::Tensor& index_in,
    const at::Tensor& /*lse: recomputed*/, bool normalize, c10::string_view reduction, double temperature,
    std::optional<double> lse_temperature, bool need_prototype_grad) {
  at::Tensor x = x_in, prototypes = prototypes_in;
  check_features_and_prototypes(kBackward, x, prototypes);
  const bool max_reduction = is_max_reduction(kBackward, reduction);
  const int64_t n = x.size(0), classes = prototypes.size(0);
  const auto acc_dtype = compute_dtype(x.scalar_type());
  at::Tensor g_scores, g_lse, index;
  if (grad_scores.has_value() && grad_scores->defined()) {
    g_scores = checked_values(kBackward, "grad_scores", *grad_scores, n * classes, acc_dtype);
    if (max_reduction) {
      TORCH_CHECK(index_in.numel() == n * classes, kBackward, ": index must be [N, C] = [", n, ", ",
                  classes, "], got ", index_in.sizes());
      index = checked_index(kBackward, "index", index_in.reshape(-1), n * classes);
    }
  }
  if (lse_temperature.has_value() && grad_lse.has_value() && grad_lse->defined()) {
    g_lse = checked_values(kBackward, "grad_lse", *grad_lse, n, acc_dtype);
  }
  std::tuple<at::Tensor, at::Tensor> result;
  PROTOSEG_DISPATCH_FLOATING(x.scalar_type(), kBackward, [&] {
    const auto cols = prepare_prototypes<scalar_t, acc_t>(prototypes, normalize, ClassGrouping::PrototypeMajor);
    ClassScoresGrad<acc_t> fill;
    fill.grad_scores = g_scores.defined() ? g_scores.const_data_ptr<acc_t>() : nullptr;
    fill.grad_lse = g_lse.defined() ? g_lse.const_data_ptr<acc_t>() : nullptr;
    fill.index = index.defined() ? index.const_data_ptr<int64_t>() : nullptr;
    fill.max_reduction = max_reduction;
    fill.inv_tau = acc_t(1) / static_cast<acc_t>(temperature);
    fill.inv_lse_tau = lse_temperature ? acc_t(1) / static_cast<acc_t>(*lse_temperature) : acc_t(1);
    fill.classes = classes;
    fill.per_class = prototypes.size(1);
    BackwardOptions options;
    options.normalize_rows = normalize;
    // The max reduction alone needs no similarities: dS is g scattered to the argmax.
    options.recompute = fill.lse_term() || fill.soft_term();
    options.need_column_grad = need_prototype_grad;
    result = similarity_backward_sweep<scalar_t, acc_t>(x, cols, options, fill);
  });
  return result;
}

}  // namespace protoseg::cpu

PROTOSEG_CPU_KERNELS(m) {
  using namespace protoseg::cpu;
  PROTOSEG_KERNEL(m, class_scores_forward);
  PROTOSEG_KERNEL(m, class_scores_backward);
}
