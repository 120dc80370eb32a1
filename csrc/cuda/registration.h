// The kernel table of the CUDA sources: every schema of csrc/schemas.h with its
// implementation. Registered for the CUDA dispatch key by registration.cpp and, in the
// host emulation build, for CPU under namespace protoseg_emulated.
#pragma once

#include <torch/library.h>

#include "cuda/kernels.h"

namespace protoseg::cuda {

inline void register_kernels(torch::Library& m) {
  m.impl("_similarity_forward", TORCH_FN(similarity_forward));
  m.impl("_similarity_backward", TORCH_FN(similarity_backward));
  m.impl("_class_scores_forward", TORCH_FN(class_scores_forward));
  m.impl("_class_scores_backward", TORCH_FN(class_scores_backward));
  m.impl("_ppc_ppd_forward", TORCH_FN(ppc_ppd_forward));
  m.impl("_ppc_ppd_backward", TORCH_FN(ppc_ppd_backward));
  m.impl("_sinkhorn_logits", TORCH_FN(sinkhorn_logits));
  m.impl("_sinkhorn_class_logsumexp", TORCH_FN(sinkhorn_class_logsumexp));
  m.impl("_sinkhorn_marginals", TORCH_FN(sinkhorn_marginals));
  m.impl("_sinkhorn_finalize", TORCH_FN(sinkhorn_finalize));
  m.impl("_prototype_sums", TORCH_FN(prototype_sums));
  m.impl("_momentum_update", TORCH_FN(momentum_update));
}

}  // namespace protoseg::cuda
