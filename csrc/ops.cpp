// The extension modules: defines the kernel schemas (csrc/schemas.h) once, in namespace
// `protoseg_kernels` for protoseg_kernels._C and, built with PROTOSEG_EMULATION,
// `protoseg_kernels_emulated` for protoseg_kernels._C_emulated (csrc/registration.h).
// The kernels register themselves from the bottom of their own sources.
#include <Python.h>

#include "registration.h"
#include "schemas.h"

PROTOSEG_KERNEL_SCHEMAS(m) { protoseg::define_kernel_schemas(m); }

// Importing the module loads the shared library, which runs the registrations.
#if defined(PROTOSEG_EMULATION)
PyMODINIT_FUNC PyInit__C_emulated(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C_emulated", nullptr, -1, nullptr};
  return PyModule_Create(&module);
}
#else
PyMODINIT_FUNC PyInit__C(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module);
}
#endif
