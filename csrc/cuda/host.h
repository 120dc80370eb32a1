// Host side of the CUDA kernels: argument checks, dtype dispatch to the device element
// types, the device guard and stream, grid sizes. Shared verbatim by the real build
// (CUDA tensors, the current PyTorch stream) and the host emulation (CPU tensors).
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <limits>
#include <optional>

#include "cuda/numeric.cuh"

#if !defined(PROTOSEG_EMULATION)
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

namespace protoseg::cuda {

#if defined(PROTOSEG_EMULATION)
constexpr c10::DeviceType kKernelDevice = c10::DeviceType::CPU;

// The emulation has no streams or devices: kernels run synchronously on the host.
class LaunchScope {
 public:
  explicit LaunchScope(const at::Tensor&) {}
  cudaStream_t stream() const { return nullptr; }
};
#else
constexpr c10::DeviceType kKernelDevice = c10::DeviceType::CUDA;

// Makes the tensor's device current and launches on PyTorch's current stream there,
// so the kernels order correctly with the surrounding PyTorch work.
class LaunchScope {
 public:
  explicit LaunchScope(const at::Tensor& t)
      : guard_(t.device()), stream_(c10::cuda::getCurrentCUDAStream(t.get_device()).stream()) {}
  cudaStream_t stream() const { return stream_; }

 private:
  c10::cuda::CUDAGuard guard_;
  cudaStream_t stream_;
};
#endif

// ---- element types ---------------------------------------------------------------

template <typename T>
struct Tag {
  using type = T;
};

// Calls fn(Tag<device element type>{}) for a floating dtype of the kernels.
template <typename Fn>
void dispatch_floating(at::ScalarType dtype, const char* kernel, Fn&& fn) {
  switch (dtype) {
    case at::kFloat: return fn(Tag<float>{});
    case at::kDouble: return fn(Tag<double>{});
    case at::kHalf: return fn(Tag<__half>{});
    case at::kBFloat16: return fn(Tag<__nv_bfloat16>{});
    default: TORCH_CHECK(false, kernel, ": unsupported dtype ", dtype);
  }
}

// Calls fn(Tag<float or double>{}) for tensors already in an accumulation dtype.
template <typename Fn>
void dispatch_accumulate(at::ScalarType dtype, const char* kernel, Fn&& fn) {
  switch (dtype) {
    case at::kFloat: return fn(Tag<float>{});
    case at::kDouble: return fn(Tag<double>{});
    default: TORCH_CHECK(false, kernel, ": expected a float32 or float64 tensor, got ", dtype);
  }
}

inline at::ScalarType accumulate_dtype(at::ScalarType dtype) {
  return dtype == at::kDouble ? at::kDouble : at::kFloat;
}

template <typename T>
const T* data(const at::Tensor& t) {
  TORCH_INTERNAL_ASSERT(t.element_size() == int64_t(sizeof(T)), "element type mismatch");
  return static_cast<const T*>(t.const_data_ptr());
}

template <typename T>
T* mutable_data(at::Tensor& t) {
  TORCH_INTERNAL_ASSERT(t.element_size() == int64_t(sizeof(T)), "element type mismatch");
  return static_cast<T*>(t.mutable_data_ptr());
}

template <typename T>
const T* data_or_null(const std::optional<at::Tensor>& t) {
  return t.has_value() ? data<T>(*t) : nullptr;
}

// ---- argument checks (the public ops validate; these guard direct calls) -----------

inline void check_device(const char* kernel, const char* name, const at::Tensor& t) {
  TORCH_CHECK(t.device().type() == kKernelDevice, kernel, ": ", name, " must be a ", kKernelDevice,
              " tensor, got one on ", t.device());
}

inline void check_rank(const char* kernel, const char* name, const at::Tensor& t, int64_t dims) {
  TORCH_CHECK(t.dim() == dims, kernel, ": ", name, " must have ", dims, " dimensions, got shape ", t.sizes());
}

// x [N, D] and prototypes [C, K, D] of one floating dtype on the kernel device.
inline void check_features(const char* kernel, const at::Tensor& x, const at::Tensor& prototypes) {
  check_device(kernel, "x", x);
  check_device(kernel, "prototypes", prototypes);
  check_rank(kernel, "x", x, 2);
  check_rank(kernel, "prototypes", prototypes, 3);
  TORCH_CHECK(prototypes.size(2) == x.size(1), kernel, ": prototypes must have shape [C, K, D=", x.size(1),
              "], got ", prototypes.sizes());
  TORCH_CHECK(prototypes.size(0) > 0 && prototypes.size(1) > 0 && x.size(1) > 0, kernel,
              ": C, K and D must be positive, got prototypes of shape ", prototypes.sizes());
  TORCH_CHECK(prototypes.scalar_type() == x.scalar_type(), kernel, ": prototypes must have x's dtype ",
              x.scalar_type(), ", got ", prototypes.scalar_type());
  TORCH_CHECK(x.device() == prototypes.device(), kernel, ": x and prototypes must be on one device");
}

// A tensor of `shape` and dtype `dtype` on `like`'s device.
inline void check_tensor(const char* kernel, const char* name, const at::Tensor& t, at::IntArrayRef shape,
                         at::ScalarType dtype, const at::Tensor& like) {
  TORCH_CHECK(t.sizes() == shape, kernel, ": ", name, " must have shape ", shape, ", got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == dtype, kernel, ": ", name, " must have dtype ", dtype, ", got ",
              t.scalar_type());
  TORCH_CHECK(t.device() == like.device(), kernel, ": ", name, " must be on ", like.device(), ", got ",
              t.device());
}

// An optional upstream gradient, made contiguous in `dtype` (autograd may hand over
// another dtype or a strided view).
inline std::optional<at::Tensor> prepare_grad(const char* kernel, const char* name,
                                              const std::optional<at::Tensor>& grad, at::IntArrayRef shape,
                                              at::ScalarType dtype, const at::Tensor& like) {
  if (!grad.has_value() || !grad->defined()) return std::nullopt;
  TORCH_CHECK(grad->sizes() == shape, kernel, ": ", name, " must have shape ", shape, ", got ", grad->sizes());
  TORCH_CHECK(grad->device() == like.device(), kernel, ": ", name, " must be on ", like.device());
  return grad->to(dtype).contiguous();
}

// ---- launch geometry ---------------------------------------------------------------

// Blocks of `per_block` items covering `count` items, as a 1-D grid.
inline dim3 grid_for(int64_t count, int64_t per_block) {
  const int64_t blocks = (count + per_block - 1) / per_block;
  TORCH_CHECK(blocks <= std::numeric_limits<int32_t>::max(), "protoseg cuda: ", count,
              " items exceed the grid limit of a launch");
  return dim3(static_cast<unsigned int>(blocks));
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

}  // namespace protoseg::cuda
