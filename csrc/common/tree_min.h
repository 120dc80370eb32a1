// Per-pixel math of tree_min_loss (docs/spec.md §11.1), shared by the CPU and CUDA kernels
// (host-device inline) so the two backends cannot drift apart; it mirrors
// protoseg_kernels/reference/tree_min_loss.py term by term.
//
// A pixel reads its V logits through an accessor z(v) (the backends read them in place,
// through the logits' strides) and the tree through two tables, ancestors [V, L] and
// descendants [V, S], int64, rows ascending and padded with −1. An entry outside [0, V) is
// padding and a label outside [0, V) is an ignored pixel, so no value of a table or label
// makes a kernel address memory out of bounds.
#pragma once

#include <cmath>
#include <cstdint>

#include "common/math.h"

namespace protoseg {

using std::pow;

// The min's twin of replaces_max: v replaces best when it is strictly smaller, or when it
// is the first NaN (NaN wins, as in torch.min), so ties keep the first, i.e. smallest, node.
template <typename acc_t>
PROTOSEG_INLINE bool replaces_min(acc_t v, acc_t best) {
  return (v < best) | ((v != v) & (best == best));
}

// The tree as the kernels read it: both tables row-major and contiguous.
struct TreeTables {
  const int64_t* ancestors;    // [nodes, ancestor_width]: row v holds v and its ancestors
  const int64_t* descendants;  // [nodes, descendant_width]: row v holds v and its descendants
  int64_t nodes;               // V
  int64_t ancestor_width;      // L
  int64_t descendant_width;    // S
};

// An extremum of z over one table row and its first node; node −1 when the row holds no
// valid entry (never for a Hierarchy's tables, whose row v always holds v): then the value
// is ±inf and the backward routes nothing.
template <typename acc_t>
struct TreeExtremum {
  acc_t value;
  int64_t node;
};

// The first minimum (kLargest = false) or maximum (true) of z over row[0..width), entries
// outside [0, nodes) skipped. Rows ascend, so "first" is the smallest node index, as the
// reference's first hit along the row.
template <bool kLargest, typename acc_t, typename Logit>
PROTOSEG_INLINE TreeExtremum<acc_t> tree_first_extremum(const Logit& z, const int64_t* row, int64_t width,
                                                        int64_t nodes) {
  const acc_t lowest = neg_infinity<acc_t>();
  TreeExtremum<acc_t> best{kLargest ? lowest : -lowest, int64_t(-1)};
  for (int64_t k = 0; k < width; ++k) {
    const int64_t node = row[k];
    if (!index_in_range(node, nodes)) continue;
    const acc_t v = z(node);
    // The first valid entry always enters, also a −inf that cannot beat the initial −inf.
    const bool better = kLargest ? replaces_max(v, best.value) : replaces_min(v, best.value);
    if (best.node < 0 || better) best = {v, node};
  }
  return best;
}

// MCL_v: the min of z over v and its ancestors.
template <typename acc_t, typename Logit>
PROTOSEG_INLINE TreeExtremum<acc_t> tree_min_over_ancestors(const Logit& z, const TreeTables& t, int64_t v) {
  return tree_first_extremum<false, acc_t>(z, t.ancestors + v * t.ancestor_width, t.ancestor_width, t.nodes);
}

// MCM_v: the max of z over v and its descendants.
template <typename acc_t, typename Logit>
PROTOSEG_INLINE TreeExtremum<acc_t> tree_max_over_descendants(const Logit& z, const TreeTables& t, int64_t v) {
  return tree_first_extremum<true, acc_t>(z, t.descendants + v * t.descendant_width, t.descendant_width,
                                          t.nodes);
}

// True when node v is positive for a pixel labelled `label`: v is in row `label` of the
// ancestors (the label itself or one of its ancestors). `label` must be in [0, nodes).
PROTOSEG_INLINE bool tree_on_path(const TreeTables& t, int64_t label, int64_t v) {
  const int64_t* row = t.ancestors + label * t.ancestor_width;
  bool found = false;
  for (int64_t k = 0; k < t.ancestor_width; ++k) found |= row[k] == v;
  return found;
}

// The focal weight base^γ; γ = 0 is "no focal weight" (the reference multiplies by nothing
// then). γ = 2, HSSN's value, is a square, as torch.pow computes it.
template <typename acc_t>
PROTOSEG_INLINE acc_t tree_focal_weight(acc_t base, acc_t gamma) {
  return gamma == acc_t(2) ? base * base : pow(base, gamma);
}

// t of a positive node from m = MCL_v: −(1 − p)^γ·log(p + ε) with p = σ(m), 1 − p = σ(−m)
// (no cancellation for large m).
template <typename acc_t>
PROTOSEG_INLINE acc_t tree_positive_term(acc_t m, acc_t gamma, acc_t eps) {
  const acc_t term = -log(sigmoid(m) + eps);
  return gamma != acc_t(0) ? term * tree_focal_weight(sigmoid(-m), gamma) : term;
}

// t of a negative node from m = MCM_v: −q^γ·log(1 − q + ε) with q = σ(m), 1 − q = σ(−m).
template <typename acc_t>
PROTOSEG_INLINE acc_t tree_negative_term(acc_t m, acc_t gamma, acc_t eps) {
  const acc_t term = -log(sigmoid(-m) + eps);
  return gamma != acc_t(0) ? term * tree_focal_weight(sigmoid(m), gamma) : term;
}

// ∂t/∂m of a positive node: p(1 − p)^γ·[γ·log(p + ε) − (1 − p)/(p + ε)] (the chain rule
// through σ, dp/dm = p(1 − p), folded in).
template <typename acc_t>
PROTOSEG_INLINE acc_t tree_positive_slope(acc_t m, acc_t gamma, acc_t eps) {
  const acc_t p = sigmoid(m), one_minus_p = sigmoid(-m);
  const acc_t slope = p * (gamma * log(p + eps) - one_minus_p / (p + eps));
  return gamma != acc_t(0) ? slope * tree_focal_weight(one_minus_p, gamma) : slope;
}

// ∂t/∂m of a negative node: q^γ(1 − q)·[q/(1 − q + ε) − γ·log(1 − q + ε)].
template <typename acc_t>
PROTOSEG_INLINE acc_t tree_negative_slope(acc_t m, acc_t gamma, acc_t eps) {
  const acc_t q = sigmoid(m), one_minus_q = sigmoid(-m);
  const acc_t slope = one_minus_q * (q / (one_minus_q + eps) - gamma * log(one_minus_q + eps));
  return gamma != acc_t(0) ? slope * tree_focal_weight(q, gamma) : slope;
}

// One pixel's loss Σ_v w_v·t_v, in node order; 0 for an ignored pixel (label outside
// [0, V)). Only the extremum a node's sign needs is taken, so a NaN logit makes the loss
// NaN (it is the MCL or MCM of its own node) exactly when the reference's does.
template <typename acc_t, typename Logit, typename Weight>
PROTOSEG_INLINE acc_t tree_min_pixel_loss(const Logit& z, const Weight& weight, const TreeTables& t,
                                          int64_t label, acc_t gamma, acc_t eps) {
  acc_t loss = acc_t(0);
  if (!index_in_range(label, t.nodes)) return loss;
  for (int64_t v = 0; v < t.nodes; ++v) {
    const acc_t term = tree_on_path(t, label, v)
                           ? tree_positive_term(tree_min_over_ancestors<acc_t>(z, t, v).value, gamma, eps)
                           : tree_negative_term(tree_max_over_descendants<acc_t>(z, t, v).value, gamma, eps);
    loss += weight(v) * term;
  }
  return loss;
}

// One pixel's gradient: for each node v, in node order, add(node, value) with
// value = ∂t_v/∂m·(g·w_v) routed to the first arg-min of MCL_v (v positive) or the first
// arg-max of MCM_v (v negative). Nothing for an ignored pixel; the caller zeroes first.
template <typename acc_t, typename Logit, typename Weight, typename Add>
PROTOSEG_INLINE void tree_min_pixel_backward(const Logit& z, const Weight& weight, const TreeTables& t,
                                             int64_t label, acc_t grad, acc_t gamma, acc_t eps, Add add) {
  if (!index_in_range(label, t.nodes)) return;
  for (int64_t v = 0; v < t.nodes; ++v) {
    const bool positive = tree_on_path(t, label, v);
    const TreeExtremum<acc_t> e =
        positive ? tree_min_over_ancestors<acc_t>(z, t, v) : tree_max_over_descendants<acc_t>(z, t, v);
    if (e.node < 0) continue;
    const acc_t slope =
        positive ? tree_positive_slope(e.value, gamma, eps) : tree_negative_slope(e.value, gamma, eps);
    add(e.node, slope * (grad * weight(v)));
  }
}

}  // namespace protoseg
