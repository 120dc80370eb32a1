// prototype_similarity: S [N, C, K] = x̂·P̂ᵀ (docs/spec.md §3.1), by tiles; backward from dS.
#include "cpu/checks.h"
#include "cpu/kernels.h"
#include "cpu/similarity_tiles.h"

namespace protoseg::cpu {
namespace {

constexpr const char* kForward = "protoseg_kernels::similarity_forward";
constexpr const char* kBackward = "protoseg_kernels::similarity_backward";

// Nothing here needs a whole S row, so the sweeps may go over column blocks. Forward is a
// copy-out: small tiles that stay in L1/L2 are fastest (measured). Backward accumulates
// dx̂ over the blocks, which favours long blocks: whole rows up to 2048 columns (C·K of
// every preset), so only larger C·K pays the extra dx̂ passes.
constexpr int64_t kForwardColumnBlock = 128;
constexpr int64_t kBackwardColumnBlock = 2048;

// Copies each S tile to its place in the output [N, C·K] (class-major, as the API).
template <typename scalar_t, typename acc_t>
struct CopySimilarities : StatelessClient {
  scalar_t* out = nullptr;  // [N, M]
  int64_t m = 0;

  void operator()(NoState&, const Tile<acc_t>& tile) const {
    for (int64_t i = 0; i < tile.rows; ++i) {
      const acc_t* src = tile.row(i);
      scalar_t* dst = out + (tile.row_begin + i) * m + tile.column_begin;
      for (int64_t j = 0; j < tile.columns; ++j) dst[j] = static_cast<scalar_t>(src[j]);
    }
  }
};

// dS is the upstream gradient itself.
template <typename scalar_t, typename acc_t>
struct LoadUpstreamGrad : StatelessClient {
  const scalar_t* grad = nullptr;  // [N, M]
  int64_t m = 0;

  void operator()(NoState&, const Tile<acc_t>& tile) const {
    for (int64_t i = 0; i < tile.rows; ++i) {
      const scalar_t* src = grad + (tile.row_begin + i) * m + tile.column_begin;
      acc_t* dst = tile.row(i);
      for (int64_t j = 0; j < tile.columns; ++j) dst[j] = static_cast<acc_t>(src[j]);
    }
  }
};

template <typename scalar_t, typename acc_t>
void similarity_forward_impl(const at::Tensor& x, const at::Tensor& prototypes, bool normalize,
                             at::Tensor& out) {
  const auto cols = prepare_prototypes<scalar_t, acc_t>(prototypes, normalize, ClassGrouping::ClassMajor);
  CopySimilarities<scalar_t, acc_t> epilogue;
  epilogue.out = out.data_ptr<scalar_t>();
  epilogue.m = cols.count;
  similarity_sweep<scalar_t, acc_t>(x, cols, SweepOptions{normalize, kForwardColumnBlock}, epilogue);
}

template <typename scalar_t, typename acc_t>
std::tuple<at::Tensor, at::Tensor> similarity_backward_impl(const at::Tensor& grad, const at::Tensor& x,
                                                            const at::Tensor& prototypes, bool normalize,
                                                            bool need_prototype_grad) {
  const auto cols = prepare_prototypes<scalar_t, acc_t>(prototypes, normalize, ClassGrouping::ClassMajor);
  LoadUpstreamGrad<scalar_t, acc_t> gradient;
  gradient.grad = grad.const_data_ptr<scalar_t>();
  gradient.m = cols.count;
  BackwardOptions options;
  options.normalize_rows = normalize;
  options.recompute = false;
  options.need_column_grad = need_prototype_grad;
  options.column_block = kBackwardColumnBlock;
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
