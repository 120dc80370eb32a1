// What every CUDA kernel source (one per op) includes: the types of the host entry points'
// signatures (the arguments of csrc/schemas.h) and the registration macros: each source
// registers its entry points at its bottom with PROTOSEG_CUDA_KERNELS
// (csrc/registration.h), for CUDA tensors in the real build and for CPU tensors in the
// host emulation build.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/string_view.h>

#include <cstdint>
#include <optional>
#include <tuple>

#include "registration.h"

namespace protoseg::cuda {

using OptionalTensor = std::optional<at::Tensor>;
using TensorPair = std::tuple<at::Tensor, at::Tensor>;
using TensorTriple = std::tuple<at::Tensor, at::Tensor, at::Tensor>;
using TensorQuad = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

}  // namespace protoseg::cuda
