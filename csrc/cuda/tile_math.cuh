// Which arithmetic the column engine's tiles run on (docs/spec.md §6, "Tensor cores"):
//
//   fp16, bf16  tensor cores: the similarity S in the input type (products exact in
//               fp32, fp32 accumulation); the backward products dS·Ĉ and dSᵀ·x̂ in tf32,
//               which represents every fp16 / bf16 operand exactly and keeps dS in fp32's
//               range (fp16 would flush small gradients to zero);
//   fp32        tensor cores in tf32 when torch allows TF32 matmuls
//               (torch.backends.cuda.matmul.allow_tf32 / fp32_precision "tf32"),
//               otherwise fp32 FMA, bit for bit the results of the plain build;
//   fp64        FMA (tensor-core fp64 is not worth its restrictions here).
//
// The choice is made on the host for each launch; kernels take it as a template
// argument, and only the maths an element type can run are instantiated.
#pragma once

#include <ATen/Context.h>

#include <type_traits>

#include "cuda/host.h"


namespace protoseg::cuda {

enum class TileMath : int { kFma = 0, kTensorCore = 1 };

template <typename scalar_t>
constexpr bool kAlwaysTensorCores = std::is_same_v<scalar_t, __half> || std::is_same_v<scalar_t, __nv_bfloat16>;
template <typename scalar_t>
constexpr bool kNeverTensorCores = std::is_same_v<scalar_t, double>;

// The math of a similarity over scalar_t elements under torch's float32 matmul
// precision (the build targets sm_80 or newer, which all run tensor cores).
template <typename scalar_t>
TileMath tile_math_for() {
  TileMath math = TileMath::kFma;
  if constexpr (kAlwaysTensorCores<scalar_t>) {
    math = TileMath::kTensorCore;
  } else if constexpr (!kNeverTensorCores<scalar_t>) {
    math = at::globalContext().allowTF32CuBLAS() ? TileMath::kTensorCore : TileMath::kFma;
  }
  return math;
}

// Calls launch(std::integral_constant<TileMath, math>{}), instantiating only the maths
// scalar_t can run.
template <typename scalar_t, typename Launch>
void with_tile_math(TileMath math, Launch&& launch) {
  using TensorCores = std::integral_constant<TileMath, TileMath::kTensorCore>;
  using Fma = std::integral_constant<TileMath, TileMath::kFma>;
  if constexpr (kAlwaysTensorCores<scalar_t>) {
    TORCH_INTERNAL_ASSERT(math == TileMath::kTensorCore);
    launch(TensorCores{});
  } else if constexpr (kNeverTensorCores<scalar_t>) {
    TORCH_INTERNAL_ASSERT(math == TileMath::kFma);
    launch(Fma{});
  } else if (math == TileMath::kTensorCore) {
    launch(TensorCores{});
  } else {
    launch(Fma{});
  }
}

}  // namespace protoseg::cuda
