// Tensor-level wrapper of the CUDA group_norm kernel: argument checks,
// parameter conversion, device guard and current-stream lookup. Compiled by
// the host compiler so that nvcc never sees the torch headers.
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <limits>

#include "group_norm_common.h"
#include "group_norm_cuda.h"

namespace rdm_fast {
namespace {

GroupNormDtype to_kernel_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat:
      return GroupNormDtype::kFloat32;
    case at::kHalf:
      return GroupNormDtype::kFloat16;
    default:  // bfloat16; other dtypes were rejected by the checks
      return GroupNormDtype::kBFloat16;
  }
}

at::Tensor group_norm_cuda(
    const at::Tensor& input,
    const c10::optional<at::Tensor>& weight,
    const c10::optional<at::Tensor>& bias,
    int64_t num_groups,
    double eps,
    const c10::optional<at::Tensor>& add,
    bool silu) {
  const GroupNormSizes sizes =
      check_group_norm_args(input, weight, bias, num_groups, add);
  TORCH_CHECK(input.is_cuda(), "group_norm_cuda: expected a CUDA tensor");
  constexpr int64_t kIntMax = std::numeric_limits<int>::max();
  TORCH_CHECK(
      sizes.channels / sizes.groups * sizes.spatial <= kIntMax &&
          sizes.spatial <= kIntMax && sizes.channels <= kIntMax &&
          sizes.batch * sizes.groups <= kIntMax,
      "group_norm_cuda: tensor too large (group size, C, spatial size and "
      "B * num_groups must each be below 2^31), got x of shape ",
      shape_str(input.sizes()), " and num_groups=", num_groups);
  const c10::cuda::CUDAGuard device_guard(input.device());
  const GroupNormOperands op = prepare_group_norm(input, weight, bias, add);
  if (op.x.numel() == 0) {
    return op.out;
  }
  const GroupNormCudaArgs args{
      op.x.data_ptr(),
      op.out.data_ptr(),
      data_or_null(op.weight),
      data_or_null(op.bias),
      data_or_null(op.add),
      sizes.batch,
      sizes.channels,
      sizes.spatial,
      sizes.groups,
      static_cast<float>(eps),
      silu,
      op.channels_last,
      to_kernel_dtype(op.x.scalar_type())};
  const cudaError_t err =
      launch_group_norm(args, c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(
      err == cudaSuccess, "rdm_fast::group_norm CUDA kernel launch failed: ",
      cudaGetErrorString(err));
  return op.out;
}

}  // namespace
}  // namespace rdm_fast

TORCH_LIBRARY_IMPL(rdm_fast, CUDA, m) {
  m.impl("group_norm", &rdm_fast::group_norm_cuda);
}
