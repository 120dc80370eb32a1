// Argument checks and dtype dispatch shared by the CPU kernels. The Python ops validate
// user input; these checks guard the kernels themselves (they are reachable directly
// through torch.ops), so that no call can make a kernel address memory out of bounds.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>

namespace protoseg::cpu {

// Runs the lambda with `scalar_t` (the input dtype: half, bfloat16, float, double) and
// `acc_t` (the compute dtype: float, double for double inputs).
#define PROTOSEG_DISPATCH_FLOATING(dtype, name, ...)                             \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, name, [&] {  \
    using acc_t = at::opmath_type<scalar_t>;                                    \
    __VA_ARGS__();                                                              \
  })

inline at::ScalarType compute_dtype(at::ScalarType dtype) {
  return dtype == at::kDouble ? at::kDouble : at::kFloat;
}

// x [N, D] and prototypes [C, K, D] of one floating dtype, returned contiguous.
inline void check_features_and_prototypes(const char* kernel, at::Tensor& x, at::Tensor& prototypes) {
  TORCH_CHECK(x.dim() == 2, kernel, ": x must be [N, D], got ", x.sizes());
  TORCH_CHECK(prototypes.dim() == 3 && prototypes.size(2) == x.size(1), kernel,
              ": prototypes must be [C, K, D] with D = ", x.size(1), ", got ", prototypes.sizes());
  TORCH_CHECK(x.scalar_type() == prototypes.scalar_type(), kernel,
              ": x and prototypes must have the same dtype, got ", x.scalar_type(), " and ",
              prototypes.scalar_type());
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), kernel, ": x must be floating, got ", x.scalar_type());
  TORCH_CHECK(x.size(1) > 0 && prototypes.size(0) > 0 && prototypes.size(1) > 0, kernel,
              ": D, C and K must be positive, got x ", x.sizes(), " and prototypes ", prototypes.sizes());
  x = x.contiguous();
  prototypes = prototypes.contiguous();
}

// A contiguous int64 vector of `length` entries (sanitised indices: -1 or valid).
inline at::Tensor checked_index(const char* kernel, const char* name, const at::Tensor& index,
                                int64_t length) {
  TORCH_CHECK(index.scalar_type() == at::kLong, kernel, ": ", name, " must be int64, got ",
              index.scalar_type());
  TORCH_CHECK(index.dim() == 1 && index.size(0) == length, kernel, ": ", name,
              " must have shape [", length, "], got ", index.sizes());
  return index.contiguous();
}

// A contiguous tensor of `numel` elements in dtype `dtype` (converted if needed), for
// per-pixel inputs such as upstream gradients and saved log-sum-exps.
inline at::Tensor checked_values(const char* kernel, const char* name, const at::Tensor& t,
                                 int64_t numel, at::ScalarType dtype) {
  TORCH_CHECK(t.numel() == numel, kernel, ": ", name, " must have ", numel, " elements, got shape ",
              t.sizes());
  return t.to(dtype).contiguous();
}

}  // namespace protoseg::cpu
