// tree_min_loss (docs/spec.md §11.1): one thread per pixel, the per-pixel math of
// csrc/common/tree_min.h (shared with the CPU kernels). The logits z [B, V, P] are read in
// place through their strides from global memory (the [N, V] layout arrives as [1, V, N]
// with node stride 1, [B, V, H, W] as its flatten(2), channels-last included); a pixel's few
// V values are reread from cache by the extremum scans rather than staged, since V is
// dynamic and the kernels take no dynamic shared memory.
//
// Backward: each thread owns its pixel's V gradient elements. It writes zeros to all of
// them, then adds each node's contribution to its arg-min / arg-max element by a
// read-modify-write: one writer per element, no atomics, and the result is deterministic.
// Nothing is allocated but the per-pixel loss and the gradient.
#include "cuda/kernels.h"
#include "cuda/host.h"
// (after the platform, which cuda/host.h includes first)
#include "common/tree_min.h"

namespace protoseg::cuda {
namespace {

constexpr const char* kForward = "tree_min_forward";
constexpr const char* kBackward = "tree_min_backward";
constexpr int kPixelThreads = 256;  // one thread per pixel

// Where pixel i = b·P + p of a [B, V, P] tensor lives: its node 0 and the node stride.
struct PixelLayout {
  int64_t pixels;
  int64_t batch_stride;
  int64_t node_stride;
  int64_t pixel_stride;
  PROTOSEG_DEVICE int64_t offset(int64_t i) const {
    return (i / pixels) * batch_stride + (i % pixels) * pixel_stride;
  }
};

PixelLayout layout_of(const at::Tensor& t) { return {t.size(2), t.stride(0), t.stride(1), t.stride(2)}; }

// One pixel's logits as the accessor z(v) of the shared math.
template <typename scalar_t, typename acc_t>
struct PixelLogits {
  const scalar_t* base;
  int64_t node_stride;
  PROTOSEG_DEVICE acc_t operator()(int64_t v) const { return to_acc(base[v * node_stride]); }
};

template <typename acc_t>
struct NodeWeights {
  const acc_t* weights;  // [V]
  PROTOSEG_DEVICE acc_t operator()(int64_t v) const { return weights[v]; }
};

template <typename scalar_t, typename acc_t>
struct TreeMinParams {
  const scalar_t* logits;  // [B, V, P], strided as `z`
  PixelLayout z;
  const int64_t* labels;   // [B, P] contiguous
  const acc_t* weights;    // [V]
  TreeTables tables;
  int64_t count;           // B·P
  acc_t gamma;
  acc_t eps;
};

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kPixelThreads, kSmallKernelBlocksPerSm)
    tree_min_forward_kernel(TreeMinParams<scalar_t, acc_t> p, acc_t* loss) {
  const int64_t i = global_thread_x();
  if (i >= p.count) return;
  const int64_t label = p.labels[i];
  if (!index_in_range(label, p.tables.nodes)) {  // ignored: its logits are not even read
    loss[i] = acc_t(0);
    return;
  }
  const PixelLogits<scalar_t, acc_t> z{p.logits + p.z.offset(i), p.z.node_stride};
  loss[i] = tree_min_pixel_loss<acc_t>(z, NodeWeights<acc_t>{p.weights}, p.tables, label, p.gamma, p.eps);
}

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kPixelThreads, kSmallKernelBlocksPerSm)
    tree_min_backward_kernel(TreeMinParams<scalar_t, acc_t> p, const acc_t* grad_loss, scalar_t* grad,
                             PixelLayout g) {
  const int64_t i = global_thread_x();
  if (i >= p.count) return;
  scalar_t* dst = grad + g.offset(i);
  for (int64_t v = 0; v < p.tables.nodes; ++v) dst[v * g.node_stride] = from_acc<scalar_t>(acc_t(0));
  const int64_t label = p.labels[i];
  if (!index_in_range(label, p.tables.nodes)) return;  // ignored: zeros
  const PixelLogits<scalar_t, acc_t> z{p.logits + p.z.offset(i), p.z.node_stride};
  // `node` comes range-checked from the extremum scan (an entry outside [0, V) is skipped).
  auto add = [&](int64_t node, acc_t value) {
    scalar_t& element = dst[node * g.node_stride];
    element = from_acc<scalar_t>(to_acc(element) + value);
  };
  tree_min_pixel_backward<acc_t>(z, NodeWeights<acc_t>{p.weights}, p.tables, label, grad_loss[i], p.gamma, p.eps,
                                 add);
}

at::Tensor checked_table(const char* kernel, const char* name, const at::Tensor& table, int64_t nodes,
                         const at::Tensor& like) {
  check_rank(kernel, name, table, 2);
  check_tensor(kernel, name, table, {nodes, table.size(1)}, at::kLong, like);
  return table.contiguous();
}

// The checked arguments of both kernels: logits as given (never copied), the rest contiguous.
struct TreeMinArgs {
  at::Tensor logits;
  at::Tensor labels;
  at::Tensor ancestors;
  at::Tensor descendants;
  at::Tensor node_weights;  // in the compute dtype
};

TreeMinArgs check_args(const char* kernel, const at::Tensor& logits, const at::Tensor& labels,
                       const at::Tensor& ancestors, const at::Tensor& descendants, const at::Tensor& node_weights,
                       double focal_gamma, double eps) {
  check_device(kernel, "logits", logits);
  check_rank(kernel, "logits", logits, 3);
  const int64_t batch = logits.size(0), nodes = logits.size(1), pixels = logits.size(2);
  check_tensor(kernel, "labels", labels, {batch, pixels}, at::kLong, logits);
  check_rank(kernel, "node_weights", node_weights, 1);
  TORCH_CHECK(node_weights.size(0) == nodes, kernel, ": node_weights must have shape [", nodes, "], got ",
              node_weights.sizes());
  TORCH_CHECK(at::isFloatingType(node_weights.scalar_type()), kernel, ": node_weights must be floating, got ",
              node_weights.scalar_type());
  TORCH_CHECK(node_weights.device() == logits.device(), kernel, ": node_weights must be on ", logits.device(),
              ", got ", node_weights.device());
  TORCH_CHECK(focal_gamma >= 0, kernel, ": focal_gamma must be >= 0, got ", focal_gamma);
  TORCH_CHECK(eps > 0, kernel, ": eps must be positive, got ", eps);
  return {logits, labels.contiguous(), checked_table(kernel, "ancestors", ancestors, nodes, logits),
          checked_table(kernel, "descendants", descendants, nodes, logits),
          node_weights.to(accumulate_dtype(logits.scalar_type())).contiguous()};
}

template <typename scalar_t, typename acc_t>
TreeMinParams<scalar_t, acc_t> params_of(const TreeMinArgs& a, double focal_gamma, double eps) {
  TreeMinParams<scalar_t, acc_t> p{};
  p.logits = data<scalar_t>(a.logits);
  p.z = layout_of(a.logits);
  p.labels = data<int64_t>(a.labels);
  p.weights = data<acc_t>(a.node_weights);
  p.tables = {data<int64_t>(a.ancestors), data<int64_t>(a.descendants), a.logits.size(1), a.ancestors.size(1),
              a.descendants.size(1)};
  p.count = a.logits.size(0) * a.logits.size(2);
  p.gamma = acc_t(focal_gamma);
  p.eps = acc_t(eps);
  return p;
}

}  // namespace

at::Tensor tree_min_forward(const at::Tensor& logits, const at::Tensor& labels, const at::Tensor& ancestors,
                            const at::Tensor& descendants, const at::Tensor& node_weights, double focal_gamma,
                            double eps) {
  const TreeMinArgs a = check_args(kForward, logits, labels, ancestors, descendants, node_weights, focal_gamma, eps);
  const LaunchScope scope(logits);
  at::Tensor loss = at::empty({logits.size(0), logits.size(2)},
                              logits.options().dtype(accumulate_dtype(logits.scalar_type())));
  dispatch_floating(logits.scalar_type(), kForward, [&](auto tag) {
    using scalar_t = typename decltype(tag)::type;
    using acc_t = acc_type<scalar_t>;
    const auto p = params_of<scalar_t, acc_t>(a, focal_gamma, eps);
    PROTOSEG_LAUNCH((tree_min_forward_kernel<scalar_t, acc_t>), grid_for(p.count, kPixelThreads),
                    dim3(kPixelThreads), scope.stream(), p, mutable_data<acc_t>(loss));
  });
  return loss;
}

at::Tensor tree_min_backward(const at::Tensor& grad_loss, const at::Tensor& logits, const at::Tensor& labels,
                             const at::Tensor& ancestors, const at::Tensor& descendants,
                             const at::Tensor& node_weights, double focal_gamma, double eps) {
  const TreeMinArgs a = check_args(kBackward, logits, labels, ancestors, descendants, node_weights, focal_gamma, eps);
  const int64_t batch = logits.size(0), pixels = logits.size(2);
  const at::ScalarType acc_dtype = accumulate_dtype(logits.scalar_type());
  const auto g = prepare_grad(kBackward, "grad_loss", grad_loss, {batch, pixels}, acc_dtype, logits);
  const LaunchScope scope(logits);
  // Dense logits keep their layout; a non-dense view gets a dense one: the kernel reads
  // the gradient's own strides.
  at::Tensor grad = at::empty_like(logits);
  dispatch_floating(logits.scalar_type(), kBackward, [&](auto tag) {
    using scalar_t = typename decltype(tag)::type;
    using acc_t = acc_type<scalar_t>;
    const auto p = params_of<scalar_t, acc_t>(a, focal_gamma, eps);
    PROTOSEG_LAUNCH((tree_min_backward_kernel<scalar_t, acc_t>), grid_for(p.count, kPixelThreads),
                    dim3(kPixelThreads), scope.stream(), p, data<acc_t>(*g), mutable_data<scalar_t>(grad),
                    layout_of(grad));
  });
  return grad;
}

}  // namespace protoseg::cuda

PROTOSEG_CUDA_KERNELS(m) {
  using namespace protoseg::cuda;
  PROTOSEG_KERNEL(m, tree_min_forward);
  PROTOSEG_KERNEL(m, tree_min_backward);
}
