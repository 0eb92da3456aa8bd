// Schema definitions of the rdm_fast operator library.
//
// Backend kernels are registered separately with TORCH_LIBRARY_IMPL
// (group_norm_cpu.cpp, group_norm_cuda_host.cpp).
#include <torch/library.h>

TORCH_LIBRARY(rdm_fast, m) {
  // GroupNorm over (B, C, *spatial) with an optional per-(B, C) add applied
  // before the statistics and an optional SiLU applied after the affine.
  m.def(
      "group_norm(Tensor x, Tensor? weight, Tensor? bias, int num_groups, "
      "float eps, Tensor? add, bool silu) -> Tensor");
}
