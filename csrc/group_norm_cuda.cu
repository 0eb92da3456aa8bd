// CUDA kernel of rdm_fast::group_norm: one thread block per (batch, group).
//
// Pass 1 reads the group once and computes mean and M2 with per-thread
// Welford/Chan updates (one merge per vector of VEC values), merged across
// the block with warp shuffles; pass 2 re-reads the group (mostly from L2)
// and writes act((x + add - mean) * rstd * weight + bias). All arithmetic is
// float32; the output is rounded once to the input dtype. Built without
// --use_fast_math: expf and the division in SiLU are the accurate versions.
#include "group_norm_cuda.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace rdm_fast {
namespace {

template <typename T>
struct Cvt;

template <>
struct Cvt<float> {
  __device__ static float load(float v) { return v; }
  __device__ static float store(float v) { return v; }
};

template <>
struct Cvt<__half> {
  __device__ static float load(__half v) { return __half2float(v); }
  __device__ static __half store(float v) { return __float2half_rn(v); }
};

template <>
struct Cvt<__nv_bfloat16> {
  __device__ static float load(__nv_bfloat16 v) { return __bfloat162float(v); }
  __device__ static __nv_bfloat16 store(float v) {
    return __float2bfloat16_rn(v);
  }
};

template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Pack {
  T v[VEC];
};

// Count, mean and sum of squared deviations of a set of values.
struct Moments {
  float n;
  float mean;
  float m2;
};

__device__ __forceinline__ Moments merge(const Moments& a, const Moments& b) {
  const float n = a.n + b.n;
  if (n == 0.0f) {
    return a;
  }
  const float wb = b.n / n;
  const float delta = b.mean - a.mean;
  return {n, a.mean + delta * wb, a.m2 + b.m2 + delta * delta * a.n * wb};
}

__device__ __forceinline__ Moments warp_merge(Moments m) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
    const Moments other{
        __shfl_xor_sync(0xffffffffu, m.n, offset),
        __shfl_xor_sync(0xffffffffu, m.mean, offset),
        __shfl_xor_sync(0xffffffffu, m.m2, offset)};
    m = merge(m, other);
  }
  return m;
}

// Block-wide merge; every thread gets the result. blockDim.x % 32 == 0.
__device__ Moments block_merge(Moments m) {
  __shared__ Moments warp_results[32];
  __shared__ Moments result;
  const int lane = threadIdx.x % 32;
  const int warp = threadIdx.x / 32;
  m = warp_merge(m);
  if (lane == 0) {
    warp_results[warp] = m;
  }
  __syncthreads();
  if (warp == 0) {
    const int n_warps = blockDim.x / 32;
    m = lane < n_warps ? warp_results[lane] : Moments{0.0f, 0.0f, 0.0f};
    m = warp_merge(m);
    if (lane == 0) {
      result = m;
    }
  }
  __syncthreads();
  return result;
}

// Element offset (relative to the group base) and first local channel of
// pack p. NCHW: the group is contiguous and a pack never straddles channels
// (spatial % VEC == 0). NHWC: rows of D channels, stride C, D % VEC == 0.
template <int VEC, bool CHANNELS_LAST>
__device__ __forceinline__ void locate(
    int p, int spatial, int channels, int d, long long& offset, int& channel) {
  if (CHANNELS_LAST) {
    const int packs_per_row = d / VEC;
    const int row = p / packs_per_row;
    channel = (p - row * packs_per_row) * VEC;
    offset = static_cast<long long>(row) * channels + channel;
  } else {
    const int element = p * VEC;  // < group_numel < 2^31
    channel = element / spatial;
    offset = element;
  }
}

template <typename T, int VEC, bool CHANNELS_LAST>
__global__ void group_norm_kernel(
    const T* __restrict__ x,
    T* __restrict__ y,
    const float* __restrict__ weight,
    const float* __restrict__ bias,
    const float* __restrict__ add,
    int channels,
    int spatial,
    int groups,
    float eps,
    bool silu) {
  const int bg = blockIdx.x;
  const int b = bg / groups;
  const int g = bg - b * groups;
  const int d = channels / groups;
  const int group_numel = d * spatial;
  const int n_packs = group_numel / VEC;
  const long long base = CHANNELS_LAST
      ? static_cast<long long>(b) * spatial * channels + g * d
      : static_cast<long long>(bg) * group_numel;
  const T* xg = x + base;
  T* yg = y + base;
  const int c0 = g * d;
  const float* add_row = add ? add + static_cast<long long>(b) * channels + c0 : nullptr;

  // Pass 1: moments of x + add.
  Moments m{0.0f, 0.0f, 0.0f};
  for (int p = threadIdx.x; p < n_packs; p += blockDim.x) {
    long long offset;
    int c;
    locate<VEC, CHANNELS_LAST>(p, spatial, channels, d, offset, c);
    const Pack<T, VEC> pack = *reinterpret_cast<const Pack<T, VEC>*>(xg + offset);
    float v[VEC];
    float sum = 0.0f;
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      const int ck = CHANNELS_LAST ? c + k : c;
      v[k] = Cvt<T>::load(pack.v[k]) + (add_row ? __ldg(add_row + ck) : 0.0f);
      sum += v[k];
    }
    const float pack_mean = sum * (1.0f / VEC);
    float pack_m2 = 0.0f;
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      const float dv = v[k] - pack_mean;
      pack_m2 += dv * dv;
    }
    m = merge(m, Moments{static_cast<float>(VEC), pack_mean, pack_m2});
  }
  m = block_merge(m);
  const float mean = m.mean;
  const float rstd = rsqrtf(m.m2 / static_cast<float>(group_numel) + eps);

  // Pass 2: normalise, affine, activation.
  for (int p = threadIdx.x; p < n_packs; p += blockDim.x) {
    long long offset;
    int c;
    locate<VEC, CHANNELS_LAST>(p, spatial, channels, d, offset, c);
    const Pack<T, VEC> pack = *reinterpret_cast<const Pack<T, VEC>*>(xg + offset);
    Pack<T, VEC> out;
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      const int ck = CHANNELS_LAST ? c + k : c;
      const float a = add_row ? __ldg(add_row + ck) : 0.0f;
      const float w = weight ? __ldg(weight + c0 + ck) : 1.0f;
      const float bb = bias ? __ldg(bias + c0 + ck) : 0.0f;
      float r = (Cvt<T>::load(pack.v[k]) + a - mean) * rstd * w + bb;
      if (silu) {
        r = r / (1.0f + expf(-r));
      }
      out.v[k] = Cvt<T>::store(r);
    }
    *reinterpret_cast<Pack<T, VEC>*>(yg + offset) = out;
  }
}

int pick_threads(long long n_packs) {
  if (n_packs >= 4096) {
    return 512;
  }
  if (n_packs >= 1024) {
    return 256;
  }
  return 128;
}

template <typename T, int VEC>
cudaError_t launch_vec(const GroupNormCudaArgs& a, cudaStream_t stream) {
  const int d = static_cast<int>(a.channels / a.groups);
  const long long n_packs = static_cast<long long>(d) * a.spatial / VEC;
  const dim3 grid(static_cast<unsigned int>(a.batch * a.groups));
  const dim3 block(pick_threads(n_packs));
  const T* x = static_cast<const T*>(a.x);
  T* y = static_cast<T*>(a.y);
  const int channels = static_cast<int>(a.channels);
  const int spatial = static_cast<int>(a.spatial);
  const int groups = static_cast<int>(a.groups);
  if (a.channels_last) {
    group_norm_kernel<T, VEC, true><<<grid, block, 0, stream>>>(
        x, y, a.weight, a.bias, a.add, channels, spatial, groups, a.eps, a.silu);
  } else {
    group_norm_kernel<T, VEC, false><<<grid, block, 0, stream>>>(
        x, y, a.weight, a.bias, a.add, channels, spatial, groups, a.eps, a.silu);
  }
  return cudaGetLastError();
}

// Widest vector (up to 16 bytes) that keeps every pack aligned and inside
// one channel (NCHW) or one row (NHWC).
template <typename T>
int pick_vec(const GroupNormCudaArgs& a) {
  const long long inner = a.channels_last ? a.channels / a.groups : a.spatial;
  const auto x_addr = reinterpret_cast<unsigned long long>(a.x);
  const auto y_addr = reinterpret_cast<unsigned long long>(a.y);
  for (int vec = static_cast<int>(16 / sizeof(T)); vec > 1; vec /= 2) {
    const unsigned long long bytes = vec * sizeof(T);
    if (inner % vec == 0 && x_addr % bytes == 0 && y_addr % bytes == 0) {
      return vec;
    }
  }
  return 1;
}

template <typename T>
cudaError_t launch_typed(const GroupNormCudaArgs& a, cudaStream_t stream) {
  const int vec = pick_vec<T>(a);
  if constexpr (sizeof(T) == 2) {
    if (vec == 8) {
      return launch_vec<T, 8>(a, stream);
    }
  }
  if (vec == 4) {
    return launch_vec<T, 4>(a, stream);
  }
  if (vec == 2) {
    return launch_vec<T, 2>(a, stream);
  }
  return launch_vec<T, 1>(a, stream);
}

}  // namespace

cudaError_t launch_group_norm(const GroupNormCudaArgs& args, cudaStream_t stream) {
  switch (args.dtype) {
    case GroupNormDtype::kFloat32:
      return launch_typed<float>(args, stream);
    case GroupNormDtype::kFloat16:
      return launch_typed<__half>(args, stream);
    case GroupNormDtype::kBFloat16:
      return launch_typed<__nv_bfloat16>(args, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace rdm_fast
