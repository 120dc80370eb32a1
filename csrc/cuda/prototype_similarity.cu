// prototype_similarity: S [N, C, K] = ⟨x̂_i, P̂_ck⟩ and its backward
// (dx̂ = dS·P̂, dP̂ = dSᵀ·x̂, then through the normalisation), on the column engine
// with the prototypes as M = C·K unlabelled columns.
#include <array>

#include "cuda/kernels.h"
#include "cuda/similarity_backward.cuh"
#include "cuda/similarity_block.cuh"

namespace protoseg::cuda {
namespace {

constexpr const char* kForward = "similarity_forward";
constexpr const char* kBackward = "similarity_backward";

template <typename scalar_t, typename acc_t, TileMath math>
__global__ void __launch_bounds__(kTileThreads, kTileBlocksPerSm)
    similarity_kernel(SimilarityOperands<scalar_t, acc_t> ops, scalar_t* similarity) {
  // Consecutive threads write consecutive columns of a row: a row-major tile.
  using Tiles = BlockSimilarity<scalar_t, acc_t, math, nvcuda::wmma::mem_row_major>;
  constexpr int kTile = Tiles::kTile;
  __shared__ typename Tiles::Storage storage;
  const int64_t row0 = int64_t(blockIdx.x) * kTile;
  const int64_t col0 = int64_t(blockIdx.y) * kTile;
  Tiles::compute(ops, row0, col0, storage);
  for (int e = threadIdx.x; e < kTile * kTile; e += kTileThreads) {
    const int r = e / kTile, c = e % kTile;
    const int64_t row = row0 + r, col = col0 + c;
    if (row < ops.rows.count && col < ops.columns.count) {
      similarity[row * ops.columns.count + col] = from_acc<scalar_t>(Tiles::at(storage, r, c));
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
    with_tile_math<scalar_t>(prepared.ops.math, [&](auto math) {
      PROTOSEG_LAUNCH((similarity_kernel<scalar_t, acc_t, decltype(math)::value>), grid, dim3(kTileThreads),
                      scope.stream(), prepared.ops, mutable_data<scalar_t>(similarity));
    });
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
