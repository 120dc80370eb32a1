// pixel_contrast_loss (docs/spec.md §10.1), ContrastiveSeg's supervised pixel contrast, on the
// column engine: the rows are the A anchors, the columns the M labelled entries of the
// contrast set (a memory bank, or in-batch the anchors themselves, where column i is never
// contrasted with row i). ℓ_ij = S_ij/τ; P(i) are the labelled columns of anchor i's class,
// N(i) the other labelled ones; s = τ/τ_b.
//
// Forward: per anchor, sweeps over the columns in a fixed order keeping online statistics
// in registers (nothing of size A·M; bitwise reproducible):
//   ContrastiveSeg, two sweeps, since each positive's term needs every negative first:
//     1. log N_i = log Σ_{k∈N(i)} e^{ℓ_ik}, an online max-shifted log-sum-exp;
//     2. with the final log N_i: the terms log(e^{ℓ_ip} + N_i) − ℓ_ip = softplus(log N_i − ℓ_ip),
//        |P(i)|, and log B_i = log Σ_p 1/(e^{ℓ_ip} + N_i) as an online log-sum-exp of
//        −(ℓ_ip + term_ip);  loss_i = s·Σ_p term_ip/|P(i)|.
//   SupCon, one sweep: LSE_i over P(i) ∪ N(i), Σ_p ℓ_ip and |P(i)|;
//     loss_i = s·(LSE_i − Σ_p ℓ_ip/|P(i)|).
//   loss_i = 0 where |P(i)| = 0. The kernels return loss, |P|, log N (SupCon: LSE) and log B.
//
// Backward: the logits are recomputed tile by tile and turned into dS = dℓ/τ in place (the
// gradient rule) from those per-anchor scalars alone, with w_i = g_i·s/|P(i)| (and every
// dℓ_ij = 0 where |P(i)| = 0):
//   ContrastiveSeg  dℓ_ip = −w_i·(1 − σ_ip) = −w_i·sigmoid(log N_i − ℓ_ip)   on P(i),
//                   dℓ_ik = w_i·e^{ℓ_ik}·B_i = w_i·e^{ℓ_ik + log B_i}       on N(i);
//   SupCon          dℓ_ij = g_i·s·e^{ℓ_ij − LSE_i} − w_i·[j ∈ P(i)]          on P(i) ∪ N(i).
// Every exponent is at most log |P(i)|, so τ = 1e-3 (|ℓ| up to 1000) cannot overflow. Then
// d â = dS·Ĉ (grad_x_kernel) and, for a contrast set that requires grad, d ĉ = dSᵀ·Â
// (grad_c_kernel: row splits summed in a fixed order, no float atomics), each through the
// normalisation. In-batch each anchor has both roles: the two products land in one buffer
// and are added before the normalisation.
//
// GEMM passes (one pass = an A×D×M similarity or product; in-batch M = A), forward +
// backward, as this backend realises them; each equals the floor of docs/spec.md §10.1
// without atomics:
//   ContrastiveSeg, constant bank          2 + 2 = 4  (backward: recompute S, dS·Ĉ)
//   ContrastiveSeg, contrast grad/in-batch 2 + 4 = 6  (the column sweep recomputes S again)
//   SupCon, constant bank                  1 + 2 = 3
//   SupCon, contrast grad/in-batch         1 + 4 = 5
// The per-entry math lives in csrc/common/math.h, shared with the CPU kernels.
#include "cuda/kernels.h"
#include "cuda/similarity_backward.cuh"
#include "cuda/similarity_sweep.cuh"

namespace protoseg::cuda {
namespace {

constexpr const char* kForward = "pixel_contrast_forward";
constexpr const char* kBackward = "pixel_contrast_backward";

// The anchors' side of every sweep and of the gradient rule: their labels and the op's
// options.
template <typename acc_t>
struct AnchorSide {
  const int64_t* labels;      // [A]: class >= 0, or -1 (takes no part)
  bool in_batch;              // column i is anchor i, never contrasted with row i
  acc_t inverse_temperature;  // 1/τ
  acc_t scale;                // s = τ/τ_b

  PROTOSEG_DEVICE int64_t label(int64_t row) const { return row >= 0 ? labels[row] : int64_t(-1); }

  PROTOSEG_DEVICE ContrastRole role(int64_t row, int64_t row_label, Column column) const {
    return contrast_role(row_label, column.label, in_batch && column.index == row);
  }
};

// ContrastiveSeg sweep 1: log N_i, the log-sum-exp of the negatives' logits.
template <typename acc_t>
struct NegativesVisitor {
  struct Params {
    AnchorSide<acc_t> anchors;
    acc_t* log_norm;  // [A]
  };

  PROTOSEG_DEVICE NegativesVisitor(const Params& params, int64_t row)
      : p(params), row(row), label(params.anchors.label(row)) {}

  PROTOSEG_DEVICE void visit(Column column, acc_t s) {
    if (p.anchors.role(row, label, column) == ContrastRole::kNegative) {
      negatives.add(s * p.anchors.inverse_temperature);
    }
  }

  PROTOSEG_DEVICE void finish() { p.log_norm[row] = negatives.value(); }

 private:
  const Params& p;
  int64_t row;
  int64_t label;
  OnlineLogSumExp<acc_t> negatives;
};

// ContrastiveSeg sweep 2, given the final log N_i: the positives' terms, |P(i)| and log B_i.
template <typename acc_t>
struct PositivesVisitor {
  struct Params {
    AnchorSide<acc_t> anchors;
    const acc_t* log_norm;  // [A], from sweep 1
    acc_t* loss;            // [A]
    int64_t* positives;     // [A]
    acc_t* log_b;           // [A]
  };

  PROTOSEG_DEVICE PositivesVisitor(const Params& params, int64_t row)
      : p(params),
        row(row),
        label(params.anchors.label(row)),
        log_norm(row >= 0 ? params.log_norm[row] : acc_t(0)) {}

  PROTOSEG_DEVICE void visit(Column column, acc_t s) {
    if (p.anchors.role(row, label, column) != ContrastRole::kPositive) return;
    const acc_t logit = s * p.anchors.inverse_temperature;
    const acc_t term = contrastiveseg_positive_term(logit, log_norm);  // log(e^ℓ + N) − ℓ
    terms += term;
    ++count;
    inverse_denominators.add(-(logit + term));  // log 1/(e^ℓ + N)
  }

  PROTOSEG_DEVICE void finish() {
    p.positives[row] = count;
    p.loss[row] = count > 0 ? p.anchors.scale * terms / acc_t(count) : acc_t(0);
    p.log_b[row] = inverse_denominators.value();
  }

 private:
  const Params& p;
  int64_t row;
  int64_t label;
  acc_t log_norm;
  acc_t terms = acc_t(0);
  int64_t count = 0;
  OnlineLogSumExp<acc_t> inverse_denominators;
};

// SupCon's one sweep: LSE_i over P(i) ∪ N(i), the positives' logit sum and |P(i)|.
template <typename acc_t>
struct SupConVisitor {
  struct Params {
    AnchorSide<acc_t> anchors;
    acc_t* loss;         // [A]
    int64_t* positives;  // [A]
    acc_t* log_norm;     // [A], LSE_i
  };

  PROTOSEG_DEVICE SupConVisitor(const Params& params, int64_t row)
      : p(params), row(row), label(params.anchors.label(row)) {}

  PROTOSEG_DEVICE void visit(Column column, acc_t s) {
    const ContrastRole role = p.anchors.role(row, label, column);
    if (role == ContrastRole::kNone) return;
    const acc_t logit = s * p.anchors.inverse_temperature;
    all.add(logit);
    if (role == ContrastRole::kPositive) {
      positive_logits += logit;
      ++count;
    }
  }

  PROTOSEG_DEVICE void finish() {
    const acc_t lse = all.value();
    p.positives[row] = count;
    p.log_norm[row] = lse;
    p.loss[row] = count > 0 ? p.anchors.scale * (lse - positive_logits / acc_t(count)) : acc_t(0);
  }

 private:
  const Params& p;
  int64_t row;
  int64_t label;
  acc_t positive_logits = acc_t(0);
  int64_t count = 0;
  OnlineLogSumExp<acc_t> all;
};

// dS_ij = dℓ_ij/τ from the forward's per-anchor scalars (the formulas at the top).
template <typename acc_t>
struct ContrastGradient {
  struct Params {
    AnchorSide<acc_t> anchors;
    const acc_t* grad_loss;    // [A], g_i
    const int64_t* positives;  // [A], |P(i)|
    const acc_t* log_norm;     // [A], log N_i (SupCon: LSE_i)
    const acc_t* log_b;        // [A] (ContrastiveSeg), or null (SupCon)
    bool supcon;
  };

  PROTOSEG_DEVICE explicit ContrastGradient(const Params& params) : p(params) {}

  PROTOSEG_DEVICE bool needs_similarity() const { return true; }

  PROTOSEG_DEVICE acc_t operator()(int64_t row, Column column, acc_t s) const {
    const int64_t count = p.positives[row];
    if (count <= 0) return acc_t(0);  // no positive (an ignored anchor included): w_i = 0
    const ContrastRole role = p.anchors.role(row, p.anchors.labels[row], column);
    if (role == ContrastRole::kNone) return acc_t(0);
    const acc_t coefficient = p.grad_loss[row] * p.anchors.scale;  // g_i·s
    const acc_t w = coefficient / acc_t(count);
    const acc_t logit = s * p.anchors.inverse_temperature;
    const acc_t grad_logit = p.supcon
                                 ? supcon_logit_gradient(role, coefficient, w, logit, p.log_norm[row])
                                 : contrastiveseg_logit_gradient(role, w, logit, p.log_norm[row], p.log_b[row]);
    return grad_logit * p.anchors.inverse_temperature;
  }

 private:
  const Params& p;
};

// ---- host side ------------------------------------------------------------------------

// The kernels' inputs, contiguous; in-batch the columns are the anchors themselves (the
// backward's both-roles gradient relies on it).
struct ContrastInputs {
  at::Tensor anchors;        // [A, D]
  at::Tensor anchor_labels;  // [A] int64
  at::Tensor columns;        // [M, D]
  at::Tensor column_labels;  // [M] int64
};

ContrastInputs checked_inputs(const char* kernel, const at::Tensor& anchors, const at::Tensor& anchor_labels,
                              const at::Tensor& contrast, const at::Tensor& contrast_labels, bool in_batch) {
  check_device(kernel, "anchors", anchors);
  check_device(kernel, "contrast", contrast);
  check_rank(kernel, "anchors", anchors, 2);
  check_rank(kernel, "contrast", contrast, 2);
  TORCH_CHECK(anchors.size(1) > 0, kernel, ": anchors must have D > 0 features, got shape ", anchors.sizes());
  TORCH_CHECK(contrast.size(1) == anchors.size(1), kernel, ": contrast must have shape [M, D=", anchors.size(1),
              "], got ", contrast.sizes());
  TORCH_CHECK(contrast.scalar_type() == anchors.scalar_type(), kernel, ": contrast must have anchors' dtype ",
              anchors.scalar_type(), ", got ", contrast.scalar_type());
  TORCH_CHECK(!in_batch || contrast.sizes() == anchors.sizes(), kernel,
              ": in-batch, contrast must be the anchors, got shape ", contrast.sizes(), " for anchors of shape ",
              anchors.sizes());
  check_tensor(kernel, "anchor_labels", anchor_labels, {anchors.size(0)}, at::kLong, anchors);
  check_tensor(kernel, "contrast_labels", contrast_labels, {contrast.size(0)}, at::kLong, anchors);
  const at::Tensor rows = anchors.contiguous();
  return ContrastInputs{rows, anchor_labels.contiguous(), in_batch ? rows : contrast.contiguous(),
                        contrast_labels.contiguous()};
}

void check_temperatures(const char* kernel, double temperature, double base_temperature) {
  TORCH_CHECK(temperature > 0, kernel, ": temperature must be positive, got ", temperature);
  TORCH_CHECK(base_temperature > 0, kernel, ": base_temperature must be positive, got ", base_temperature);
}

template <typename acc_t>
AnchorSide<acc_t> anchor_side(const ContrastInputs& inputs, bool in_batch, double temperature,
                              double base_temperature) {
  return AnchorSide<acc_t>{data<int64_t>(inputs.anchor_labels), in_batch, acc_t(1.0 / temperature),
                           acc_t(temperature / base_temperature)};
}

// The forward's outputs: loss, |P|, log N (SupCon: LSE) and log B (empty for SupCon).
struct ForwardOutputs {
  at::Tensor loss;
  at::Tensor positives;
  at::Tensor log_norm;
  at::Tensor log_b;
};

template <typename scalar_t, typename acc_t>
void contrastiveseg_forward(const SimilarityOperands<scalar_t, acc_t>& ops, const AnchorSide<acc_t>& anchors,
                            ForwardOutputs& out, cudaStream_t stream) {
  typename NegativesVisitor<acc_t>::Params negatives{anchors, mutable_data<acc_t>(out.log_norm)};
  launch_similarity_sweep<scalar_t, acc_t, NegativesVisitor<acc_t>>(ops, negatives, stream);
  typename PositivesVisitor<acc_t>::Params positives{anchors, data<acc_t>(out.log_norm),
                                                     mutable_data<acc_t>(out.loss),
                                                     mutable_data<int64_t>(out.positives),
                                                     mutable_data<acc_t>(out.log_b)};
  launch_similarity_sweep<scalar_t, acc_t, PositivesVisitor<acc_t>>(ops, positives, stream);
}

template <typename scalar_t, typename acc_t>
void supcon_forward(const SimilarityOperands<scalar_t, acc_t>& ops, const AnchorSide<acc_t>& anchors,
                    ForwardOutputs& out, cudaStream_t stream) {
  typename SupConVisitor<acc_t>::Params params{anchors, mutable_data<acc_t>(out.loss),
                                               mutable_data<int64_t>(out.positives),
                                               mutable_data<acc_t>(out.log_norm)};
  launch_similarity_sweep<scalar_t, acc_t, SupConVisitor<acc_t>>(ops, params, stream);
}

}  // namespace

TensorQuad pixel_contrast_forward(const at::Tensor& anchors_arg, const at::Tensor& anchor_labels_arg,
                                  const at::Tensor& contrast_arg, const at::Tensor& contrast_labels_arg, bool in_batch,
                                  bool normalize, double temperature, double base_temperature, bool supcon) {
  const ContrastInputs in =
      checked_inputs(kForward, anchors_arg, anchor_labels_arg, contrast_arg, contrast_labels_arg, in_batch);
  check_temperatures(kForward, temperature, base_temperature);
  const LaunchScope scope(in.anchors);
  const int64_t a = in.anchors.size(0);
  const at::TensorOptions acc_options = in.anchors.options().dtype(accumulate_dtype(in.anchors.scalar_type()));
  ForwardOutputs out{at::empty({a}, acc_options), at::empty({a}, in.anchors.options().dtype(at::kLong)),
                     at::empty({a}, acc_options), at::empty({supcon ? 0 : a}, acc_options)};
  dispatch_floating(in.anchors.scalar_type(), kForward, [&](auto tag) {
    using scalar_t = typename decltype(tag)::type;
    using acc_t = acc_type<scalar_t>;
    const auto prepared =
        prepare_operands<scalar_t, acc_t>(in.anchors, in.columns, normalize, scope.stream(), in.column_labels);
    const auto anchors = anchor_side<acc_t>(in, in_batch, temperature, base_temperature);
    if (supcon) {
      supcon_forward(prepared.ops, anchors, out, scope.stream());
    } else {
      contrastiveseg_forward(prepared.ops, anchors, out, scope.stream());
    }
  });
  return {out.loss, out.positives, out.log_norm, out.log_b};
}

TensorPair pixel_contrast_backward(const at::Tensor& grad_loss_arg, const at::Tensor& anchors_arg,
                                   const at::Tensor& anchor_labels_arg, const at::Tensor& contrast_arg,
                                   const at::Tensor& contrast_labels_arg, const at::Tensor& positives_arg,
                                   const at::Tensor& log_norm_arg, const at::Tensor& log_b_arg, bool in_batch,
                                   bool normalize, double temperature, double base_temperature, bool supcon,
                                   bool need_contrast_grad) {
  const ContrastInputs in =
      checked_inputs(kBackward, anchors_arg, anchor_labels_arg, contrast_arg, contrast_labels_arg, in_batch);
  check_temperatures(kBackward, temperature, base_temperature);
  const int64_t a = in.anchors.size(0);
  const at::ScalarType acc_dtype = accumulate_dtype(in.anchors.scalar_type());
  const auto grad_loss = prepare_grad(kBackward, "grad_loss", grad_loss_arg, {a}, acc_dtype, in.anchors);
  TORCH_CHECK(grad_loss.has_value(), kBackward, ": grad_loss must be a defined tensor");
  check_tensor(kBackward, "positives", positives_arg, {a}, at::kLong, in.anchors);
  check_tensor(kBackward, "log_norm", log_norm_arg, {a}, acc_dtype, in.anchors);
  if (!supcon) check_tensor(kBackward, "log_b", log_b_arg, {a}, acc_dtype, in.anchors);
  const at::Tensor positives = positives_arg.contiguous();
  const at::Tensor log_norm = log_norm_arg.contiguous();
  const at::Tensor log_b = supcon ? at::Tensor() : log_b_arg.contiguous();
  const LaunchScope scope(in.anchors);
  TensorPair result;
  dispatch_floating(in.anchors.scalar_type(), kBackward, [&](auto tag) {
    using scalar_t = typename decltype(tag)::type;
    using acc_t = acc_type<scalar_t>;
    using Rule = ContrastGradient<acc_t>;
    const auto prepared =
        prepare_operands<scalar_t, acc_t>(in.anchors, in.columns, normalize, scope.stream(), in.column_labels);
    typename Rule::Params params{anchor_side<acc_t>(in, in_batch, temperature, base_temperature),
                                 data<acc_t>(*grad_loss),
                                 data<int64_t>(positives),
                                 data<acc_t>(log_norm),
                                 supcon ? nullptr : data<acc_t>(log_b),
                                 supcon};
    if (in_batch) {  // the contrast set is the anchors: its gradient is part of d anchors
      result = {similarity_backward_both_roles_from_rule<Rule>(prepared, params, scope.stream()),
                at::empty({0}, in.anchors.options())};
    } else {
      result = similarity_backward_from_rule<Rule>(prepared, params, need_contrast_grad, scope.stream());
    }
  });
  return result;
}

}  // namespace protoseg::cuda

PROTOSEG_CUDA_KERNELS(m) {
  using namespace protoseg::cuda;
  PROTOSEG_KERNEL(m, pixel_contrast_forward);
  PROTOSEG_KERNEL(m, pixel_contrast_backward);
}
