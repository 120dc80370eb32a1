// Registers the CPU kernels for the schemas defined in csrc/ops.cpp (namespace protoseg).
#include <torch/library.h>

#include "cpu/kernels.h"

TORCH_LIBRARY_IMPL(protoseg, CPU, m) {
  using namespace protoseg::cpu;
  m.impl("_similarity_forward", &similarity_forward);
  m.impl("_similarity_backward", &similarity_backward);
  m.impl("_class_scores_forward", &class_scores_forward);
  m.impl("_class_scores_backward", &class_scores_backward);
  m.impl("_ppc_ppd_forward", &ppc_ppd_forward);
  m.impl("_ppc_ppd_backward", &ppc_ppd_backward);
  m.impl("_sinkhorn_logits", &sinkhorn_logits);
  m.impl("_sinkhorn_class_logsumexp", &sinkhorn_class_logsumexp);
  m.impl("_sinkhorn_marginals", &sinkhorn_marginals);
  m.impl("_sinkhorn_finalize", &sinkhorn_finalize);
  m.impl("_prototype_sums", &prototype_sums);
  m.impl("_momentum_update", &momentum_update);
}
