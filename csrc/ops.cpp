// The protoseg_kernels._C extension module: defines the kernel schemas in namespace
// `protoseg`. The CPU implementations register themselves from csrc/cpu with
// TORCH_LIBRARY_IMPL(protoseg, CPU, ...), the CUDA ones from csrc/cuda.
#include <Python.h>

#include "schemas.h"

TORCH_LIBRARY(protoseg, m) { protoseg::define_kernel_schemas(m); }

// Importing the module loads the shared library, which runs the registrations above.
extern "C" PyObject* PyInit__C(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module);
}
