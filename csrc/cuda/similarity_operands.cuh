// The operands of the column engine (similarity_tile, similarity_sweep,
// similarity_backward): rows x [N, D] (pixels, anchors) against a general column set
// [M, D] with optional per-column int64 labels, S_ij = ⟨x̂_i, ĉ_j⟩ (docs/spec.md §2).
//
// The engine knows nothing of what the columns are. Prototypes [C, K, D] are one client
// (M = C·K, unlabelled: an op that needs the class grouping K takes it as a parameter of
// its own and derives class j / K); a memory bank of M labelled vectors (docs/spec.md §10) is
// another (labels z_j, `ignore_index` for empty slots). Labels are handed to the op's
// Visitor / gradient rule with each column and never interpreted by the engine.
//
// A client op plugs in with three pieces and touches nothing of the engine:
//   1. prepare_operands(x, columns, normalize, stream, labels): the operands (the
//      columns may be x itself, for in-batch contrast);
//   2. forward: a Visitor (similarity_sweep.cuh) run by launch_similarity_sweep, one
//      per pass when a statistic needs another first, or its own tile kernel on
//      similarity_micro_tile when it writes S itself;
//   3. backward: a GradientRule (similarity_backward.cuh) run by
//      similarity_backward_from_rule, which returns dx and, when asked, dcolumns
//      (similarity_backward_both_roles_from_rule when the columns are x itself).
// The op's arguments reach the device as one Params struct per Visitor / rule.
#pragma once

#include "cuda/host.h"
#include "cuda/row_norms.cuh"
#include "cuda/tile_math.cuh"

namespace protoseg::cuda {

// The label a column without a label tensor carries.
constexpr int64_t kUnlabelled = -1;

// One column as the engine hands it to an op: its index j in [0, M) and its label
// (kUnlabelled when the column set has none).
struct Column {
  int64_t index;
  int64_t label;
};

// `count` contiguous vectors of the operands' D features and, when normalising, their
// inverse norms 1 / max(‖v‖, eps).
template <typename scalar_t, typename acc_t>
struct Vectors {
  const scalar_t* data;        // [count, d]
  const acc_t* inverse_norm;   // [count], or null for raw dot products
  int64_t count;

  // The factor that turns a raw dot product into a normalised one (1 outside the set).
  PROTOSEG_DEVICE acc_t scale(int64_t i) const { return (inverse_norm && i < count) ? inverse_norm[i] : acc_t(1); }
};

template <typename scalar_t, typename acc_t>
struct SimilarityOperands {
  Vectors<scalar_t, acc_t> rows;     // x [n, d]
  Vectors<scalar_t, acc_t> columns;  // [m, d]
  const int64_t* column_labels;      // [m], or null
  int64_t d;
  TileMath math;                     // chosen on the host (tile_math.cuh); kernels take it as a template argument

  // Column j (< m) with its label. Every thread of a warp reads the same label (a
  // broadcast); a client that ignores labels compiles the load away.
  PROTOSEG_DEVICE Column column(int64_t j) const { return Column{j, column_labels ? column_labels[j] : kUnlabelled}; }
};

// The operands of a launch sequence with the tensors they point to (kept alive here),
// for the host side of the engine (similarity_backward's launcher in particular).
template <typename scalar_t, typename acc_t>
struct PreparedOperands {
  at::Tensor x;        // [n, d], contiguous
  at::Tensor columns;  // contiguous, any shape [..., d]: the column gradient takes it
  at::Tensor x_inverse;
  at::Tensor column_inverse;
  at::Tensor column_labels;
  bool normalize;
  SimilarityOperands<scalar_t, acc_t> ops;
};

// x [n, d] and columns [..., d] (contiguous; leading dimensions flatten to M, so
// prototypes [C, K, d] give M = C·K), with optional labels [M] int64 (an undefined
// tensor: unlabelled), normalised by their inverse norms when `normalize`. The op
// validates labels' values; the engine only reads them.
template <typename scalar_t, typename acc_t>
PreparedOperands<scalar_t, acc_t> prepare_operands(const at::Tensor& x, const at::Tensor& columns, bool normalize,
                                                   cudaStream_t stream, const at::Tensor& column_labels = {}) {
  const int64_t n = x.size(0), d = x.size(1);
  const int64_t m = d > 0 ? columns.numel() / d : 0;
  TORCH_INTERNAL_ASSERT(x.is_contiguous() && columns.is_contiguous() && columns.size(-1) == d,
                        "similarity operands: x [n, d] and columns [..., d] must be contiguous");
  TORCH_INTERNAL_ASSERT(!column_labels.defined() || (column_labels.is_contiguous() && column_labels.numel() == m &&
                                                     column_labels.scalar_type() == at::kLong),
                        "similarity operands: column labels must be contiguous int64 [M]");
  PreparedOperands<scalar_t, acc_t> prepared;
  prepared.x = x;
  prepared.columns = columns;
  prepared.x_inverse = inverse_norms<scalar_t, acc_t>(x, n, d, normalize, stream);
  prepared.column_inverse = inverse_norms<scalar_t, acc_t>(columns, m, d, normalize, stream);
  prepared.column_labels = column_labels;
  prepared.normalize = normalize;
  auto& ops = prepared.ops;
  ops.rows = Vectors<scalar_t, acc_t>{data<scalar_t>(x), data_if_defined<acc_t>(prepared.x_inverse), n};
  ops.columns = Vectors<scalar_t, acc_t>{data<scalar_t>(columns), data_if_defined<acc_t>(prepared.column_inverse), m};
  ops.column_labels = column_labels.defined() ? data<int64_t>(column_labels) : nullptr;
  ops.d = d;
  ops.math = tile_math_for<scalar_t>();
  return prepared;
}

}  // namespace protoseg::cuda
