// The stage kernels of sinkhorn_assign (docs/spec.md §3.4); the β recurrence between them (and
// the all-reduces of a process group) is orchestrated by protoseg_kernels/sinkhorn_assign.py.
//
// logits: L_i = S[i, segment_i, :]/ε, K dot products per pixel (N·K·D work, no GEMM
// over all classes). The per-class reductions over pixels go through segmented_reduce
// (fixed chunks, fixed combine order); the per-pixel softmax is the shared
// sinkhorn_pixel_step of csrc/common/math.h.
#include <cmath>
#include <limits>
#include <vector>

#include "common/math.h"
#include "cpu/checks.h"
#include "cpu/columns.h"
#include "cpu/kernels.h"
#include "cpu/segmented.h"

namespace protoseg::cpu {
namespace {

constexpr const char* kLogits = "protoseg_kernels::sinkhorn_logits";
constexpr const char* kClassLse = "protoseg_kernels::sinkhorn_class_logsumexp";
constexpr const char* kMarginals = "protoseg_kernels::sinkhorn_marginals";
constexpr const char* kFinalize = "protoseg_kernels::sinkhorn_finalize";

template <typename scalar_t, typename acc_t>
void logits_impl(const at::Tensor& x, const at::Tensor& prototypes, const at::Tensor& segment, bool normalize,
                 double epsilon, at::Tensor& out) {
  const auto p = prepare_prototypes<scalar_t, acc_t>(prototypes, normalize, ClassGrouping::ClassMajor);
  const int64_t d = p.dim, classes = p.order.classes, per_class = p.order.per_class;
  const acc_t eps = static_cast<acc_t>(epsilon);
  const scalar_t* x_data = x.const_data_ptr<scalar_t>();
  const int64_t* seg = segment.const_data_ptr<int64_t>();
  acc_t* logits = out.data_ptr<acc_t>();
  at::parallel_for(0, x.size(0), row_grain(per_class * d), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> row(d);
    acc_t sum_sq;
    for (int64_t i = begin; i < end; ++i) {
      acc_t* dst = logits + i * per_class;
      if (!index_in_range(seg[i], classes)) {
        std::fill(dst, dst + per_class, acc_t(0));
        continue;
      }
      load_rows(x_data + i * d, 1, d, normalize, row.data(), &sum_sq);
      const acc_t* own = p.hat + p.order.column_of(seg[i], 0) * d;  // the K prototypes of the class
      dot_rows(row.data(), own, per_class, d, dst);
      for (int64_t k = 0; k < per_class; ++k) dst[k] /= eps;
    }
  });
}

struct StageShapes {
  int64_t rows, per_class;
};

StageShapes check_stage_inputs(const char* kernel, const at::Tensor& logits, const at::Tensor& segment) {
  TORCH_CHECK(logits.dim() == 2, kernel, ": logits must be [N, K], got ", logits.sizes());
  TORCH_CHECK(logits.scalar_type() == at::kFloat || logits.scalar_type() == at::kDouble, kernel,
              ": logits must be float32 or float64, got ", logits.scalar_type());
  checked_index(kernel, "segment", segment, logits.size(0));
  return {logits.size(0), logits.size(1)};
}

void check_beta(const char* kernel, const at::Tensor& beta, const at::Tensor& logits) {
  TORCH_CHECK(beta.dim() == 2 && beta.size(1) == logits.size(1), kernel, ": beta must be [C, K] with K = ",
              logits.size(1), ", got ", beta.sizes());
}

}  // namespace

at::Tensor sinkhorn_logits(const at::Tensor& x_in, const at::Tensor& prototypes_in, const at::Tensor& segment_in,
                           bool normalize, double epsilon) {
  at::Tensor x = x_in, prototypes = prototypes_in;
  check_features_and_prototypes(kLogits, x, prototypes);
  const at::Tensor segment = checked_index(kLogits, "segment", segment_in, x.size(0));
  at::Tensor out = at::empty({x.size(0), prototypes.size(1)}, x.options().dtype(compute_dtype(x.scalar_type())));
  PROTOSEG_DISPATCH_FLOATING(x.scalar_type(), kLogits, [&] {
    logits_impl<scalar_t, acc_t>(x, prototypes, segment, normalize, epsilon, out);
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> sinkhorn_class_logsumexp(const at::Tensor& logits_in, const at::Tensor& segment_in,
                                                            int64_t num_classes) {
  const auto shape = check_stage_inputs(kClassLse, logits_in, segment_in);
  TORCH_CHECK(num_classes >= 0, kClassLse, ": num_classes must be >= 0, got ", num_classes);
  const at::Tensor logits = logits_in.contiguous(), segment = segment_in.contiguous();
  const int64_t per_class = shape.per_class, width = num_classes * per_class;
  std::tuple<at::Tensor, at::Tensor> result;
  AT_DISPATCH_FLOATING_TYPES(logits.scalar_type(), kClassLse, [&] {
    using acc_t = scalar_t;
    const acc_t* l = logits.const_data_ptr<acc_t>();
    const int64_t* seg = segment.const_data_ptr<int64_t>();
    // Visits the valid pixels of rows [begin, end) as visit(pixel logits, class offset).
    const auto for_each_valid = [&](int64_t begin, int64_t end, const auto& visit) {
      for (int64_t i = begin; i < end; ++i) {
        if (index_in_range(seg[i], num_classes)) visit(l + i * per_class, seg[i] * per_class);
      }
    };
    const acc_t lowest = -std::numeric_limits<acc_t>::infinity();
    at::Tensor m = segmented_reduce<acc_t>(
        shape.rows, width, lowest, logits.options(),
        [&](int64_t begin, int64_t end, acc_t* part) {
          for_each_valid(begin, end, [&](const acc_t* row, int64_t at) {
            for (int64_t k = 0; k < per_class; ++k) part[at + k] = std::max(part[at + k], row[k]);
          });
        },
        [](acc_t a, acc_t b) { return std::max(a, b); });
    const acc_t* top = m.const_data_ptr<acc_t>();
    at::Tensor s = segmented_reduce<acc_t>(
        shape.rows, width, acc_t(0), logits.options(),
        [&](int64_t begin, int64_t end, acc_t* part) {
          for_each_valid(begin, end, [&](const acc_t* row, int64_t at) {
            for (int64_t k = 0; k < per_class; ++k) part[at + k] += std::exp(row[k] - top[at + k]);
          });
        },
        [](acc_t a, acc_t b) { return a + b; });
    result = {m.view({num_classes, per_class}), s.view({num_classes, per_class})};
  });
  return result;
}

at::Tensor sinkhorn_marginals(const at::Tensor& logits_in, const at::Tensor& segment_in, const at::Tensor& beta_in) {
  const auto shape = check_stage_inputs(kMarginals, logits_in, segment_in);
  check_beta(kMarginals, beta_in, logits_in);
  const at::Tensor logits = logits_in.contiguous(), segment = segment_in.contiguous();
  const at::Tensor beta = beta_in.to(logits.scalar_type()).contiguous();
  const int64_t num_classes = beta.size(0), per_class = shape.per_class;
  at::Tensor u;
  AT_DISPATCH_FLOATING_TYPES(logits.scalar_type(), kMarginals, [&] {
    using acc_t = scalar_t;
    const acc_t* l = logits.const_data_ptr<acc_t>();
    const acc_t* b = beta.const_data_ptr<acc_t>();
    const int64_t* seg = segment.const_data_ptr<int64_t>();
    u = segmented_reduce<acc_t>(
        shape.rows, num_classes * per_class, acc_t(0), logits.options(),
        [&](int64_t begin, int64_t end, acc_t* part) {
          for (int64_t i = begin; i < end; ++i) {
            if (!index_in_range(seg[i], num_classes)) continue;
            const acc_t* row = l + i * per_class;
            const acc_t* offsets = b + seg[i] * per_class;
            acc_t* out = part + seg[i] * per_class;
            sinkhorn_pixel_step<acc_t>([&](int64_t k) { return row[k]; }, [&](int64_t k) { return offsets[k]; },
                                       per_class, [&](int64_t k, acc_t q) { out[k] += q; });
          }
        },
        [](acc_t a, acc_t v) { return a + v; });
  });
  return u.view({num_classes, per_class});
}

std::tuple<at::Tensor, at::Tensor> sinkhorn_finalize(const at::Tensor& logits_in, const at::Tensor& segment_in,
                                                     const at::Tensor& beta_in, bool return_q) {
  const auto shape = check_stage_inputs(kFinalize, logits_in, segment_in);
  check_beta(kFinalize, beta_in, logits_in);
  const at::Tensor logits = logits_in.contiguous(), segment = segment_in.contiguous();
  const at::Tensor beta = beta_in.to(logits.scalar_type()).contiguous();
  const int64_t num_classes = beta.size(0), per_class = shape.per_class;
  at::Tensor index = at::empty({shape.rows}, segment.options());
  at::Tensor q = return_q ? at::empty({shape.rows, per_class}, logits.options()) : at::empty({0}, logits.options());
  AT_DISPATCH_FLOATING_TYPES(logits.scalar_type(), kFinalize, [&] {
    using acc_t = scalar_t;
    const acc_t* l = logits.const_data_ptr<acc_t>();
    const acc_t* b = beta.const_data_ptr<acc_t>();
    const int64_t* seg = segment.const_data_ptr<int64_t>();
    int64_t* index_out = index.data_ptr<int64_t>();
    acc_t* q_out = return_q ? q.data_ptr<acc_t>() : nullptr;
    at::parallel_for(0, shape.rows, row_grain(per_class * 8), [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        acc_t* q_row = return_q ? q_out + i * per_class : nullptr;
        if (!index_in_range(seg[i], num_classes)) {
          index_out[i] = -1;
          if (q_row != nullptr) std::fill(q_row, q_row + per_class, acc_t(0));
          continue;
        }
        const acc_t* row = l + i * per_class;
        const acc_t* offsets = b + seg[i] * per_class;
        index_out[i] = sinkhorn_pixel_step<acc_t>(
            [&](int64_t k) { return row[k]; }, [&](int64_t k) { return offsets[k]; }, per_class,
            [&](int64_t k, acc_t prob) {
              if (q_row != nullptr) q_row[k] = prob;
            });
      }
    });
  });
  return {index, q};
}

}  // namespace protoseg::cpu

PROTOSEG_CPU_KERNELS(m) {
  using namespace protoseg::cpu;
  PROTOSEG_KERNEL(m, sinkhorn_logits);
  PROTOSEG_KERNEL(m, sinkhorn_class_logsumexp);
  PROTOSEG_KERNEL(m, sinkhorn_marginals);
  PROTOSEG_KERNEL(m, sinkhorn_finalize);
}
