// protoseg_kernels._C_emulated: the CUDA kernels of csrc/cuda built by the host
// compiler (see cuda_emulation.h) and registered for CPU tensors under the namespace
// protoseg_emulated, with the schemas of the real extension. Test-only backend
// `cuda_emulated` (SPEC §6).
#include <Python.h>

#include "cuda/registration.h"
#include "schemas.h"

TORCH_LIBRARY(protoseg_emulated, m) { protoseg::define_kernel_schemas(m); }

TORCH_LIBRARY_IMPL(protoseg_emulated, CPU, m) { protoseg::cuda::register_kernels(m); }

// Importing the module loads the shared library, which runs the registrations above.
PyMODINIT_FUNC PyInit__C_emulated(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C_emulated", nullptr, -1, nullptr};
  return PyModule_Create(&module);
}
