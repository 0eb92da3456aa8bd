// Torch-free interface of the CUDA group_norm kernel (see group_norm_cuda.cu);
// tensor checks live in group_norm_cuda_host.cpp.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace rdm_fast {

enum class GroupNormDtype : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

struct GroupNormCudaArgs {
  const void* x;       // (B, C, *spatial) NCHW-contiguous, or NHWC
  void* y;             // same shape, dtype and layout as x
  const float* weight;  // (C,) or null
  const float* bias;    // (C,) or null
  const float* add;     // (B, C) or null, contiguous
  int64_t batch;
  int64_t channels;
  int64_t spatial;  // product of spatial dims
  int64_t groups;
  float eps;
  bool silu;
  bool channels_last;
  GroupNormDtype dtype;
};

// Enqueues the kernel on `stream`; returns the launch status. Requires
// channels * spatial / groups < 2^31 and channels, spatial < 2^31.
cudaError_t launch_group_norm(const GroupNormCudaArgs& args, cudaStream_t stream);

}  // namespace rdm_fast
