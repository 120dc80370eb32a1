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
//
// The loss is bound by its transcendental functions (an exp and a log per node and pixel, and
// the focal power), so float computation (fp32, fp16, bf16 logits) on an AVX2 CPU takes eight
// pixels at a time, one per lane (csrc/cpu/vec_math.h): the same terms in the same node order,
// with σ(s) and σ(−s) from one exp. A pixel's result does not depend on its lane, so it still
// does not depend on the thread count. fp64, other CPUs and trees of more than kMaxLaneNodes
// nodes take the scalar path of csrc/common/tree_min.h.
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <vector>

#include "common/math.h"
#include "common/tree_min.h"
#include "cpu/checks.h"
#include "cpu/kernels.h"
#include "cpu/vec_math.h"

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

#if PROTOSEG_HAVE_AVX2_PATH
constexpr int kLanes = 8;
constexpr int64_t kMaxLaneNodes = 1024;  // the label × node table below has V² entries

// on_path[l·V + v] = 1 when node v is label l's leaf or one of its ancestors.
std::vector<int32_t> on_path_table(const TreeTables& t) {
  std::vector<int32_t> table(t.nodes * t.nodes, 0);
  for (int64_t label = 0; label < t.nodes; ++label)
    for (int64_t v = 0; v < t.nodes; ++v) table[label * t.nodes + v] = tree_on_path(t, label, v) ? 1 : 0;
  return table;
}

// A block of up to eight pixels: their logits node-major (z[v·8 + lane], 0 for an ignored or
// absent pixel, whose logits are never read), their labels (0 where ignored, for the table
// lookups) and which lanes hold a pixel that takes part.
struct LaneBlock {
  std::vector<float> z;
  alignas(32) int32_t label[kLanes];
  alignas(32) int32_t valid[kLanes];
  int lanes = 0;
};

template <typename scalar_t>
void load_block(LaneBlock& block, const TreeMinArgs& a, const TreeTables& t, const PixelOffsets& offset,
                int64_t first, int64_t end) {
  const int64_t node_stride = a.logits.stride(1);
  const scalar_t* z_data = a.logits.const_data_ptr<scalar_t>();
  const int64_t* labels = a.labels.const_data_ptr<int64_t>();
  block.lanes = static_cast<int>(std::min<int64_t>(kLanes, end - first));
  for (int j = 0; j < kLanes; ++j) {
    const int64_t label = j < block.lanes ? labels[first + j] : -1;
    const bool valid = index_in_range(label, t.nodes);
    block.label[j] = valid ? static_cast<int32_t>(label) : 0;
    block.valid[j] = valid ? -1 : 0;
    const scalar_t* src = valid ? z_data + offset(first + j) : nullptr;
    for (int64_t v = 0; v < t.nodes; ++v) block.z[v * kLanes + j] = valid ? static_cast<float>(src[v * node_stride]) : 0.f;
  }
}

// The lanes' positive-node mask for node v, from the label × node table.
PROTOSEG_AVX2 inline __m256 positive_lanes(const LaneBlock& block, const int32_t* on_path, int64_t nodes, int64_t v) {
  const __m256i labels = _mm256_load_si256(reinterpret_cast<const __m256i*>(block.label));
  const __m256i rows = _mm256_add_epi32(_mm256_mullo_epi32(labels, _mm256_set1_epi32(static_cast<int32_t>(nodes))),
                                        _mm256_set1_epi32(static_cast<int32_t>(v)));
  const __m256i hit = _mm256_i32gather_epi32(on_path, rows, 4);
  return _mm256_castsi256_ps(_mm256_cmpgt_epi32(hit, _mm256_setzero_si256()));
}

// The extremum of z over one table row, lane-wise, with the first arg-extremum node (as
// tree_first_extremum: the first valid entry enters, then only strict improvements or a first
// NaN); node −1 and ±inf for a row without a valid entry.
struct LaneExtremum {
  __m256 value;
  __m256i node;
};
template <bool kLargest>
PROTOSEG_AVX2 inline LaneExtremum lane_extremum(const LaneBlock& block, const int64_t* row, int64_t width,
                                                int64_t nodes) {
  const float start = kLargest ? -std::numeric_limits<float>::infinity() : std::numeric_limits<float>::infinity();
  LaneExtremum best{_mm256_set1_ps(start), _mm256_set1_epi32(-1)};
  bool empty = true;
  for (int64_t k = 0; k < width; ++k) {
    const int64_t node = row[k];
    if (!index_in_range(node, nodes)) continue;
    const __m256 x = _mm256_loadu_ps(block.z.data() + node * kLanes);
    const __m256 take = empty ? _mm256_castsi256_ps(_mm256_set1_epi32(-1))
                              : (kLargest ? vec::replaces_max(x, best.value) : vec::replaces_min(x, best.value));
    best.value = _mm256_blendv_ps(best.value, x, take);
    best.node = _mm256_castps_si256(_mm256_blendv_ps(_mm256_castsi256_ps(best.node),
                                                     _mm256_castsi256_ps(_mm256_set1_epi32(static_cast<int32_t>(node))),
                                                     take));
    empty = false;
  }
  return best;
}

// s per lane: MCL_v on positive lanes, −MCM_v on negative ones; the term of a node is then
// t(s) = −log(σ(s) + ε)·σ(−s)^γ for both signs.
PROTOSEG_AVX2 inline __m256 node_term(vec::SigmoidPair sig, float gamma, float eps) {
  const __m256 term = _mm256_sub_ps(_mm256_setzero_ps(), Sleef_logf8_u10(_mm256_add_ps(sig.of_s, _mm256_set1_ps(eps))));
  return gamma != 0.f ? _mm256_mul_ps(term, vec::focal_power(sig.of_minus_s, gamma)) : term;
}

// dt/ds = σ(s)·[γ·log(σ(s) + ε) − σ(−s)/(σ(s) + ε)]·σ(−s)^γ (the positive slope of
// csrc/common/tree_min.h in s; the negative slope in m = −s is its negation).
PROTOSEG_AVX2 inline __m256 node_slope(vec::SigmoidPair sig, float gamma, float eps) {
  const __m256 shifted = _mm256_add_ps(sig.of_s, _mm256_set1_ps(eps));
  const __m256 inner = _mm256_sub_ps(_mm256_mul_ps(_mm256_set1_ps(gamma), Sleef_logf8_u10(shifted)),
                                     _mm256_div_ps(sig.of_minus_s, shifted));
  const __m256 slope = _mm256_mul_ps(sig.of_s, inner);
  return gamma != 0.f ? _mm256_mul_ps(slope, vec::focal_power(sig.of_minus_s, gamma)) : slope;
}

template <typename scalar_t>
PROTOSEG_AVX2 void forward_lanes(const TreeMinArgs& a, const TreeTables& t, const int32_t* on_path, float gamma,
                                 float eps, int64_t begin, int64_t end, float* out) {
  const PixelOffsets offset{a.logits.size(2), a.logits.stride(0), a.logits.stride(2)};
  const float* w = a.node_weights.const_data_ptr<float>();
  LaneBlock block;
  block.z.resize(t.nodes * kLanes);
  alignas(32) float loss_lanes[kLanes];
  for (int64_t first = begin; first < end; first += kLanes) {
    load_block<scalar_t>(block, a, t, offset, first, end);
    __m256 loss = _mm256_setzero_ps();
    for (int64_t v = 0; v < t.nodes; ++v) {
      const __m256 mcl = lane_extremum<false>(block, t.ancestors + v * t.ancestor_width, t.ancestor_width, t.nodes).value;
      const __m256 mcm =
          lane_extremum<true>(block, t.descendants + v * t.descendant_width, t.descendant_width, t.nodes).value;
      const __m256 s = _mm256_blendv_ps(_mm256_sub_ps(_mm256_setzero_ps(), mcm), mcl,
                                        positive_lanes(block, on_path, t.nodes, v));
      loss = _mm256_add_ps(loss, _mm256_mul_ps(_mm256_set1_ps(w[v]), node_term(vec::sigmoid_pair(s), gamma, eps)));
    }
    _mm256_store_ps(loss_lanes, loss);
    for (int j = 0; j < block.lanes; ++j) out[first + j] = block.valid[j] ? loss_lanes[j] : 0.f;
  }
}

template <typename scalar_t>
PROTOSEG_AVX2 void backward_lanes(const TreeMinArgs& a, const TreeTables& t, const int32_t* on_path,
                                  const float* grad_loss, float gamma, float eps, int64_t begin, int64_t end,
                                  at::Tensor& grad) {
  const PixelOffsets offset{a.logits.size(2), a.logits.stride(0), a.logits.stride(2)};
  const PixelOffsets grad_offset{grad.size(2), grad.stride(0), grad.stride(2)};
  const int64_t grad_node_stride = grad.stride(1);
  const float* w = a.node_weights.const_data_ptr<float>();
  scalar_t* g_data = grad.data_ptr<scalar_t>();
  LaneBlock block;
  block.z.resize(t.nodes * kLanes);
  std::vector<float> acc(t.nodes * kLanes);
  alignas(32) float value[kLanes];
  alignas(32) int32_t node[kLanes];
  alignas(32) float upstream[kLanes];
  for (int64_t first = begin; first < end; first += kLanes) {
    load_block<scalar_t>(block, a, t, offset, first, end);
    std::fill(acc.begin(), acc.end(), 0.f);
    for (int j = 0; j < kLanes; ++j) upstream[j] = j < block.lanes && block.valid[j] ? grad_loss[first + j] : 0.f;
    const __m256 g = _mm256_load_ps(upstream);
    for (int64_t v = 0; v < t.nodes; ++v) {
      const LaneExtremum low = lane_extremum<false>(block, t.ancestors + v * t.ancestor_width, t.ancestor_width, t.nodes);
      const LaneExtremum high =
          lane_extremum<true>(block, t.descendants + v * t.descendant_width, t.descendant_width, t.nodes);
      const __m256 positive = positive_lanes(block, on_path, t.nodes, v);
      const __m256 s = _mm256_blendv_ps(_mm256_sub_ps(_mm256_setzero_ps(), high.value), low.value, positive);
      const __m256 slope_s = node_slope(vec::sigmoid_pair(s), gamma, eps);
      const __m256 slope_m = _mm256_blendv_ps(_mm256_sub_ps(_mm256_setzero_ps(), slope_s), slope_s, positive);
      _mm256_store_ps(value, _mm256_mul_ps(slope_m, _mm256_mul_ps(g, _mm256_set1_ps(w[v]))));
      _mm256_store_si256(reinterpret_cast<__m256i*>(node),
                         _mm256_castps_si256(_mm256_blendv_ps(_mm256_castsi256_ps(high.node),
                                                              _mm256_castsi256_ps(low.node), positive)));
      for (int j = 0; j < block.lanes; ++j)
        if (block.valid[j] && node[j] >= 0) acc[node[j] * kLanes + j] += value[j];
    }
    for (int j = 0; j < block.lanes; ++j) {  // every element written, zeros when ignored
      scalar_t* dst = g_data + grad_offset(first + j);
      for (int64_t v = 0; v < t.nodes; ++v) dst[v * grad_node_stride] = static_cast<scalar_t>(acc[v * kLanes + j]);
    }
  }
}

// Whether the eight-lane path serves these logits.
template <typename acc_t>
bool lanes_serve(const TreeTables& t) {
  return std::is_same_v<acc_t, float> && vec::has_avx2() && t.nodes <= kMaxLaneNodes;
}
#endif

template <typename scalar_t, typename acc_t>
void forward_impl(const TreeMinArgs& a, acc_t gamma, acc_t eps, at::Tensor& loss) {
  const TreeTables t = tables_of(a);
  const int64_t count = a.logits.size(0) * a.logits.size(2), node_stride = a.logits.stride(1);
  const PixelOffsets offset{a.logits.size(2), a.logits.stride(0), a.logits.stride(2)};
  const scalar_t* z_data = a.logits.const_data_ptr<scalar_t>();
  const int64_t* labels = a.labels.const_data_ptr<int64_t>();
  const acc_t* w = a.node_weights.const_data_ptr<acc_t>();
  acc_t* out = loss.data_ptr<acc_t>();
#if PROTOSEG_HAVE_AVX2_PATH
  if constexpr (std::is_same_v<acc_t, float>) {
    if (lanes_serve<acc_t>(t)) {
      const std::vector<int32_t> on_path = on_path_table(t);
      at::parallel_for(0, count, pixel_grain(t), [&](int64_t begin, int64_t end) {
        forward_lanes<scalar_t>(a, t, on_path.data(), gamma, eps, begin, end, out);
      });
      return;
    }
  }
#endif
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
#if PROTOSEG_HAVE_AVX2_PATH
  if constexpr (std::is_same_v<acc_t, float>) {
    if (lanes_serve<acc_t>(t)) {
      const std::vector<int32_t> on_path = on_path_table(t);
      at::parallel_for(0, count, pixel_grain(t), [&](int64_t begin, int64_t end) {
        backward_lanes<scalar_t>(a, t, on_path.data(), grad_loss, gamma, eps, begin, end, grad);
      });
      return;
    }
  }
#endif
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
