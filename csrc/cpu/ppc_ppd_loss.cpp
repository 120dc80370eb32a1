// ppc_ppd_loss (docs/spec.md §3.3), per pixel: ppc_i = lse_i − S_it/τ with lse_i the log-sum-exp
// of S_i/τ over all C·K prototypes, ppd_i = (1 − S_it)². One similarity GEMM per tile
// forward; backward recomputes the tile and forms
//   dS_ij = g_ppc_i·(softmax_j(S_i/τ) − [j = t_i])/τ − 2·g_ppd_i·(1 − S_it)·[j = t_i]
// in place before the dx GEMM (the softmax recomputed from the tile, see scaled_softmax;
// the saved lse is not needed). Both read whole S rows: one column block per sweep.
#include <cmath>

#include "cpu/checks.h"
#include "cpu/kernels.h"
#include "cpu/similarity_tiles.h"

namespace protoseg::cpu {
namespace {

constexpr const char* kForward = "protoseg_kernels::ppc_ppd_forward";
constexpr const char* kBackward = "protoseg_kernels::ppc_ppd_backward";

// Column of the target prototype in a tile row, or -1 for an ignored (or invalid) target.
template <typename acc_t>
int64_t target_column(const PreparedColumns<acc_t>& cols, int64_t target) {
  return index_in_range(target, cols.count) ? cols.order.column_of(target) : -1;
}

// Forward epilogue, per pixel from its whole S row: lse, ppc and ppd.
template <typename acc_t>
struct PpcPpdEpilogue : StatelessClient {
  const PreparedColumns<acc_t>* cols = nullptr;
  const int64_t* target = nullptr;  // [N]
  acc_t* ppc = nullptr;             // [N]
  acc_t* ppd = nullptr;             // [N]
  acc_t* lse = nullptr;             // [N]
  acc_t inv_tau = 1;

  void operator()(NoState&, const Tile<acc_t>& tile) const {
    const int64_t m = tile.columns;
    for (int64_t i = 0; i < tile.rows; ++i) {
      const acc_t* s = tile.row(i);
      const int64_t pixel = tile.row_begin + i;
      const acc_t top = lane_max(s, m);
      const acc_t log_sum = std::log(sum_exp(s, m, lse_shift(top), inv_tau));
      lse[pixel] = top * inv_tau + log_sum;
      const int64_t column = target_column(*cols, target[pixel]);
      if (column < 0) {
        ppc[pixel] = ppd[pixel] = acc_t(0);
        continue;
      }
      const acc_t s_target = s[column];
      // lse − S_t/τ with the shift taken out first: no cancellation of two large terms.
      ppc[pixel] = (top - s_target) * inv_tau + log_sum;
      ppd[pixel] = (acc_t(1) - s_target) * (acc_t(1) - s_target);
    }
  }
};

template <typename scalar_t, typename acc_t>
void ppc_ppd_forward_impl(const at::Tensor& x, const at::Tensor& prototypes, const at::Tensor& target,
                          bool normalize, double temperature, at::Tensor& ppc, at::Tensor& ppd,
                          at::Tensor& lse) {
  const auto cols = prepare_prototypes<scalar_t, acc_t>(prototypes, normalize, ClassGrouping::ClassMajor);
  PpcPpdEpilogue<acc_t> epilogue;
  epilogue.cols = &cols;
  epilogue.target = target.const_data_ptr<int64_t>();
  epilogue.ppc = ppc.data_ptr<acc_t>();
  epilogue.ppd = ppd.data_ptr<acc_t>();
  epilogue.lse = lse.data_ptr<acc_t>();
  epilogue.inv_tau = acc_t(1) / static_cast<acc_t>(temperature);
  similarity_sweep<scalar_t, acc_t>(x, cols, SweepOptions{normalize}, epilogue);
}

// Gradient functor, per pixel from its whole S row (see the top of the file).
template <typename acc_t>
struct PpcPpdGrad : StatelessClient {
  const PreparedColumns<acc_t>* cols = nullptr;
  const int64_t* target = nullptr;
  const acc_t* grad_ppc = nullptr;  // [N] or null
  const acc_t* grad_ppd = nullptr;  // [N] or null
  acc_t inv_tau = 1;

  void operator()(NoState&, const Tile<acc_t>& tile) const {
    const int64_t m = tile.columns;
    for (int64_t i = 0; i < tile.rows; ++i) {
      acc_t* s = tile.row(i);
      const int64_t pixel = tile.row_begin + i;
      const int64_t column = target_column(*cols, target[pixel]);
      if (column < 0) {  // ignored pixel: no loss, no gradient
        std::fill(s, s + m, acc_t(0));
        continue;
      }
      const acc_t s_target = s[column];
      const acc_t g_ppc = grad_ppc != nullptr ? grad_ppc[pixel] : acc_t(0);
      const acc_t g_ppd = grad_ppd != nullptr ? grad_ppd[pixel] : acc_t(0);
      if (grad_ppc != nullptr) {
        scaled_softmax(s, s, m, inv_tau, g_ppc * inv_tau);
      } else {
        std::fill(s, s + m, acc_t(0));
      }
      s[column] -= g_ppc * inv_tau + acc_t(2) * g_ppd * (acc_t(1) - s_target);
    }
  }
};

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> ppc_ppd_forward(const at::Tensor& x_in,
                                                               const at::Tensor& prototypes_in,
                                                               const at::Tensor& target_in, bool normalize,
                                                               double temperature) {
  at::Tensor x = x_in, prototypes = prototypes_in;
  check_features_and_prototypes(kForward, x, prototypes);
  const int64_t n = x.size(0);
  const at::Tensor target = checked_index(kForward, "target", target_in, n);
  const auto options = x.options().dtype(compute_dtype(x.scalar_type()));
  at::Tensor ppc = at::empty({n}, options), ppd = at::empty({n}, options), lse = at::empty({n}, options);
  PROTOSEG_DISPATCH_FLOATING(x.scalar_type(), kForward, [&] {
    ppc_ppd_forward_impl<scalar_t, acc_t>(x, prototypes, target, normalize, temperature, ppc, ppd, lse);
  });
  return {ppc, ppd, lse};
}

std::tuple<at::Tensor, at::Tensor> ppc_ppd_backward(
    const std::optional<at::Tensor>& grad_ppc, const std::optional<at::Tensor>& grad_ppd,
    const at::Tensor& x_in, const at::Tensor& prototypes_in, const at::Tensor& target_in,
    const at::Tensor& /*lse: recomputed*/, bool normalize, double temperature, bool need_prototype_grad) {
  at::Tensor x = x_in, prototypes = prototypes_in;
  check_features_and_prototypes(kBackward, x, prototypes);
  const int64_t n = x.size(0);
  const auto acc_dtype = compute_dtype(x.scalar_type());
  const at::Tensor target = checked_index(kBackward, "target", target_in, n);
  at::Tensor g_ppc, g_ppd;
  if (grad_ppc.has_value() && grad_ppc->defined()) {
    g_ppc = checked_values(kBackward, "grad_ppc", *grad_ppc, n, acc_dtype);
  }
  if (grad_ppd.has_value() && grad_ppd->defined()) {
    g_ppd = checked_values(kBackward, "grad_ppd", *grad_ppd, n, acc_dtype);
  }
  std::tuple<at::Tensor, at::Tensor> result;
  PROTOSEG_DISPATCH_FLOATING(x.scalar_type(), kBackward, [&] {
    const auto cols = prepare_prototypes<scalar_t, acc_t>(prototypes, normalize, ClassGrouping::ClassMajor);
    PpcPpdGrad<acc_t> fill;
    fill.cols = &cols;
    fill.target = target.const_data_ptr<int64_t>();
    fill.grad_ppc = g_ppc.defined() ? g_ppc.const_data_ptr<acc_t>() : nullptr;
    fill.grad_ppd = g_ppd.defined() ? g_ppd.const_data_ptr<acc_t>() : nullptr;
    fill.inv_tau = acc_t(1) / static_cast<acc_t>(temperature);
    BackwardOptions options;
    options.normalize_rows = normalize;
    options.recompute = true;
    options.need_column_grad = need_prototype_grad;
    result = similarity_backward_sweep<scalar_t, acc_t>(x, cols, options, fill);
  });
  return result;
}

}  // namespace protoseg::cpu

PROTOSEG_CPU_KERNELS(m) {
  using namespace protoseg::cpu;
  PROTOSEG_KERNEL(m, ppc_ppd_forward);
  PROTOSEG_KERNEL(m, ppc_ppd_backward);
}
