// The kernel schemas of the compiled backends: the one C++ list of the kernels of the
// contract in protoseg_kernels/_kernel_interface.py (same names, same arguments), grouped
// by public op as in the op table protoseg_kernels/_op_table.py
// (tests/test_op_inventory.py checks that the three agree). Defined once per extension by
// csrc/ops.cpp, in the namespace of csrc/registration.h; each backend source registers
// its own implementations.
#pragma once

#include <torch/library.h>

namespace protoseg {

inline void define_kernel_schemas(torch::Library& m) {
  // prototype_similarity
  m.def("similarity_forward(Tensor x, Tensor prototypes, bool normalize) -> Tensor");
  m.def(
      "similarity_backward(Tensor grad, Tensor x, Tensor prototypes, bool normalize, "
      "bool need_prototype_grad) -> (Tensor, Tensor)");
  // class_scores
  m.def(
      "class_scores_forward(Tensor x, Tensor prototypes, bool normalize, str reduction, "
      "float temperature, float? lse_temperature) -> (Tensor, Tensor, Tensor)");
  m.def(
      "class_scores_backward(Tensor? grad_scores, Tensor? grad_lse, Tensor x, Tensor prototypes, "
      "Tensor index, Tensor lse, bool normalize, str reduction, float temperature, "
      "float? lse_temperature, bool need_prototype_grad) -> (Tensor, Tensor)");
  // ppc_ppd_loss
  m.def(
      "ppc_ppd_forward(Tensor x, Tensor prototypes, Tensor target, bool normalize, "
      "float temperature) -> (Tensor, Tensor, Tensor)");
  m.def(
      "ppc_ppd_backward(Tensor? grad_ppc, Tensor? grad_ppd, Tensor x, Tensor prototypes, "
      "Tensor target, Tensor lse, bool normalize, float temperature, bool need_prototype_grad) "
      "-> (Tensor, Tensor)");
  // sinkhorn_assign
  m.def(
      "sinkhorn_logits(Tensor x, Tensor prototypes, Tensor segment, bool normalize, "
      "float epsilon) -> Tensor");
  m.def(
      "sinkhorn_class_logsumexp(Tensor logits, Tensor segment, int num_classes) "
      "-> (Tensor, Tensor)");
  m.def("sinkhorn_marginals(Tensor logits, Tensor segment, Tensor beta) -> Tensor");
  m.def(
      "sinkhorn_finalize(Tensor logits, Tensor segment, Tensor beta, bool return_q) "
      "-> (Tensor, Tensor)");
  // update_prototypes
  m.def(
      "prototype_sums(Tensor x, Tensor key, int num_prototypes, bool normalize) "
      "-> (Tensor, Tensor)");
  m.def(
      "momentum_update(Tensor prototypes, Tensor sums, Tensor counts, float momentum, "
      "bool normalize) -> Tensor");
  // pixel_contrast_loss
  m.def(
      "pixel_contrast_forward(Tensor anchors, Tensor anchor_labels, Tensor contrast, "
      "Tensor contrast_labels, bool in_batch, bool normalize, float temperature, "
      "float base_temperature, bool supcon) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "pixel_contrast_backward(Tensor grad_loss, Tensor anchors, Tensor anchor_labels, "
      "Tensor contrast, Tensor contrast_labels, Tensor positives, Tensor log_norm, Tensor log_b, "
      "bool in_batch, bool normalize, float temperature, float base_temperature, bool supcon, "
      "bool need_contrast_grad) -> (Tensor, Tensor)");
  // tree_min_loss
  m.def(
      "tree_min_forward(Tensor logits, Tensor labels, Tensor ancestors, Tensor descendants, "
      "Tensor node_weights, float focal_gamma, float eps) -> Tensor");
  m.def(
      "tree_min_backward(Tensor grad_loss, Tensor logits, Tensor labels, Tensor ancestors, "
      "Tensor descendants, Tensor node_weights, float focal_gamma, float eps) -> Tensor");
}

}  // namespace protoseg
