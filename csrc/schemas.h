// Kernel schemas of the compiled backends, one per kernel of the contract in
// protoseg_kernels/_kernel_interface.py (same names, prefixed with '_', same
// arguments). Registered once per namespace: `protoseg` for the real extension,
// `protoseg_emulated` for the host-emulation build of the CUDA kernels.
#pragma once

#include <torch/library.h>

namespace protoseg {

inline void define_kernel_schemas(torch::Library& m) {
  m.def("_similarity_forward(Tensor x, Tensor prototypes, bool normalize) -> Tensor");
  m.def(
      "_similarity_backward(Tensor grad, Tensor x, Tensor prototypes, bool normalize, "
      "bool need_prototype_grad) -> (Tensor, Tensor)");
  m.def(
      "_class_scores_forward(Tensor x, Tensor prototypes, bool normalize, str reduction, "
      "float temperature, float? lse_temperature) -> (Tensor, Tensor, Tensor)");
  m.def(
      "_class_scores_backward(Tensor? grad_scores, Tensor? grad_lse, Tensor x, Tensor prototypes, "
      "Tensor index, Tensor lse, bool normalize, str reduction, float temperature, "
      "float? lse_temperature, bool need_prototype_grad) -> (Tensor, Tensor)");
  m.def(
      "_ppc_ppd_forward(Tensor x, Tensor prototypes, Tensor target, bool normalize, "
      "float temperature) -> (Tensor, Tensor, Tensor)");
  m.def(
      "_ppc_ppd_backward(Tensor? grad_ppc, Tensor? grad_ppd, Tensor x, Tensor prototypes, "
      "Tensor target, Tensor lse, bool normalize, float temperature, bool need_prototype_grad) "
      "-> (Tensor, Tensor)");
  m.def(
      "_sinkhorn_logits(Tensor x, Tensor prototypes, Tensor segment, bool normalize, "
      "float epsilon) -> Tensor");
  m.def(
      "_sinkhorn_class_logsumexp(Tensor logits, Tensor segment, int num_classes) "
      "-> (Tensor, Tensor)");
  m.def("_sinkhorn_marginals(Tensor logits, Tensor segment, Tensor beta) -> Tensor");
  m.def(
      "_sinkhorn_finalize(Tensor logits, Tensor segment, Tensor beta, bool return_q) "
      "-> (Tensor, Tensor)");
  m.def(
      "_prototype_sums(Tensor x, Tensor key, int num_prototypes, bool normalize) "
      "-> (Tensor, Tensor)");
  m.def(
      "_momentum_update(Tensor prototypes, Tensor sums, Tensor counts, float momentum, "
      "bool normalize) -> Tensor");
}

}  // namespace protoseg
