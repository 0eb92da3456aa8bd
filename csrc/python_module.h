// Defines a CPython extension module with one attribute, `csrc_digest`.
//
// The operators live in the TORCH_LIBRARY registry and register themselves
// through static initialisers when the shared object is loaded; Python only
// needs an importable module (`import rdm_fast._C`) to trigger that load.
// `csrc_digest` is the digest of the csrc/ sources the module was built from
// (setup.py defines RDM_FAST_CSRC_DIGEST; rdm_fast/_sources.py computes it), so
// that rdm_fast can refuse a stale build when run from a newer source checkout.
#pragma once

#include <Python.h>

#define RDM_FAST_STRINGIFY_(x) #x
#define RDM_FAST_STRINGIFY(x) RDM_FAST_STRINGIFY_(x)
#ifdef RDM_FAST_CSRC_DIGEST
#define RDM_FAST_CSRC_DIGEST_STR RDM_FAST_STRINGIFY(RDM_FAST_CSRC_DIGEST)
#else
#define RDM_FAST_CSRC_DIGEST_STR "unknown"
#endif

#define RDM_FAST_DEFINE_PY_MODULE(name)                                        \
  static PyModuleDef rdm_fast_module_def_##name = {                            \
      PyModuleDef_HEAD_INIT,                                                   \
      "rdm_fast." #name,                                                       \
      "rdm_fast compiled operators (registered under torch.ops.rdm_fast).",   \
      -1,                                                                      \
      nullptr,                                                                 \
  };                                                                           \
  PyMODINIT_FUNC PyInit_##name() {                                             \
    PyObject* module = PyModule_Create(&rdm_fast_module_def_##name);           \
    if (module != nullptr &&                                                   \
        PyModule_AddStringConstant(module, "csrc_digest",                      \
                                   RDM_FAST_CSRC_DIGEST_STR) < 0) {            \
      Py_DECREF(module);                                                       \
      return nullptr;                                                          \
    }                                                                          \
    return module;                                                             \
  }
