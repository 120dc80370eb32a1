// A client of the CUDA column engine that no op of the library is: per row i with label
// y_i, the label-masked log-sum-exp over a labelled column set (a memory bank),
//   lse_i = log Σ_{j : z_j ∉ {y_i, ignore}} exp(S_ij/τ),
// and its backward to the rows and the columns. Written against the engine's headers
// only (a Visitor, a gradient rule, their Params), built by tests/test_cuda_column_engine.py
// through the host emulation, and compared there with float64 torch: it shows that an op
// with arbitrary M and column labels needs no change of the engine.
#include <torch/extension.h>

#include "cuda/similarity_backward.cuh"
#include "cuda/similarity_sweep.cuh"

namespace protoseg::cuda {
namespace {

template <typename acc_t>
struct MaskedLseParams {
  const int64_t* row_label;  // [n]
  int64_t ignore_index;
  acc_t inverse_temperature;
};

// Forward: one online log-sum-exp per row over the columns the mask admits.
template <typename acc_t>
struct MaskedLseVisitor {
  struct Params {
    MaskedLseParams<acc_t> mask;
    acc_t* lse;  // [n]
  };

  PROTOSEG_DEVICE MaskedLseVisitor(const Params& params, int64_t row)
      : p(params), row(row), label(row >= 0 ? params.mask.row_label[row] : params.mask.ignore_index) {}

  PROTOSEG_DEVICE void visit(Column column, acc_t s) {
    if (column.label != p.mask.ignore_index && column.label != label) all.add(s * p.mask.inverse_temperature);
  }

  PROTOSEG_DEVICE void finish() { p.lse[row] = all.value(); }

 private:
  const Params& p;
  int64_t row;
  int64_t label;
  OnlineLogSumExp<acc_t> all;
};

// Backward: dS_ij = g_i·exp(S_ij/τ − lse_i)/τ on admitted columns, 0 elsewhere.
template <typename acc_t>
struct MaskedLseGradient {
  struct Params {
    MaskedLseParams<acc_t> mask;
    const acc_t* lse;   // [n]
    const acc_t* grad;  // [n]
  };

  PROTOSEG_DEVICE explicit MaskedLseGradient(const Params& params) : p(params) {}

  PROTOSEG_DEVICE bool needs_similarity() const { return true; }

  PROTOSEG_DEVICE acc_t operator()(int64_t row, Column column, acc_t s) const {
    if (column.label == p.mask.ignore_index || column.label == p.mask.row_label[row]) return acc_t(0);
    return p.grad[row] * exp(s * p.mask.inverse_temperature - p.lse[row]) * p.mask.inverse_temperature;
  }

 private:
  const Params& p;
};

MaskedLseParams<float> mask_params(const at::Tensor& row_label, int64_t ignore_index, double temperature) {
  return MaskedLseParams<float>{data<int64_t>(row_label), ignore_index, float(1.0 / temperature)};
}

// x [n, d], columns [m, d] float32 and labels int64, all contiguous CPU tensors.
at::Tensor masked_lse_forward(const at::Tensor& x, const at::Tensor& columns, const at::Tensor& row_label,
                              const at::Tensor& column_label, int64_t ignore_index, bool normalize,
                              double temperature) {
  at::Tensor lse = at::empty({x.size(0)}, x.options());
  const auto prepared = prepare_operands<float, float>(x, columns, normalize, nullptr, column_label);
  typename MaskedLseVisitor<float>::Params params{};
  params.mask = mask_params(row_label, ignore_index, temperature);
  params.lse = mutable_data<float>(lse);
  launch_similarity_sweep<float, float, MaskedLseVisitor<float>>(prepared.ops, params, nullptr);
  return lse;
}

std::tuple<at::Tensor, at::Tensor> masked_lse_backward(const at::Tensor& grad, const at::Tensor& lse,
                                                       const at::Tensor& x, const at::Tensor& columns,
                                                       const at::Tensor& row_label, const at::Tensor& column_label,
                                                       int64_t ignore_index, bool normalize, double temperature) {
  const auto prepared = prepare_operands<float, float>(x, columns, normalize, nullptr, column_label);
  typename MaskedLseGradient<float>::Params params{};
  params.mask = mask_params(row_label, ignore_index, temperature);
  params.lse = data<float>(lse);
  params.grad = data<float>(grad);
  return similarity_backward_from_rule<MaskedLseGradient<float>>(prepared, params, true, nullptr);
}

}  // namespace
}  // namespace protoseg::cuda

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &protoseg::cuda::masked_lse_forward);
  m.def("backward", &protoseg::cuda::masked_lse_backward);
}
