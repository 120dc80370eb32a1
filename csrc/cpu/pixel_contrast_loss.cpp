// pixel_contrast_loss (docs/spec.md §10.1) on the CPU column engine (similarity_tiles.h):
// rows are the anchors, columns the contrast set (in-batch: the anchors themselves, row i
// never contrasted with column i), S = Â·Ĉᵀ in tiles of 128 rows × kColumnBlock columns,
// ℓ = S/τ. Nothing of A·M elements is allocated: each pass keeps per-anchor statistics.
//
// Forward.
//   ContrastiveSeg: pass 1 folds the negatives into an online max-shifted log N_i; pass 2,
//   with the final log N_i, sums the positives' terms softplus(log N_i − ℓ_ip) and folds
//   −log(e^{ℓ_ip} + N_i) into log B_i. Pass 2 only needs the positives: a column block that
//   holds none of the row tile's labels is skipped, GEMM included (visits()), so with
//   anchors grouped by label and a bank stored by class it costs about 1/C of a pass.
//   SupCon: one pass (online log-sum-exp over P ∪ N, Σ_p ℓ_ip and |P(i)|).
//   Both kernels run on the anchors sorted by label (LabelOrder), so any anchor order
//   benefits from a bank stored by class.
// Backward (dℓ from the saved scalars, see the pixel-contrast part of common/math.h; dS = dℓ/τ):
//   d anchors: one sweep over the rows (recompute, dÂ = dS·Ĉ). In-batch the same sweep also
//   returns the column role dSᵀ·Â through the engine's chunked column gradient, and the two
//   are added. A bank that needs its gradient gets a second sweep with the roles swapped
//   (rows = bank entries, columns = anchors, per-anchor scalars read by column), so its
//   gradient needs no [chunks, M, D] partials and no float atomics.
// GEMM passes (A×D×M products), forward + backward:
//   ContrastiveSeg, constant bank 2 + 2 (≈ 1 + 1/C + 2 with a bank stored by class);
//   ContrastiveSeg, bank gradient 2 + 4 (≈ 1 + 1/C + 4); in-batch 2 + 3 (≈ 1 + 1/C + 3);
//   SupCon, constant bank 1 + 2; bank gradient 1 + 4; in-batch 1 + 3.
#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "common/math.h"
#include "cpu/checks.h"
#include "cpu/kernels.h"
#include "cpu/similarity_tiles.h"

namespace protoseg::cpu {
namespace {

constexpr const char* kForward = "protoseg_kernels::pixel_contrast_forward";
constexpr const char* kBackward = "protoseg_kernels::pixel_contrast_backward";
// [128, 512] fp32 tiles of S stay in L2; the bank preset (M = 190,000) has ~370 blocks.
constexpr int64_t kColumnBlock = 512;

// The inputs of both kernels, checked and contiguous; in-batch the columns are the anchors.
struct ContrastInputs {
  at::Tensor anchors, anchor_labels, columns, column_labels;
};

ContrastInputs checked_inputs(const char* kernel, const at::Tensor& anchors, const at::Tensor& anchor_labels,
                              const at::Tensor& contrast, const at::Tensor& contrast_labels, bool in_batch) {
  TORCH_CHECK(anchors.dim() == 2 && anchors.size(1) > 0, kernel, ": anchors must be [A, D] with D > 0, got ",
              anchors.sizes());
  TORCH_CHECK(at::isFloatingType(anchors.scalar_type()), kernel, ": anchors must be floating, got ",
              anchors.scalar_type());
  ContrastInputs in;
  in.anchors = anchors.contiguous();
  in.anchor_labels = checked_index(kernel, "anchor_labels", anchor_labels, anchors.size(0));
  if (in_batch) {
    in.columns = in.anchors;
    in.column_labels = in.anchor_labels;
    return in;
  }
  TORCH_CHECK(contrast.dim() == 2 && contrast.size(1) == anchors.size(1), kernel,
              ": contrast must be [M, D] with D = ", anchors.size(1), ", got ", contrast.sizes());
  TORCH_CHECK(contrast.scalar_type() == anchors.scalar_type(), kernel,
              ": contrast must have the dtype of anchors, got ", contrast.scalar_type());
  in.columns = contrast.contiguous();
  in.column_labels = checked_index(kernel, "contrast_labels", contrast_labels, contrast.size(0));
  return in;
}

// Which columns of a tile a row takes part with: row label y >= 0 (callers skip y < 0);
// z_j < 0 (ignored) takes no part; in-batch the row's own column is no positive.
struct RowRole {
  int64_t label;
  int64_t self_in_tile;  // the row's own column within the tile, or -1
};

inline RowRole row_role(int64_t label, int64_t row, bool in_batch, int64_t column_begin, int64_t columns) {
  const int64_t self = row - column_begin;
  return {label, in_batch && self >= 0 && self < columns ? self : -1};
}

// ---- forward: pass 1 of ContrastiveSeg (log N_i) and SupCon's one pass ----------------

// max of s[j] over the j < n that `keep` (NaN-propagating); −inf when none is kept.
template <typename acc_t, typename Keep>
acc_t masked_max(const acc_t* s, int64_t n, const Keep& keep) {
  constexpr acc_t kNone = -std::numeric_limits<acc_t>::infinity();
  acc_t lanes[kLanes];
  std::fill(lanes, lanes + kLanes, kNone);
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes) {
    for (int64_t l = 0; l < kLanes; ++l) lanes[l] = keep(j + l) ? nan_max(lanes[l], s[j + l]) : lanes[l];
  }
  for (int64_t l = 0; j + l < n; ++l) lanes[l] = keep(j + l) ? nan_max(lanes[l], s[j + l]) : lanes[l];
  acc_t result = lanes[0];
  for (int64_t l = 1; l < kLanes; ++l) result = nan_max(result, lanes[l]);
  return result;
}

// Online max-shifted sum of e^{ℓ} over a row's columns that `keep`, in S units (ℓ = S·inv_tau).
template <typename acc_t>
struct ShiftedSum {
  acc_t max = -std::numeric_limits<acc_t>::infinity();
  acc_t sum = acc_t(0);

  template <typename Keep>
  void fold(const acc_t* s, int64_t n, acc_t inv_tau, const Keep& keep) {
    const acc_t block_max = masked_max(s, n, keep);
    if (block_max == -std::numeric_limits<acc_t>::infinity()) return;  // nothing kept here
    const acc_t shift = nan_max(max, block_max);
    const acc_t base = lse_shift(shift);  // 0 for an infinite max (math.h)
    const acc_t block_sum = lane_sum<acc_t>(n, [&](int64_t j) {
      return keep(j) ? vexp((s[j] - base) * inv_tau) : acc_t(0);
    });
    // The sum so far is relative to lse_shift(max); none yet (0) needs no rescaling.
    sum = (sum == acc_t(0) ? sum : sum * vexp((lse_shift(max) - base) * inv_tau)) + block_sum;
    max = shift;
  }

  // log Σ e^{ℓ}; −inf when nothing was kept (NaN stays NaN).
  acc_t log_value(acc_t inv_tau) const {
    return max == -std::numeric_limits<acc_t>::infinity() ? max : max * inv_tau + std::log(sum);
  }
};

// What every forward epilogue reads: labels, outputs and the temperatures.
template <typename acc_t>
struct ForwardParams {
  const int64_t* row_labels = nullptr;     // [A]
  bool in_batch = false;
  acc_t inv_tau = 1;
  acc_t scale = 1;                         // τ/τ_b
  acc_t* loss = nullptr;                   // [A]
  int64_t* positives = nullptr;            // [A]
  acc_t* log_norm = nullptr;               // [A]
  acc_t* log_b = nullptr;                  // [A] (ContrastiveSeg)
};

template <typename acc_t>
struct RowSums {
  std::vector<ShiftedSum<acc_t>> rows;
  std::vector<int64_t> count;
  std::vector<acc_t> positive_sum;
};

// Calls visit(i, r, role) for every row i of the tile whose anchor r is labelled: an
// ignored anchor takes no part in any pass.
template <typename acc_t, typename Visit>
void for_each_labelled_row(const ForwardParams<acc_t>& p, const Tile<acc_t>& tile, const Visit& visit) {
  for (int64_t i = 0; i < tile.rows; ++i) {
    const int64_t r = tile.row_begin + i;
    const int64_t y = p.row_labels[r];
    if (y >= 0) visit(i, r, row_role(y, r, p.in_batch, tile.column_begin, tile.columns));
  }
}

// ContrastiveSeg pass 1: log N_i over the negatives (z_j >= 0, z_j != y_i; never self).
template <typename acc_t>
struct NegativesPass {
  ForwardParams<acc_t> p;
  using State = RowSums<acc_t>;

  State make_state(const TileShape& shape) const { return {std::vector<ShiftedSum<acc_t>>(shape.max_rows), {}, {}}; }
  void begin_rows(State& st, int64_t, int64_t rows) const { std::fill_n(st.rows.begin(), rows, ShiftedSum<acc_t>{}); }
  void operator()(State& st, const Tile<acc_t>& tile) const {
    const int64_t* z = tile.labels;
    for_each_labelled_row(p, tile, [&](int64_t i, int64_t, const RowRole& role) {
      const int64_t y = role.label;
      st.rows[i].fold(tile.row(i), tile.columns, p.inv_tau, [&](int64_t j) { return (z[j] >= 0) & (z[j] != y); });
    });
  }
  void end_rows(State& st, int64_t r0, int64_t rows) const {
    for (int64_t i = 0; i < rows; ++i) p.log_norm[r0 + i] = st.rows[i].log_value(p.inv_tau);
  }
};

// SupCon's one pass: log-sum-exp over P(i) ∪ N(i), |P(i)| and Σ_p S_ip.
template <typename acc_t>
struct SupConPass {
  ForwardParams<acc_t> p;
  using State = RowSums<acc_t>;

  State make_state(const TileShape& shape) const {
    return {std::vector<ShiftedSum<acc_t>>(shape.max_rows), std::vector<int64_t>(shape.max_rows),
            std::vector<acc_t>(shape.max_rows)};
  }
  void begin_rows(State& st, int64_t, int64_t rows) const {
    std::fill_n(st.rows.begin(), rows, ShiftedSum<acc_t>{});
    std::fill_n(st.count.begin(), rows, 0);
    std::fill_n(st.positive_sum.begin(), rows, acc_t(0));
  }
  void operator()(State& st, const Tile<acc_t>& tile) const {
    const int64_t* z = tile.labels;
    for_each_labelled_row(p, tile, [&](int64_t i, int64_t, const RowRole& role) {
      const acc_t* s = tile.row(i);
      st.rows[i].fold(s, tile.columns, p.inv_tau,
                      [&](int64_t j) { return (z[j] >= 0) & (j != role.self_in_tile); });
      for (int64_t j = 0; j < tile.columns; ++j) {
        if (z[j] != role.label || j == role.self_in_tile) continue;
        ++st.count[i];
        st.positive_sum[i] += s[j];
      }
    });
  }
  void end_rows(State& st, int64_t r0, int64_t rows) const {
    for (int64_t i = 0; i < rows; ++i) {
      const int64_t r = r0 + i, count = st.count[i];
      const acc_t lse = st.rows[i].log_value(p.inv_tau);
      p.positives[r] = count;
      p.log_norm[r] = lse;
      p.loss[r] = count > 0 ? p.scale * (lse - st.positive_sum[i] * p.inv_tau / acc_t(count)) : acc_t(0);
    }
  }
};

// ---- forward: pass 2 of ContrastiveSeg (the positives) --------------------------------

// Sorted distinct labels (>= 0) of labels[begin, end).
std::vector<int64_t> distinct_labels(const int64_t* labels, int64_t begin, int64_t end) {
  std::vector<int64_t> out;
  for (int64_t j = begin; j < end; ++j) {
    if (labels[j] >= 0) out.push_back(labels[j]);
  }
  std::sort(out.begin(), out.end());
  out.erase(std::unique(out.begin(), out.end()), out.end());
  return out;
}

bool share_a_label(const std::vector<int64_t>& a, const std::vector<int64_t>& b) {
  auto i = a.begin();
  auto j = b.begin();
  while (i != a.end() && j != b.end()) {
    if (*i == *j) return true;
    *i < *j ? ++i : ++j;
  }
  return false;
}

template <typename acc_t>
struct PositivesState {
  std::vector<int64_t> count;
  std::vector<acc_t> term_sum;
  std::vector<OnlineLogSumExp<acc_t>> log_b;
  std::vector<int64_t> tile_labels;
};

template <typename acc_t>
struct PositivesPass {
  ForwardParams<acc_t> p;
  const int64_t* anchor_labels = nullptr;
  std::vector<std::vector<int64_t>> block_labels;  // per column block of width block_width
  int64_t block_width = 1;
  using State = PositivesState<acc_t>;

  State make_state(const TileShape& shape) const {
    return {std::vector<int64_t>(shape.max_rows), std::vector<acc_t>(shape.max_rows),
            std::vector<OnlineLogSumExp<acc_t>>(shape.max_rows), {}};
  }
  void begin_rows(State& st, int64_t r0, int64_t rows) const {
    std::fill_n(st.count.begin(), rows, 0);
    std::fill_n(st.term_sum.begin(), rows, acc_t(0));
    std::fill_n(st.log_b.begin(), rows, OnlineLogSumExp<acc_t>{});
    st.tile_labels = distinct_labels(p.row_labels, r0, r0 + rows);
  }
  bool visits(const State& st, int64_t column_begin, int64_t) const {
    return share_a_label(st.tile_labels, block_labels[column_begin / block_width]);
  }
  void operator()(State& st, const Tile<acc_t>& tile) const {
    for_each_labelled_row(p, tile, [&](int64_t i, int64_t r, const RowRole& role) {
      const acc_t log_norm = p.log_norm[r];
      const acc_t* s = tile.row(i);
      for (int64_t j = 0; j < tile.columns; ++j) {
        if (tile.labels[j] != role.label || j == role.self_in_tile) continue;
        const acc_t logit = s[j] * p.inv_tau;
        const acc_t term = contrastiveseg_positive_term(logit, log_norm);
        ++st.count[i];
        st.term_sum[i] += term;
        st.log_b[i].add(-logit - term);  // −log(e^{ℓ_ip} + N_i)
      }
    });
  }
  void end_rows(State& st, int64_t r0, int64_t rows) const {
    for (int64_t i = 0; i < rows; ++i) {
      const int64_t r = r0 + i, count = st.count[i];
      p.positives[r] = count;
      p.log_b[r] = st.log_b[i].value();
      p.loss[r] = count > 0 ? p.scale * st.term_sum[i] / acc_t(count) : acc_t(0);
    }
  }
};

template <typename acc_t>
std::vector<std::vector<int64_t>> labels_per_block(const PreparedColumns<acc_t>& cols, const ColumnBlocks& blocks) {
  std::vector<std::vector<int64_t>> out(blocks.count);
  at::parallel_for(0, blocks.count, 16, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      out[b] = distinct_labels(cols.labels, blocks.begin(b), blocks.begin(b) + blocks.size(b));
    }
  });
  return out;
}

// The anchors sorted by label (stable): the kernels run on that order, so that a row tile
// holds few labels and the positives' pass skips most column blocks whatever order the
// caller's anchors come in (raster order for dense anchors); results are put back in
// the caller's order. Costs a copy of the anchors (A·D), nothing of A·M.
struct LabelOrder {
  at::Tensor order;  // [A] int64: sorted position -> caller's row

  explicit LabelOrder(const at::Tensor& labels) : order(labels.argsort(/*stable=*/true)) {}

  at::Tensor grouped(const at::Tensor& per_anchor) const { return per_anchor.index_select(0, order).contiguous(); }

  ContrastInputs grouped(const ContrastInputs& in, bool in_batch) const {
    ContrastInputs out = in;
    out.anchors = grouped(in.anchors);
    out.anchor_labels = grouped(in.anchor_labels);
    if (in_batch) {
      out.columns = out.anchors;
      out.column_labels = out.anchor_labels;
    }
    return out;
  }

  at::Tensor ungrouped(const at::Tensor& sorted) const {
    at::Tensor out = at::empty_like(sorted);
    out.index_copy_(0, order, sorted);
    return out;
  }
};

template <typename scalar_t, typename acc_t>
void forward_impl(const ContrastInputs& in, bool in_batch, bool normalize, double temperature,
                  double base_temperature, bool supcon, ForwardParams<acc_t> params) {
  const auto cols = prepare_columns<scalar_t, acc_t>(in.columns, in.anchors.size(1), normalize,
                                                     ColumnOrder::as_given(in.columns.size(0)), in.column_labels);
  params.row_labels = in.anchor_labels.const_data_ptr<int64_t>();
  params.in_batch = in_batch;
  params.inv_tau = acc_t(1) / static_cast<acc_t>(temperature);
  params.scale = static_cast<acc_t>(temperature / base_temperature);
  const SweepOptions options{normalize, kColumnBlock};
  if (supcon) {
    similarity_sweep<scalar_t, acc_t>(in.anchors, cols, options, SupConPass<acc_t>{params});
    return;
  }
  similarity_sweep<scalar_t, acc_t>(in.anchors, cols, options, NegativesPass<acc_t>{params});
  const ColumnBlocks blocks = ColumnBlocks::make(cols.count, kColumnBlock);
  PositivesPass<acc_t> positives;
  positives.p = params;
  positives.block_labels = labels_per_block(cols, blocks);
  positives.block_width = std::max<int64_t>(1, blocks.width);
  similarity_sweep<scalar_t, acc_t>(in.anchors, cols, options, positives);
}

// ---- backward ----------------------------------------------------------------------

// Per-anchor coefficients of dℓ: coefficient_i = g_i·τ/τ_b and w_i = coefficient_i/|P(i)|,
// both 0 for an anchor without positives (it has no loss).
template <typename acc_t>
struct AnchorCoefficients {
  at::Tensor storage;
  const acc_t* coefficient = nullptr;
  const acc_t* w = nullptr;
};

template <typename acc_t>
AnchorCoefficients<acc_t> anchor_coefficients(const at::Tensor& grad_loss, const int64_t* positives, int64_t a,
                                              acc_t scale) {
  AnchorCoefficients<acc_t> out;
  out.storage = at::empty({2, a}, grad_loss.options());
  acc_t* coefficient = out.storage.template data_ptr<acc_t>();
  acc_t* w = coefficient + a;
  const acc_t* g = grad_loss.const_data_ptr<acc_t>();
  for (int64_t i = 0; i < a; ++i) {
    coefficient[i] = positives[i] > 0 ? g[i] * scale : acc_t(0);
    w[i] = positives[i] > 0 ? coefficient[i] / acc_t(positives[i]) : acc_t(0);
  }
  out.coefficient = coefficient;
  out.w = w;
  return out;
}

template <typename acc_t>
struct BackwardParams {
  const int64_t* anchor_labels = nullptr;
  const int64_t* positives = nullptr;
  const acc_t* log_norm = nullptr;
  const acc_t* log_b = nullptr;  // ContrastiveSeg only
  AnchorCoefficients<acc_t> coefficients;
  bool in_batch = false;
  bool supcon = false;
  acc_t inv_tau = 1;
};

// dS for rows = anchors: every row's scalars are constants across the tile row.
template <typename acc_t>
struct AnchorRowsGrad : StatelessClient {
  BackwardParams<acc_t> p;

  void operator()(NoState&, const Tile<acc_t>& tile) const {
    for (int64_t i = 0; i < tile.rows; ++i) {
      const int64_t r = tile.row_begin + i;
      acc_t* s = tile.row(i);
      const int64_t y = p.anchor_labels[r];
      if (y < 0 || p.positives[r] == 0) {
        std::fill(s, s + tile.columns, acc_t(0));
        continue;
      }
      const RowRole role = row_role(y, r, p.in_batch, tile.column_begin, tile.columns);
      p.supcon ? supcon_row(s, tile, r, y) : contrastiveseg_row(s, tile, r, y);
      if (role.self_in_tile >= 0) s[role.self_in_tile] = acc_t(0);
    }
  }

  void contrastiveseg_row(acc_t* s, const Tile<acc_t>& tile, int64_t r, int64_t y) const {
    const int64_t* z = tile.labels;
    const acc_t inv_tau = p.inv_tau, w = p.coefficients.w[r], log_norm = p.log_norm[r], log_b = p.log_b[r];
    for (int64_t j = 0; j < tile.columns; ++j) {  // positives (about 1/C of the columns)
      if (z[j] != y) continue;
      s[j] = contrastiveseg_logit_gradient(ContrastRole::kPositive, w, s[j] * inv_tau, log_norm, log_b) * inv_tau;
    }
    const acc_t w_tau = w * inv_tau;
    for (int64_t j = 0; j < tile.columns; ++j) {  // negatives, vectorised; positives kept
      const acc_t negative = w_tau * vexp(s[j] * inv_tau + log_b);
      s[j] = (z[j] >= 0) & (z[j] != y) ? negative : (z[j] == y ? s[j] : acc_t(0));
    }
  }

  void supcon_row(acc_t* s, const Tile<acc_t>& tile, int64_t r, int64_t y) const {
    const int64_t* z = tile.labels;
    const acc_t inv_tau = p.inv_tau, log_norm = p.log_norm[r];
    const acc_t c_tau = p.coefficients.coefficient[r] * inv_tau, w_tau = p.coefficients.w[r] * inv_tau;
    for (int64_t j = 0; j < tile.columns; ++j) {
      const acc_t value = c_tau * vexp(s[j] * inv_tau - log_norm) - (z[j] == y ? w_tau : acc_t(0));
      s[j] = z[j] >= 0 ? value : acc_t(0);
    }
  }
};

// dSᵀ for rows = bank entries j (label z_j) and columns = anchors i: the anchors' scalars
// vary along the tile row, the entry's label is constant.
template <typename acc_t>
struct BankRowsGrad : StatelessClient {
  BackwardParams<acc_t> p;
  const int64_t* bank_labels = nullptr;

  void operator()(NoState&, const Tile<acc_t>& tile) const {
    for (int64_t r = 0; r < tile.rows; ++r) {
      acc_t* s = tile.row(r);
      const int64_t z = bank_labels[tile.row_begin + r];
      if (z < 0) {
        std::fill(s, s + tile.columns, acc_t(0));
        continue;
      }
      for (int64_t k = 0; k < tile.columns; ++k) s[k] = element(s[k], tile.column_begin + k, z);
    }
  }

  acc_t element(acc_t similarity, int64_t anchor, int64_t z) const {
    if (p.positives[anchor] == 0) return acc_t(0);  // ignored anchors have no positive
    const acc_t logit = similarity * p.inv_tau, w = p.coefficients.w[anchor];
    const ContrastRole role = contrast_role(p.anchor_labels[anchor], z, false);
    const acc_t d_logit =
        p.supcon ? supcon_logit_gradient(role, p.coefficients.coefficient[anchor], w, logit, p.log_norm[anchor])
                 : contrastiveseg_logit_gradient(role, w, logit, p.log_norm[anchor], p.log_b[anchor]);
    return d_logit * p.inv_tau;
  }
};

template <typename scalar_t, typename acc_t>
std::tuple<at::Tensor, at::Tensor> backward_impl(const ContrastInputs& in, bool in_batch, bool normalize,
                                                 bool need_contrast_grad, BackwardParams<acc_t> params) {
  const int64_t d = in.anchors.size(1);
  BackwardOptions options;
  options.normalize_rows = normalize;
  options.column_block = kColumnBlock;
  if (in_batch) {
    // Both roles of each anchor, added in the compute dtype before the one rounding.
    const at::Tensor anchors = in.anchors.to(c10::CppTypeToScalarType<acc_t>::value);
    const auto cols = prepare_columns<acc_t, acc_t>(anchors, d, normalize, ColumnOrder::as_given(anchors.size(0)),
                                                    in.anchor_labels);
    options.need_column_grad = true;
    auto [as_rows, as_columns] = similarity_backward_sweep<acc_t, acc_t>(anchors, cols, options,
                                                                         AnchorRowsGrad<acc_t>{{}, params});
    return {as_rows.add_(as_columns).to(in.anchors.scalar_type()), at::empty({0}, in.anchors.options())};
  }
  const auto bank = prepare_columns<scalar_t, acc_t>(in.columns, d, normalize,
                                                     ColumnOrder::as_given(in.columns.size(0)), in.column_labels);
  at::Tensor grad_anchors =
      std::get<0>(similarity_backward_sweep<scalar_t, acc_t>(in.anchors, bank, options, AnchorRowsGrad<acc_t>{{}, params}));
  if (!need_contrast_grad) return {grad_anchors, at::empty({0}, in.anchors.options())};
  const auto anchor_columns = prepare_columns<scalar_t, acc_t>(
      in.anchors, d, normalize, ColumnOrder::as_given(in.anchors.size(0)), in.anchor_labels);
  BankRowsGrad<acc_t> bank_rows;
  bank_rows.p = params;
  bank_rows.bank_labels = in.column_labels.const_data_ptr<int64_t>();
  at::Tensor grad_bank =
      std::get<0>(similarity_backward_sweep<scalar_t, acc_t>(in.columns, anchor_columns, options, bank_rows));
  return {grad_anchors, grad_bank};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> pixel_contrast_forward(
    const at::Tensor& anchors, const at::Tensor& anchor_labels, const at::Tensor& contrast,
    const at::Tensor& contrast_labels, bool in_batch, bool normalize, double temperature, double base_temperature,
    bool supcon) {
  const ContrastInputs given = checked_inputs(kForward, anchors, anchor_labels, contrast, contrast_labels, in_batch);
  const LabelOrder order(given.anchor_labels);
  const ContrastInputs in = order.grouped(given, in_batch);
  const int64_t a = in.anchors.size(0);
  const auto options = in.anchors.options().dtype(compute_dtype(in.anchors.scalar_type()));
  at::Tensor loss = at::empty({a}, options), log_norm = at::empty({a}, options);
  at::Tensor positives = at::empty({a}, options.dtype(at::kLong));
  at::Tensor log_b = at::empty({supcon ? 0 : a}, options);
  PROTOSEG_DISPATCH_FLOATING(in.anchors.scalar_type(), kForward, [&] {
    ForwardParams<acc_t> params;
    params.loss = loss.data_ptr<acc_t>();
    params.positives = positives.data_ptr<int64_t>();
    params.log_norm = log_norm.data_ptr<acc_t>();
    params.log_b = supcon ? nullptr : log_b.data_ptr<acc_t>();
    forward_impl<scalar_t, acc_t>(in, in_batch, normalize, temperature, base_temperature, supcon, params);
  });
  return {order.ungrouped(loss), order.ungrouped(positives), order.ungrouped(log_norm),
          supcon ? log_b : order.ungrouped(log_b)};
}

std::tuple<at::Tensor, at::Tensor> pixel_contrast_backward(
    const at::Tensor& grad_loss, const at::Tensor& anchors, const at::Tensor& anchor_labels,
    const at::Tensor& contrast, const at::Tensor& contrast_labels, const at::Tensor& positives_in,
    const at::Tensor& log_norm_in, const at::Tensor& log_b_in, bool in_batch, bool normalize, double temperature,
    double base_temperature, bool supcon, bool need_contrast_grad) {
  const ContrastInputs given = checked_inputs(kBackward, anchors, anchor_labels, contrast, contrast_labels, in_batch);
  const LabelOrder order(given.anchor_labels);
  const ContrastInputs in = order.grouped(given, in_batch);
  const int64_t a = in.anchors.size(0);
  const auto acc_dtype = compute_dtype(in.anchors.scalar_type());
  const at::Tensor positives = order.grouped(checked_index(kBackward, "positives", positives_in, a));
  const at::Tensor grad = order.grouped(checked_values(kBackward, "grad_loss", grad_loss, a, acc_dtype));
  const at::Tensor log_norm = order.grouped(checked_values(kBackward, "log_norm", log_norm_in, a, acc_dtype));
  const at::Tensor log_b =
      supcon ? at::Tensor() : order.grouped(checked_values(kBackward, "log_b", log_b_in, a, acc_dtype));
  std::tuple<at::Tensor, at::Tensor> result;
  PROTOSEG_DISPATCH_FLOATING(in.anchors.scalar_type(), kBackward, [&] {
    BackwardParams<acc_t> params;
    params.anchor_labels = in.anchor_labels.const_data_ptr<int64_t>();
    params.positives = positives.const_data_ptr<int64_t>();
    params.log_norm = log_norm.const_data_ptr<acc_t>();
    params.log_b = supcon ? nullptr : log_b.const_data_ptr<acc_t>();
    params.in_batch = in_batch;
    params.supcon = supcon;
    params.inv_tau = acc_t(1) / static_cast<acc_t>(temperature);
    params.coefficients = anchor_coefficients<acc_t>(grad, params.positives, a,
                                                     static_cast<acc_t>(temperature / base_temperature));
    result = backward_impl<scalar_t, acc_t>(in, in_batch, normalize, need_contrast_grad && !in_batch, params);
  });
  return {order.ungrouped(std::get<0>(result)), std::get<1>(result)};
}

}  // namespace protoseg::cpu

PROTOSEG_CPU_KERNELS(m) {
  using namespace protoseg::cpu;
  PROTOSEG_KERNEL(m, pixel_contrast_forward);
  PROTOSEG_KERNEL(m, pixel_contrast_backward);
}
