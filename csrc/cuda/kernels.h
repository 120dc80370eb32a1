// Host entry points of the CUDA kernels, one per kernel of the contract
// (protoseg_kernels/_kernel_interface.py), with the arguments of csrc/schemas.h.
// Defined in the per-op .cu files; registered by registration.h. The same
// declarations serve the real build (CUDA tensors) and the host emulation (CPU tensors).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/string_view.h>

#include <cstdint>
#include <optional>
#include <tuple>

namespace protoseg::cuda {

using OptionalTensor = std::optional<at::Tensor>;
using TensorPair = std::tuple<at::Tensor, at::Tensor>;
using TensorTriple = std::tuple<at::Tensor, at::Tensor, at::Tensor>;

// prototype_similarity.cu
at::Tensor similarity_forward(const at::Tensor& x, const at::Tensor& prototypes, bool normalize);
TensorPair similarity_backward(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& prototypes,
                               bool normalize, bool need_prototype_grad);

// class_scores.cu
TensorTriple class_scores_forward(const at::Tensor& x, const at::Tensor& prototypes, bool normalize,
                                  c10::string_view reduction, double temperature,
                                  std::optional<double> lse_temperature);
TensorPair class_scores_backward(const OptionalTensor& grad_scores, const OptionalTensor& grad_lse,
                                 const at::Tensor& x, const at::Tensor& prototypes, const at::Tensor& index,
                                 const at::Tensor& lse, bool normalize, c10::string_view reduction,
                                 double temperature, std::optional<double> lse_temperature,
                                 bool need_prototype_grad);

// ppc_ppd_loss.cu
TensorTriple ppc_ppd_forward(const at::Tensor& x, const at::Tensor& prototypes, const at::Tensor& target,
                             bool normalize, double temperature);
TensorPair ppc_ppd_backward(const OptionalTensor& grad_ppc, const OptionalTensor& grad_ppd, const at::Tensor& x,
                            const at::Tensor& prototypes, const at::Tensor& target, const at::Tensor& lse,
                            bool normalize, double temperature, bool need_prototype_grad);

// sinkhorn_assign.cu
at::Tensor sinkhorn_logits(const at::Tensor& x, const at::Tensor& prototypes, const at::Tensor& segment,
                           bool normalize, double epsilon);
TensorPair sinkhorn_class_logsumexp(const at::Tensor& logits, const at::Tensor& segment, int64_t num_classes);
at::Tensor sinkhorn_marginals(const at::Tensor& logits, const at::Tensor& segment, const at::Tensor& beta);
TensorPair sinkhorn_finalize(const at::Tensor& logits, const at::Tensor& segment, const at::Tensor& beta,
                             bool return_q);

// update_prototypes.cu
TensorPair prototype_sums(const at::Tensor& x, const at::Tensor& key, int64_t num_prototypes, bool normalize);
at::Tensor momentum_update(const at::Tensor& prototypes, const at::Tensor& sums, const at::Tensor& counts,
                           double momentum, bool normalize);

}  // namespace protoseg::cuda
