// What every CPU kernel source (one per op) includes: the types of the kernel signatures
// (csrc/schemas.h; optional outputs travel as empty tensors, as the schemas cannot return
// None) and the registration macros: each source registers its kernels at its bottom with
// PROTOSEG_CPU_KERNELS (csrc/registration.h).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/string_view.h>

#include <optional>
#include <string>
#include <tuple>

#include "registration.h"
