// prototype_similarity: S [N, C, K] = x̂·P̂ᵀ (SPEC §3.1), by tiles; backward from dS.
#include "cpu/checks.h"
#include "cpu/kernels.h"
#include "cpu/similarity_tiles.h"

namespace protoseg::cpu {
namespace {

constexpr const char* kForward = "protoseg_kernels::similarity_forward";
constexpr const char* kBackward = "protoseg_kernels::similarity_backward";

// The tiles hold whole rows in class-major order: each S row is the output row as it is.
template <typename scalar_t, typename acc_t>
struct CopySimilarities : RowEpilogue {
  scalar_t* out;  // [N, C·K]

  void operator()(NoState&, const Tile<acc_t>& tile) const {
    const int64_t count = tile.rows * tile.columns;
    scalar_t* rows = out + tile.row_begin * tile.columns;
    for (int64_t e = 0; e < count; ++e) rows[e] = static_cast<scalar_t>(tile.s[e]);
  }
};

// dS is the upstream gradient itself.
template <typename scalar_t, typename acc_t>
struct LoadUpstreamGrad : RowEpilogue {
  const scalar_t* grad;  // [N, C·K]

  void operator()(NoState&, const Tile<acc_t>& tile) const {
    const int64_t count = tile.rows * tile.columns;
    const scalar_t* rows = grad + tile.row_begin * tile.columns;
    for (int64_t e = 0; e < count; ++e) tile.s[e] = static_cast<acc_t>(rows[e]);
  }
};

template <typename scalar_t, typename acc_t>
void similarity_forward_impl(const at::Tensor& x, const at::Tensor& prototypes, bool normalize,
                             at::Tensor& out) {
  const auto cols = prepare_prototypes<scalar_t, acc_t>(prototypes, normalize, ClassGrouping::ClassMajor);
  CopySimilarities<scalar_t, acc_t> epilogue;
  epilogue.out = out.data_ptr<scalar_t>();
  similarity_sweep<scalar_t, acc_t>(x, cols, SweepOptions{normalize}, epilogue);
}

template <typename scalar_t, typename acc_t>
std::tuple<at::Tensor, at::Tensor> similarity_backward_impl(const at::Tensor& grad, const at::Tensor& x,
                                                            const at::Tensor& prototypes, bool normalize,
                                                            bool need_prototype_grad) {
  const auto cols = prepare_prototypes<scalar_t, acc_t>(prototypes, normalize, ClassGrouping::ClassMajor);
  LoadUpstreamGrad<scalar_t, acc_t> gradient;
  gradient.grad = grad.const_data_ptr<scalar_t>();
  BackwardOptions options;
  options.normalize_rows = normalize;
  options.recompute = false;
  options.need_column_grad = need_prototype_grad;
  return similarity_backward_sweep<scalar_t, acc_t>(x, cols, options, gradient);
}

}  // namespace

at::Tensor similarity_forward(const at::Tensor& x_in, const at::Tensor& prototypes_in, bool normalize) {
  at::Tensor x = x_in, prototypes = prototypes_in;
  check_features_and_prototypes(kForward, x, prototypes);
  at::Tensor out = at::empty({x.size(0), prototypes.size(0), prototypes.size(1)}, x.options());
  PROTOSEG_DISPATCH_FLOATING(x.scalar_type(), kForward, [&] {
    similarity_forward_impl<scalar_t, acc_t>(x, prototypes, normalize, out);
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> similarity_backward(const at::Tensor& grad_in, const at::Tensor& x_in,
                                                       const at::Tensor& prototypes_in, bool normalize,
                                                       bool need_prototype_grad) {
  at::Tensor x = x_in, prototypes = prototypes_in;
  check_features_and_prototypes(kBackward, x, prototypes);
  const int64_t m = prototypes.size(0) * prototypes.size(1);
  TORCH_CHECK(grad_in.numel() == x.size(0) * m, kBackward, ": grad must be [N, C, K] = [", x.size(0), ", ",
              prototypes.size(0), ", ", prototypes.size(1), "], got ", grad_in.sizes());
  const at::Tensor grad = grad_in.to(x.scalar_type()).contiguous();
  std::tuple<at::Tensor, at::Tensor> result;
  PROTOSEG_DISPATCH_FLOATING(x.scalar_type(), kBackward, [&] {
    result = similarity_backward_impl<scalar_t, acc_t>(grad, x, prototypes, normalize, need_prototype_grad);
  });
  return result;
}

}  // namespace protoseg::cpu

PROTOSEG_CPU_KERNELS(m) {
  using namespace protoseg::cpu;
  PROTOSEG_KERNEL(m, similarity_forward);
  PROTOSEG_KERNEL(m, similarity_backward);
}
