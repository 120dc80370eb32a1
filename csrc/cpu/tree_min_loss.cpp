// tree_min_loss (docs/spec.md §11.1), per pixel: the per-node min over ancestors (MCL) and max
// over descendants (MCM) of the sigmoid logits, the positive or negative term of each node,
// and their weighted sum; backward routes each node's slope to its first arg-min or arg-max.
// The per-pixel math is csrc/common/tree_min.h, shared with the CUDA kernels.
//
// The logits z [B, V, P] are read in place through their strides (the [N, V] layout arrives
// as [1, V, N] with node stride 1, [B, V, H, W] as its flatten(2), channels-last included):
// each pixel's V values are gathered once into a per-thread buffer in the compute dtype. The
// work is split over pixels; every pixel is computed by one thread in node order, so the
// results do not depend on the thread count. Nothing is allocated but the outputs and the
// per-thread buffers of V values.
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "common/math.h"
#include "common/tree_min.h"
#include "cpu/checks.h"
#include "cpu/kernels.h"

namespace protoseg::cpu {
namespace {

constexpr const char* kForward = "protoseg_kernels::tree_min_forward";
constexpr const char* kBackward = "protoseg_kernels::tree_min_backward";

// The checked arguments of both kernels: logits as given (never copied), the rest contiguous.
struct TreeMinArgs {
  at::Tensor logits;        // [B, V, P], any strides
  at::Tensor labels;        // [B, P] int64
  at::Tensor ancestors;     // [V, L] int64
  at::Tensor descendants;   // [V, S] int64
  at::Tensor node_weights;  // [V] in the compute dtype
};

void check_cpu(const char* kernel, const char* name, const at::Tensor& t) {
  TORCH_CHECK(t.device().is_cpu(), kernel, ": ", name, " must be a CPU tensor, got one on ", t.device());
}

at::Tensor checked_table(const char* kernel, const char* name, const at::Tensor& table, int64_t nodes) {
  check_cpu(kernel, name, table);
  TORCH_CHECK(table.scalar_type() == at::kLong, kernel, ": ", name, " must be int64, got ", table.scalar_type());
  TORCH_CHECK(table.dim() == 2 && table.size(0) == nodes, kernel, ": ", name, " must have shape [", nodes,
              ", width], got ", table.sizes());
  return table.contiguous();
}

TreeMinArgs check_args(const char* kernel, const at::Tensor& logits, const at::Tensor& labels,
                       const at::Tensor& ancestors, const at::Tensor& descendants, const at::Tensor& node_weights,
                       double focal_gamma, double eps) {
  check_cpu(kernel, "logits", logits);
  check_cpu(kernel, "labels", labels);
  check_cpu(kernel, "node_weights", node_weights);
  TORCH_CHECK(logits.dim() == 3, kernel, ": logits must be [B, V, P], got ", logits.sizes());
  const auto dtype = logits.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf || dtype == at::kBFloat16, kernel,
              ": logits must be float16, bfloat16, float32 or float64, got ", dtype);
  const int64_t batch = logits.size(0), nodes = logits.size(1), pixels = logits.size(2);
  TORCH_CHECK(labels.scalar_type() == at::kLong, kernel, ": labels must be int64, got ", labels.scalar_type());
  TORCH_CHECK(labels.dim() == 2 && labels.size(0) == batch && labels.size(1) == pixels, kernel,
              ": labels must have shape [", batch, ", ", pixels, "], got ", labels.sizes());
  TORCH_CHECK(at::isFloatingType(node_weights.scalar_type()), kernel, ": node_weights must be floating, got ",
              node_weights.scalar_type());
  TORCH_CHECK(node_weights.dim() == 1 && node_weights.size(0) == nodes, kernel, ": node_weights must have shape [",
              nodes, "], got ", node_weights.sizes());
  TORCH_CHECK(focal_gamma >= 0, kernel, ": focal_gamma must be >= 0, got ", focal_gamma);
  TORCH_CHECK(eps > 0, kernel, ": eps must be positive, got ", eps);
  return {logits, labels.contiguous(), checked_table(kernel, "ancestors", ancestors, nodes),
          checked_table(kernel, "descendants", descendants, nodes),
          node_weights.to(compute_dtype(dtype)).contiguous()};
}

TreeTables tables_of(const TreeMinArgs& a) {
  return {a.ancestors.const_data_ptr<int64_t>(), a.descendants.const_data_ptr<int64_t>(), a.logits.size(1),
          a.ancestors.size(1), a.descendants.size(1)};
}

// Pixels per task: a pixel costs about V·(L + S) table reads and V transcendental terms;
// at least ~16K of those per task, so that small problems stay serial.
int64_t pixel_grain(const TreeTables& t) {
  const int64_t per_pixel = std::max<int64_t>(1, t.nodes * (t.ancestor_width + t.descendant_width));
  return std::max<int64_t>(1, (int64_t{1} << 14) / per_pixel);
}

// Pixel i = b·P + p of z [B, V, P]: the offset of its node 0 in z's storage.
struct PixelOffsets {
  int64_t pixels, batch_stride, pixel_stride;
  int64_t operator()(int64_t i) const { return (i / pixels) * batch_stride + (i % pixels) * pixel_stride; }
};

template <typename scalar_t, typename acc_t>
void forward_impl(const TreeMinArgs& a, acc_t gamma, acc_t eps, at::Tensor& loss) {
  const TreeTables t = tables_of(a);
  const int64_t count = a.logits.size(0) * a.logits.size(2), node_stride = a.logits.stride(1);
  const PixelOffsets offset{a.logits.size(2), a.logits.stride(0), a.logits.stride(2)};
  const scalar_t* z_data = a.logits.const_data_ptr<scalar_t>();
  const int64_t* labels = a.labels.const_data_ptr<int64_t>();
  const acc_t* w = a.node_weights.const_data_ptr<acc_t>();
  acc_t* out = loss.data_ptr<acc_t>();
  at::parallel_for(0, count, pixel_grain(t), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> z(t.nodes);
    const auto logit = [&](int64_t v) { return z[v]; };
    const auto weight = [&](int64_t v) { return w[v]; };
    for (int64_t i = begin; i < end; ++i) {
      if (!index_in_range(labels[i], t.nodes)) {  // ignored: its logits are not even read
        out[i] = acc_t(0);
        continue;
      }
      const scalar_t* src = z_data + offset(i);
      for (int64_t v = 0; v < t.nodes; ++v) z[v] = static_cast<acc_t>(src[v * node_stride]);
      out[i] = tree_min_pixel_loss<acc_t>(logit, weight, t, labels[i], gamma, eps);
    }
  });
}

template <typename scalar_t, typename acc_t>
void backward_impl(const TreeMinArgs& a, const acc_t* grad_loss, acc_t gamma, acc_t eps, at::Tensor& grad) {
  const TreeTables t = tables_of(a);
  const int64_t count = a.logits.size(0) * a.logits.size(2);
  const int64_t node_stride = a.logits.stride(1), grad_node_stride = grad.stride(1);
  const PixelOffsets offset{a.logits.size(2), a.logits.stride(0), a.logits.stride(2)};
  // empty_like keeps a dense layout of the logits, but not a non-dense one: its own strides.
  const PixelOffsets grad_offset{grad.size(2), grad.stride(0), grad.stride(2)};
  const scalar_t* z_data = a.logits.const_data_ptr<scalar_t>();
  const int64_t* labels = a.labels.const_data_ptr<int64_t>();
  const acc_t* w = a.node_weights.const_data_ptr<acc_t>();
  scalar_t* g_data = grad.data_ptr<scalar_t>();
  at::parallel_for(0, count, pixel_grain(t), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> z(t.nodes), acc(t.nodes);  // the pixel's logits and gradient
    const auto logit = [&](int64_t v) { return z[v]; };
    const auto weight = [&](int64_t v) { return w[v]; };
    const auto add = [&](int64_t node, acc_t value) { acc[node] += value; };
    for (int64_t i = begin; i < end; ++i) {
      std::fill(acc.begin(), acc.end(), acc_t(0));
      if (index_in_range(labels[i], t.nodes)) {
        const scalar_t* src = z_data + offset(i);
        for (int64_t v = 0; v < t.nodes; ++v) z[v] = static_cast<acc_t>(src[v * node_stride]);
        tree_min_pixel_backward<acc_t>(logit, weight, t, labels[i], grad_loss[i], gamma, eps, add);
      }
      scalar_t* dst = g_data + grad_offset(i);  // every element written, zeros when ignored
      for (int64_t v = 0; v < t.nodes; ++v) dst[v * grad_node_stride] = static_cast<scalar_t>(acc[v]);
    }
  });
}

}  // namespace

at::Tensor tree_min_forward(const at::Tensor& logits, const at::Tensor& labels, const at::Tensor& ancestors,
                            const at::Tensor& descendants, const at::Tensor& node_weights, double focal_gamma,
                            double eps) {
  const TreeMinArgs a = check_args(kForward, logits, labels, ancestors, descendants, node_weights, focal_gamma, eps);
  at::Tensor loss = at::empty({logits.size(0), logits.size(2)},
                              logits.options().dtype(compute_dtype(logits.scalar_type())));
  PROTOSEG_DISPATCH_FLOATING(logits.scalar_type(), kForward, [&] {
    forward_impl<scalar_t, acc_t>(a, static_cast<acc_t>(focal_gamma), static_cast<acc_t>(eps), loss);
  });
  return loss;
}

at::Tensor tree_min_backward(const at::Tensor& grad_loss, const at::Tensor& logits, const at::Tensor& labels,
                             const at::Tensor& ancestors, const at::Tensor& descendants,
                             const at::Tensor& node_weights, double focal_gamma, double eps) {
  const TreeMinArgs a = check_args(kBackward, logits, labels, ancestors, descendants, node_weights, focal_gamma, eps);
  check_cpu(kBackward, "grad_loss", grad_loss);
  const int64_t batch = logits.size(0), pixels = logits.size(2);
  TORCH_CHECK(grad_loss.dim() == 2 && grad_loss.size(0) == batch && grad_loss.size(1) == pixels, kBackward,
              ": grad_loss must have shape [", batch, ", ", pixels, "], got ", grad_loss.sizes());
  const at::Tensor g = checked_values(kBackward, "grad_loss", grad_loss, batch * pixels,
                                      compute_dtype(logits.scalar_type()));
  at::Tensor grad = at::empty_like(logits);
  PROTOSEG_DISPATCH_FLOATING(logits.scalar_type(), kBackward, [&] {
    backward_impl<scalar_t, acc_t>(a, g.const_data_ptr<acc_t>(), static_cast<acc_t>(focal_gamma),
                                   static_cast<acc_t>(eps), grad);
  });
  return grad;
}

}  // namespace protoseg::cpu

PROTOSEG_CPU_KERNELS(m) {
  using namespace protoseg::cpu;
  PROTOSEG_KERNEL(m, tree_min_forward);
  PROTOSEG_KERNEL(m, tree_min_backward);
}
