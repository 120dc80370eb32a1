// How a kernel source registers its kernels (torch.library, as torchvision does: every
// backend source file registers its own kernels at its bottom, so no file lists them all).
//
// Kernel schemas live in a namespace of their own, apart from the public ops (`protoseg`):
// `protoseg_kernels` in the real extension, `protoseg_kernels_emulated` in the host
// emulation build of the CUDA sources (PROTOSEG_EMULATION), which registers the very same
// CUDA sources for CPU tensors (the test backend `cuda_emulated`, docs/spec.md §6).
#pragma once

#include <torch/library.h>

#if defined(PROTOSEG_EMULATION)
#define PROTOSEG_KERNEL_NAMESPACE protoseg_kernels_emulated
#define PROTOSEG_CUDA_SOURCE_KEY CPU
#else
#define PROTOSEG_KERNEL_NAMESPACE protoseg_kernels
#define PROTOSEG_CUDA_SOURCE_KEY CUDA
#endif

// TORCH_LIBRARY pastes its namespace argument unexpanded; this indirection expands it.
#define PROTOSEG_TORCH_LIBRARY_(ns, m) TORCH_LIBRARY(ns, m)

// `PROTOSEG_KERNEL_SCHEMAS(m) { ... }`: the one definition of the schemas (csrc/ops.cpp).
#define PROTOSEG_KERNEL_SCHEMAS(m) PROTOSEG_TORCH_LIBRARY_(PROTOSEG_KERNEL_NAMESPACE, m)

// `PROTOSEG_CPU_KERNELS(m) { ... }` at the bottom of a csrc/cpu source: its kernels for
// CPU tensors (backend `cpu`).
#define PROTOSEG_CPU_KERNELS(m) TORCH_LIBRARY_IMPL(protoseg_kernels, CPU, m)

// `PROTOSEG_CUDA_KERNELS(m) { ... }` at the bottom of a csrc/cuda source: its kernels for
// CUDA tensors (backend `cuda`), or, in the emulation build, for CPU tensors under
// protoseg_kernels_emulated (backend `cuda_emulated`).
#define PROTOSEG_CUDA_KERNELS(m) TORCH_LIBRARY_IMPL(PROTOSEG_KERNEL_NAMESPACE, PROTOSEG_CUDA_SOURCE_KEY, m)

// `PROTOSEG_KERNEL(m, kernel);` inside such a block: registers function `kernel` (of the
// namespace the block names with `using namespace`) for the schema of the same name.
#define PROTOSEG_KERNEL(m, kernel) m.impl(#kernel, TORCH_FN(kernel))
