// vars_fast._C: one TORCH_LIBRARY with every schema; kernels register per device key in
// csrc/cpu/*.cpp (CPU) and csrc/cuda/*.cu (CUDA). Python adds fake kernels and autograd.
#include <Python.h>
#include <torch/library.h>

extern "C" {
// Importing vars_fast._C runs the static TORCH_LIBRARY initialisers below; the module
// itself exposes nothing (ops are reached through torch.ops.vars_fast).
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(vars_fast, m) {
  // Schemas are added here by each op family (see vars_fast/ops/<op>.py for the spec).
}
