// The CPU kernels of the contract in protoseg_kernels/_kernel_interface.py, one source
// file per op; registered for the CPU dispatch key in register.cpp. Optional outputs
// travel as empty tensors (the schemas cannot return None).
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <string>
#include <tuple>

namespace protoseg::cpu {

// prototype_similarity.cpp
at::Tensor similarity_forward(const at::Tensor& x, const at::Tensor& prototypes, bool normalize);
std::tuple<at::Tensor, at::Tensor> similarity_backward(const at::Tensor& grad, const at::Tensor& x,
                                                       const at::Tensor& prototypes, bool normalize,
                                                       bool need_prototype_grad);

// class_scores.cpp
std::tuple<at::Tensor, at::Tensor, at::Tensor> class_scores_forward(
    const at::Tensor& x, const at::Tensor& prototypes, bool normalize, c10::string_view reduction,
    double temperature, std::optional<double> lse_temperature);
std::tuple<at::Tensor, at::Tensor> class_scores_backward(
    const std::optional<at::Tensor>& grad_scores, const std::optional<at::Tensor>& grad_lse,
    const at::Tensor& x, const at::Tensor& prototypes, const at::Tensor& index, const at::Tensor& lse,
    bool normalize, c10::string_view reduction, double temperature, std::optional<double> lse_temperature,
    bool need_prototype_grad);

// ppc_ppd_loss.cpp
std::tuple<at::Tensor, at::Tensor, at::Tensor> ppc_ppd_forward(const at::Tensor& x,
                                                               const at::Tensor& prototypes,
                                                               const at::Tensor& target, bool normalize,
                                                               double temperature);
std::tuple<at::Tensor, at::Tensor> ppc_ppd_backward(
    const std::optional<at::Tensor>& grad_ppc, const std::optional<at::Tensor>& grad_ppd,
    const at::Tensor& x, const at::Tensor& prototypes, const at::Tensor& target, const at::Tensor& lse,
    bool normalize, double temperature, bool need_prototype_grad);

// sinkhorn_assign.cpp
at::Tensor sinkhorn_logits(const at::Tensor& x, const at::Tensor& prototypes, const at::Tensor& segment,
                           bool normalize, double epsilon);
std::tuple<at::Tensor, at::Tensor> sinkhorn_class_logsumexp(const at::Tensor& logits,
                                                            const at::Tensor& segment,
                                                            int64_t num_classes);
at::Tensor sinkhorn_marginals(const at::Tensor& logits, const at::Tensor& segment, const at::Tensor& beta);
std::tuple<at::Tensor, at::Tensor> sinkhorn_finalize(const at::Tensor& logits, const at::Tensor& segment,
                                                     const at::Tensor& beta, bool return_q);

// update_prototypes.cpp
std::tuple<at::Tensor, at::Tensor> prototype_sums(const at::Tensor& x, const at::Tensor& key,
                                                  int64_t num_prototypes, bool normalize);
at::Tensor momentum_update(const at::Tensor& prototypes, const at::Tensor& sums, const at::Tensor& counts,
                           double momentum, bool normalize);

}  // namespace protoseg::cpu
