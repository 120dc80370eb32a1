// prototype_similarity: S [N, C, K] = ⟨x̂_i, P̂_ck⟩ and its backward
// (dx̂ = dS·P̂, dP̂ = dSᵀ·x̂, then through the normalisation), on the column engine
// with the prototypes as M = C·K unlabelled columns.
#include <array>

#include "cuda/kernels.h"
#include "cuda/similarity_backward.cuh"
#include "cuda/similarity_tile.cuh"

namespace protoseg::cuda {
namespace {

constexpr const char* kForward = "similarity_forward";
constexpr const char* kBackward = "similarity_backward";

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kTileThreads, kTileBlocksPerSm)
    similarity_kernel(SimilarityOperands<scalar_t, acc_t> ops, scalar_t* similarity) {
  constexpr int kTile = TileConfig<acc_t>::kTile;
  constexpr int kMicro = TileConfig<acc_t>::kMicro;
  __shared__ DepthSlices<acc_t> slices;
  const int64_t row0 = int64_t(blockIdx.x) * kTile;
  const int64_t col0 = int64_t(blockIdx.y) * kTile;
  MicroTile<acc_t> acc;
  similarity_micro_tile(ops, row0, col0, slices, acc);
#pragma unroll
  for (int i = 0; i < kMicro; ++i) {
    const int64_t row = row0 + micro_row(i);
    if (row >= ops.rows.count) continue;
#pragma unroll
    for (int j = 0; j < kMicro; ++j) {
      const int64_t col = col0 + micro_col(j);
      if (col < ops.columns.count) similarity[row * ops.columns.count + col] = from_acc<scalar_t>(acc.v[i][j]);
    }
  }
}

// dS = the upstream gradient itself: nothing to recompute.
template <typename scalar_t, typename acc_t>
struct UpstreamGradient {
  struct Params {
    const scalar_t* grad;  // [n, m]
    int64_t m;
  };

  PROTOSEG_DEVICE explicit UpstreamGradient(const Params& params) : p(params) {}

  PROTOSEG_DEVICE bool needs_similarity() const { return false; }

  PROTOSEG_DEVICE acc_t operator()(int64_t row, Column column, acc_t) const {
    return to_acc(p.grad[row * p.m + column.index]);
  }

 private:
  const Params& p;
};

}  // namespace

at::Tensor similarity_forward(const at::Tensor& x_arg, const at::Tensor& prototypes_arg, bool normalize) {
  check_features(kForward, x_arg, prototypes_arg);
  const at::Tensor x = x_arg.contiguous();
  const at::Tensor prototypes = prototypes_arg.contiguous();
  const LaunchScope scope(x);
  const int64_t n = x.size(0);
  at::Tensor similarity = at::empty({n, prototypes.size(0), prototypes.size(1)}, x.options());
  dispatch_floating(x.scalar_type(), kForward, [&](auto tag) {
    using scalar_t = typename decltype(tag)::type;
    using acc_t = acc_type<scalar_t>;
    constexpr int kTile = TileConfig<acc_t>::kTile;
    const auto prepared = prepare_operands<scalar_t, acc_t>(x, prototypes, normalize, scope.stream());
    const dim3 col_tiles = grid_for(prepared.ops.columns.count, kTile);
    TORCH_CHECK(col_tiles.x <= 65535u, kForward, ": too many prototypes (C·K = ", prepared.ops.columns.count, ")");
    const dim3 grid(grid_for(n, kTile).x, col_tiles.x);
    PROTOSEG_LAUNCH((similarity_kernel<scalar_t, acc_t>), grid, dim3(kTileThreads), scope.stream(), prepared.ops,
                    mutable_data<scalar_t>(similarity));
  });
  return similarity;
}

TensorPair similarity_backward(const at::Tensor& grad_arg, const at::Tensor& x_arg, const at::Tensor& prototypes_arg,
                               bool normalize, bool need_prototype_grad) {
  check_features(kBackward, x_arg, prototypes_arg);
  const at::Tensor x = x_arg.contiguous();
  const at::Tensor prototypes = prototypes_arg.contiguous();
  const int64_t n = x.size(0), m = prototypes.size(0) * prototypes.size(1);
  const std::array<int64_t, 3> grad_shape{n, prototypes.size(0), prototypes.size(1)};
  TORCH_CHECK(grad_arg.sizes() == at::IntArrayRef(grad_shape), kBackward, ": grad must have shape [N, C, K] = ",
              at::IntArrayRef(grad_shape), ", got ", grad_arg.sizes());
  const at::Tensor grad = grad_arg.to(x.scalar_type()).contiguous();
  const LaunchScope scope(x);
  TensorPair result;
  dispatch_floating(x.scalar_type(), kBackward, [&](auto tag) {
    using scalar_t = typename decltype(tag)::type;
    using acc_t = acc_type<scalar_t>;
    const auto prepared = prepare_operands<scalar_t, acc_t>(x, prototypes, normalize, scope.stream());
    using Rule = UpstreamGradient<scalar_t, acc_t>;
    typename Rule::Params params{};
    params.grad = data<scalar_t>(grad);
    params.m = m;
    result = similarity_backward_from_rule<Rule>(prepared, params, need_prototype_grad, scope.stream());
  });
  return result;
}

}  // namespace protoseg::cuda

PROTOSEG_CUDA_KERNELS(m) {
  using namespace protoseg::cuda;
  PROTOSEG_KERNEL(m, similarity_forward);
  PROTOSEG_KERNEL(m, similarity_backward);
}
