// The column side of the similarity engine (similarity_tiles.h): a set of M vectors of
// length D, prepared once per call in the compute dtype, normalised or raw, with
// optional int64 labels. Prototypes [C, K, D] are one client (M = C·K, grouped by
// class); a labelled memory bank [M, D] (docs/spec.md §10) is another.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <type_traits>

#include "common/math.h"
#include "cpu/vectorized.h"

namespace protoseg::cpu {

// Where each source row lands among the prepared columns. The source rows are the
// client's M vectors in memory order; for prototypes that is the flat index c·K + k.
//   as_given(M):             column j = source row j (no grouping).
//   by_class(C, K, ClassMajor):      column c·K + k, the same as as_given(C·K).
//   by_class(C, K, PrototypeMajor):  column k·C + c, so that a row of S holds K contiguous
//                                    vectors over the classes and every reduction over k
//                                    (max, argmax, log-sum-exp per class) is element-wise
//                                    over contiguous memory, which vectorises.
enum class ClassGrouping { ClassMajor, PrototypeMajor };

struct ColumnOrder {
  int64_t classes = 1;     // groups of `per_class` consecutive source rows
  int64_t per_class = 0;
  bool prototype_major = false;

  static ColumnOrder as_given(int64_t count) { return {1, count, false}; }
  static ColumnOrder by_class(int64_t classes, int64_t per_class, ClassGrouping grouping) {
    return {classes, per_class, grouping == ClassGrouping::PrototypeMajor};
  }

  int64_t count() const { return classes * per_class; }
  int64_t column_of(int64_t c, int64_t k) const {
    return prototype_major ? k * classes + c : c * per_class + k;
  }
  int64_t column_of(int64_t source) const {
    return prototype_major ? column_of(source / per_class, source % per_class) : source;
  }
  int64_t source_of(int64_t column) const {
    return prototype_major ? (column % classes) * per_class + column / classes : column;
  }
};

// M prepared columns. `hat` holds Ĉ (C itself when not normalising) and `sum_sq` the
// ‖C_j‖² of the raw vectors (read only when normalising; null otherwise), both in prepared
// order; `labels` (or null) too.
template <typename acc_t>
struct PreparedColumns {
  at::Tensor source;   // the client's tensor: the column gradient comes back in its shape and dtype
  at::Tensor storage;  // hat and sum_sq
  at::Tensor label_storage;
  const acc_t* hat = nullptr;        // [M, D]
  const acc_t* sum_sq = nullptr;     // [M]
  const int64_t* labels = nullptr;   // [M] or null
  int64_t count = 0;  // M
  int64_t dim = 0;    // D
  bool normalized = false;
  ColumnOrder order;
};

// Per-row work of at least ~16K elements per thread, so small problems stay serial.
inline int64_t row_grain(int64_t row_length) {
  return std::max<int64_t>(1, (int64_t{1} << 14) / std::max<int64_t>(1, row_length));
}

// Copies `rows` rows of length d into `out` in the compute dtype, normalised when asked,
// and stores each row's ‖x_i‖² in `sum_sq`.
template <typename scalar_t, typename acc_t>
void load_rows(const scalar_t* in, int64_t rows, int64_t d, bool normalize, acc_t* out, acc_t* sum_sq) {
  for (int64_t i = 0; i < rows; ++i) {
    const scalar_t* src = in + i * d;
    acc_t* dst = out + i * d;
    for (int64_t j = 0; j < d; ++j) dst[j] = static_cast<acc_t>(src[j]);
    const acc_t ss = sum_of_squares(dst, d);
    sum_sq[i] = ss;
    if (normalize) {
      const acc_t inv = inverse_norm(ss);
      for (int64_t j = 0; j < d; ++j) dst[j] *= inv;
    }
  }
}

// `labels` (a contiguous int64 [M] in source order, or undefined) in prepared order, kept
// alive by p.label_storage; null when undefined.
template <typename acc_t>
const int64_t* prepare_labels(PreparedColumns<acc_t>& p, const at::Tensor& labels) {
  if (!labels.defined()) return nullptr;
  TORCH_INTERNAL_ASSERT(labels.is_contiguous() && labels.scalar_type() == at::kLong && labels.numel() == p.count);
  p.label_storage = at::empty({p.count}, labels.options());
  const int64_t* in = labels.const_data_ptr<int64_t>();
  int64_t* out = p.label_storage.template data_ptr<int64_t>();
  for (int64_t row = 0; row < p.count; ++row) out[p.order.column_of(row)] = in[row];
  return out;
}

// Prepares the order.count() rows of length `dim` of the contiguous `source` (any shape
// with that many elements, dtype scalar_t). `labels`, when defined, is a contiguous
// int64 [M] in source order; it is stored in prepared order.
template <typename scalar_t, typename acc_t>
PreparedColumns<acc_t> prepare_columns(const at::Tensor& source, int64_t dim, bool normalize,
                                       const ColumnOrder& order, const at::Tensor& labels = at::Tensor()) {
  PreparedColumns<acc_t> p;
  p.source = source;
  p.count = order.count();
  p.dim = dim;
  p.normalized = normalize;
  p.order = order;
  TORCH_INTERNAL_ASSERT(source.is_contiguous() && source.numel() == p.count * dim);
  p.labels = prepare_labels(p, labels);
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    if (!normalize && !order.prototype_major) {
      // Raw columns in the compute dtype and in source order are used in place: no copy of
      // M·D (a memory bank of 190,000 × 256 is 190 MiB, copied per pass otherwise).
      p.storage = at::empty({0}, source.options());  // its options type the column gradient buffers
      p.hat = source.const_data_ptr<acc_t>();
      return p;
    }
  }
  p.storage = at::empty({p.count * dim + p.count},
                        source.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
  acc_t* hat = p.storage.template data_ptr<acc_t>();
  acc_t* sum_sq = hat + p.count * dim;
  const scalar_t* src = source.const_data_ptr<scalar_t>();
  at::parallel_for(0, p.count, row_grain(dim), [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t column = order.column_of(row);
      load_rows(src + row * dim, 1, dim, normalize, hat + column * dim, sum_sq + column);
    }
  });
  p.hat = hat;
  p.sum_sq = sum_sq;
  return p;
}

// Prototypes [C, K, D] (contiguous) as columns grouped by class.
template <typename scalar_t, typename acc_t>
PreparedColumns<acc_t> prepare_prototypes(const at::Tensor& prototypes, bool normalize, ClassGrouping grouping) {
  const ColumnOrder order = ColumnOrder::by_class(prototypes.size(0), prototypes.size(1), grouping);
  return prepare_columns<scalar_t, acc_t>(prototypes, prototypes.size(2), normalize, order);
}

}  // namespace protoseg::cpu
