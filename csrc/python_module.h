// Defines an empty CPython extension module.
//
// The operators live in the TORCH_LIBRARY registry and register themselves
// through static initialisers when the shared object is loaded; Python only
// needs an importable module (`import rdm_fast._C`) to trigger that load.
#pragma once

#include <Python.h>

#define RDM_FAST_DEFINE_PY_MODULE(name)                                      \
  static PyModuleDef rdm_fast_module_def_##name = {                          \
      PyModuleDef_HEAD_INIT,                                                 \
      "rdm_fast." #name,                                                     \
      "rdm_fast compiled operators (registered under torch.ops.rdm_fast).", \
      -1,                                                                    \
      nullptr,                                                               \
  };                                                                         \
  PyMODINIT_FUNC PyInit_##name() {                                           \
    return PyModule_Create(&rdm_fast_module_def_##name);                     \
  }
