// Tensor-level wrapper of the CUDA group_norm kernel: argument checks,
// parameter conversion, device guard and current-stream lookup. Compiled by
// the host compiler so that nvcc never sees the torch headers.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
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
  const bool channels_last = is_channels_last_only(input);
  const at::Tensor x =
      channels_last || input.is_contiguous() ? input : input.contiguous();
  at::Tensor out = at::empty_like(x);
  if (x.numel() == 0) {
    return out;
  }
  const at::Tensor w = float_param(weight);
  const at::Tensor b = float_param(bias);
  const at::Tensor a = float_param(add);
  const GroupNormCudaArgs args{
      x.data_ptr(),
      out.data_ptr(),
      data_or_null(w),
      data_or_null(b),
      data_or_null(a),
      sizes.batch,
      sizes.channels,
      sizes.spatial,
      sizes.groups,
      static_cast<float>(eps),
      silu,
      channels_last,
      to_kernel_dtype(x.scalar_type())};
  const cudaError_t err =
      launch_group_norm(args, c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(
      err == cudaSuccess, "rdm_fast::group_norm CUDA kernel launch failed: ",
      cudaGetErrorString(err));
  return out;
}

}  // namespace
}  // namespace rdm_fast

TORCH_LIBRARY_IMPL(rdm_fast, CUDA, m) {
  m.impl("group_norm", &rdm_fast::group_norm_cuda);
}
