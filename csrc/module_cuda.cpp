// Python entry point of rdm_fast._C_cuda (CUDA operators).
#include "python_module.h"

RDM_FAST_DEFINE_PY_MODULE(_C_cuda)
