// CPU kernel of rdm_fast::group_norm.
//
// Computes  y = act(GN(x + add[:, :, None...]) * weight + bias)  with all
// statistics, the affine and the SiLU in float32 and a single rounding to the
// input dtype. The mean and the centred variance are computed in two passes
// (robust to large mean offsets): the first pass sums the differences to one
// value of each group (NCHW) or channel (NHWC), so a near-constant input loses
// nothing to the float sums, and a constant one has its exact mean; partial
// sums are kept in float32 lanes over runs of at most kRunLength values and
// accumulated in double. NCHW-contiguous tensors with any number of spatial
// dims and 4-D channels_last tensors are read in place; other layouts are
// made contiguous.
//
// The inner loops work on float rows and are written to auto-vectorise. On
// x86-64 they are compiled twice, for the baseline ISA and for AVX2+FMA, and
// the variant is picked at run time (RowKernels). No -ffast-math: SiLU uses
// exp_poly, a branch-free exp accurate to a few float32 ulp.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string_view>
#include <type_traits>
#include <vector>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include "group_norm_common.h"

namespace rdm_fast {
namespace {

constexpr int kLanes = 32;              // independent float accumulators
constexpr int64_t kRunLength = 4096;    // values summed in float before a flush
constexpr int64_t kChunkElems = 16384;  // NHWC work item size (elements)

#if defined(__GNUC__) || defined(__clang__)
#define RDM_FAST_INLINE inline __attribute__((always_inline))
#else
#define RDM_FAST_INLINE inline
#endif

// e^x for float x: x = k*ln2 + r with |r| <= ln2/2 (ln2 split in two for an
// exact product), e^r by its degree-7 Taylor polynomial (truncation < 1e-8
// relative), 2^k through the exponent bits; max error about 1.6 float32 ulp.
// |x| is first clamped to 87.3 so that 2^k stays a normal float (results
// saturate at about 1.2e-38 / 8.1e37; NaN gives a finite value, so callers
// must propagate NaN themselves, as silu does through its numerator).
// Branch-free so that loops calling it vectorise: the clamp acts on the bits
// (an integer min on the magnitude), because a float compare-and-select lets
// GCC specialise the clamped path and evaluate it speculatively, which here
// produced denormals (a >10x slowdown).
RDM_FAST_INLINE float exp_poly(float x) {
  constexpr int32_t kSignBit = static_cast<int32_t>(0x80000000u);
  constexpr int32_t kMaxMagnitude = 0x42ae999a;  // bits of 87.3f
  int32_t bits;
  std::memcpy(&bits, &x, sizeof(bits));
  bits = (bits & kSignBit) | std::min(bits & ~kSignBit, kMaxMagnitude);
  std::memcpy(&x, &bits, sizeof(x));
  constexpr float kRound = 12582912.0f;  // 1.5 * 2^23: adding it rounds to int
  const float k = (x * 1.44269504088896341f + kRound) - kRound;
  const float r = (x - k * 0.693359375f) + k * 2.12194440e-4f;
  float p = 1.0f / 5040.0f;
  p = p * r + 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const int32_t scale_bits = (static_cast<int32_t>(k) + 127) << 23;
  float scale;
  std::memcpy(&scale, &scale_bits, sizeof(scale));
  return p * scale;
}

RDM_FAST_INLINE float silu(float v) {
  return v / (1.0f + exp_poly(-v));
}

// Sum of p[i] - shift over [0, n) in float lanes, flushed to double every
// kRunLength values.
RDM_FAST_INLINE double shifted_sum_row_impl(const float* p, int64_t n, float shift) {
  double total = 0.0;
  for (int64_t start = 0; start < n; start += kRunLength) {
    const int64_t len = std::min(kRunLength, n - start);
    const float* q = p + start;
    float acc[kLanes] = {};
    int64_t i = 0;
    for (; i + kLanes <= len; i += kLanes) {
      for (int j = 0; j < kLanes; ++j) {
        acc[j] += q[i + j] - shift;
      }
    }
    double run = 0.0;
    for (; i < len; ++i) {
      run += q[i] - shift;
    }
    for (int j = 0; j < kLanes; ++j) {
      run += acc[j];
    }
    total += run;
  }
  return total;
}

// Sum of (p[i] - centre)^2 over [0, n), accumulated like shifted_sum_row_impl.
RDM_FAST_INLINE double centred_sq_sum_row_impl(const float* p, int64_t n, float centre) {
  double total = 0.0;
  for (int64_t start = 0; start < n; start += kRunLength) {
    const int64_t len = std::min(kRunLength, n - start);
    const float* q = p + start;
    float acc[kLanes] = {};
    int64_t i = 0;
    for (; i + kLanes <= len; i += kLanes) {
      for (int j = 0; j < kLanes; ++j) {
        const float d = q[i + j] - centre;
        acc[j] += d * d;
      }
    }
    double run = 0.0;
    for (; i < len; ++i) {
      const float d = q[i] - centre;
      run += d * d;
    }
    for (int j = 0; j < kLanes; ++j) {
      run += acc[j];
    }
    total += run;
  }
  return total;
}

// out[i] = act((p[i] - centre) * scale + shift) for i in [0, n).
RDM_FAST_INLINE void normalize_row_impl(
    const float* p, float* out, int64_t n, float centre, float scale, float shift, bool apply_silu) {
  if (apply_silu) {
    for (int64_t i = 0; i < n; ++i) {
      out[i] = silu((p[i] - centre) * scale + shift);
    }
  } else {
    for (int64_t i = 0; i < n; ++i) {
      out[i] = (p[i] - centre) * scale + shift;
    }
  }
}

// acc[c] += row[c] - shift[c] for c in [0, n).
RDM_FAST_INLINE void add_channels_impl(const float* row, const float* shift, float* acc, int64_t n) {
  for (int64_t c = 0; c < n; ++c) {
    acc[c] += row[c] - shift[c];
  }
}

// acc[c] += (row[c] - centre[c])^2 for c in [0, n).
RDM_FAST_INLINE void add_sq_channels_impl(const float* row, const float* centre, float* acc, int64_t n) {
  for (int64_t c = 0; c < n; ++c) {
    const float d = row[c] - centre[c];
    acc[c] += d * d;
  }
}

// out[c] = act((row[c] - centre[c]) * scale[c] + shift[c]) for c in [0, n).
RDM_FAST_INLINE void normalize_channels_impl(
    const float* row, float* out, const float* centre, const float* scale, const float* shift, int64_t n,
    bool apply_silu) {
  if (apply_silu) {
    for (int64_t c = 0; c < n; ++c) {
      out[c] = silu((row[c] - centre[c]) * scale[c] + shift[c]);
    }
  } else {
    for (int64_t c = 0; c < n; ++c) {
      out[c] = (row[c] - centre[c]) * scale[c] + shift[c];
    }
  }
}

// One ISA variant of the row kernels.
struct RowKernels {
  double (*shifted_sum)(const float*, int64_t, float);
  double (*centred_sq_sum)(const float*, int64_t, float);
  void (*normalize)(const float*, float*, int64_t, float, float, float, bool);
  void (*add_channels)(const float*, const float*, float*, int64_t);
  void (*add_sq_channels)(const float*, const float*, float*, int64_t);
  void (*normalize_channels)(const float*, float*, const float*, const float*, const float*, int64_t, bool);
  void (*half_to_float)(const c10::Half*, float*, int64_t);
  void (*float_to_half)(const float*, c10::Half*, int64_t);
};

// float16 <-> float32 with c10's portable (scalar) conversions.
void half_to_float_scalar(const c10::Half* in, float* out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    out[i] = static_cast<float>(in[i]);
  }
}

void float_to_half_scalar(const float* in, c10::Half* out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    out[i] = static_cast<c10::Half>(in[i]);
  }
}

// Defines RowKernels `name` whose functions carry `attr` (e.g. a target ISA);
// the always-inline bodies above are compiled for that ISA inside them.
// h2f / f2h are the float16 converters to use.
#define RDM_FAST_ROW_KERNELS(name, attr, h2f, f2h)                                                \
  attr double name##_shifted_sum(const float* p, int64_t n, float c) {                           \
    return shifted_sum_row_impl(p, n, c);                                                         \
  }                                                                                               \
  attr double name##_centred_sq_sum(const float* p, int64_t n, float c) {                         \
    return centred_sq_sum_row_impl(p, n, c);                                                      \
  }                                                                                               \
  attr void name##_normalize(const float* p, float* o, int64_t n, float c, float s, float b, bool a) { \
    normalize_row_impl(p, o, n, c, s, b, a);                                                      \
  }                                                                                               \
  attr void name##_add_channels(const float* r, const float* c, float* acc, int64_t n) {          \
    add_channels_impl(r, c, acc, n);                                                              \
  }                                                                                               \
  attr void name##_add_sq_channels(const float* r, const float* c, float* acc, int64_t n) {       \
    add_sq_channels_impl(r, c, acc, n);                                                           \
  }                                                                                               \
  attr void name##_normalize_channels(                                                            \
      const float* r, float* o, const float* c, const float* s, const float* b, int64_t n, bool a) { \
    normalize_channels_impl(r, o, c, s, b, n, a);                                                 \
  }                                                                                               \
  constexpr RowKernels name = {name##_shifted_sum, name##_centred_sq_sum, name##_normalize,       \
                               name##_add_channels, name##_add_sq_channels, name##_normalize_channels, \
                               h2f, f2h};

RDM_FAST_ROW_KERNELS(kBaselineKernels, , half_to_float_scalar, float_to_half_scalar)

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define RDM_FAST_HAVE_AVX2_KERNELS 1
#define RDM_FAST_AVX2 __attribute__((target("avx2,fma,f16c")))

// float16 <-> float32 with F16C, 8 values at a time (round to nearest even,
// like c10 and torch's own vectorised conversions).
RDM_FAST_AVX2 void half_to_float_f16c(const c10::Half* in, float* out, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(in + i));
    _mm256_storeu_ps(out + i, _mm256_cvtph_ps(h));
  }
  half_to_float_scalar(in + i, out + i, n - i);
}

RDM_FAST_AVX2 void float_to_half_f16c(const float* in, c10::Half* out, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m128i h = _mm256_cvtps_ph(_mm256_loadu_ps(in + i), _MM_FROUND_TO_NEAREST_INT);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out + i), h);
  }
  float_to_half_scalar(in + i, out + i, n - i);
}

RDM_FAST_ROW_KERNELS(kAvx2Kernels, RDM_FAST_AVX2, half_to_float_f16c, float_to_half_f16c)
#endif

// The row kernels for this CPU, chosen once. RDM_FAST_CPU_ISA=baseline forces
// the baseline variant (for testing and comparisons).
const RowKernels& row_kernels() {
#ifdef RDM_FAST_HAVE_AVX2_KERNELS
  static const RowKernels* const chosen = [] {
    const char* isa = std::getenv("RDM_FAST_CPU_ISA");
    if (isa != nullptr && std::string_view(isa) == "baseline") {
      return &kBaselineKernels;
    }
    __builtin_cpu_init();
    const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
        __builtin_cpu_supports("f16c");
    return avx2 ? &kAvx2Kernels : &kBaselineKernels;
  }();
  return *chosen;
#else
  return kBaselineKernels;
#endif
}

// Converts n values to float into buf (returns p itself for float input).
template <typename T>
const float* as_float(const RowKernels& k, const T* p, int64_t n, std::vector<float>& buf) {
  if constexpr (std::is_same_v<T, float>) {
    return p;
  } else if constexpr (std::is_same_v<T, c10::Half>) {
    k.half_to_float(p, buf.data(), n);
    return buf.data();
  } else {
    for (int64_t i = 0; i < n; ++i) {
      buf[i] = static_cast<float>(p[i]);
    }
    return buf.data();
  }
}

// Output buffer for n float values destined for p (p itself for float).
template <typename T>
float* float_out(T* p, std::vector<float>& buf) {
  if constexpr (std::is_same_v<T, float>) {
    return p;
  } else {
    return buf.data();
  }
}

// Rounds the float values written by float_out to T (no-op for float).
template <typename T>
void store(const RowKernels& k, const float* src, T* dst, int64_t n) {
  if constexpr (std::is_same_v<T, c10::Half>) {
    k.float_to_half(src, dst, n);
  } else if constexpr (!std::is_same_v<T, float>) {
    for (int64_t i = 0; i < n; ++i) {
      dst[i] = static_cast<T>(src[i]);
    }
  }
}

// Pointers to the float32 parameters; null when absent.
struct Params {
  const float* weight;
  const float* bias;
  const float* add;
  float eps;
  bool silu;
};

// Calls fn(values as float, offset, length) over p[0, n) in blocks of at most
// kRunLength values (converted into buf unless T is float).
template <typename T, typename Fn>
void for_blocks(const RowKernels& k, const T* p, int64_t n, std::vector<float>& buf, Fn&& fn) {
  for (int64_t start = 0; start < n; start += kRunLength) {
    const int64_t len = std::min(kRunLength, n - start);
    fn(as_float(k, p + start, len, buf), start, len);
  }
}

// NCHW: each (batch, group) is one contiguous run of D * HW values; it is
// read three times (the later passes mostly from cache).
template <typename T>
void group_norm_nchw(const T* x, T* y, const GroupNormSizes& s, const Params& prm) {
  const RowKernels& k = row_kernels();
  const int64_t D = s.channels / s.groups;
  const int64_t HW = s.spatial;
  const int64_t group_numel = D * HW;
  at::parallel_for(0, s.batch * s.groups, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> in_buf(std::is_same_v<T, float> ? 0 : kRunLength);
    std::vector<float> out_buf(std::is_same_v<T, float> ? 0 : kRunLength);
    for (int64_t bg = begin; bg < end; ++bg) {
      const int64_t b = bg / s.groups;
      const int64_t c0 = (bg % s.groups) * D;
      const T* xg = x + bg * group_numel;
      T* yg = y + bg * group_numel;
      const float* add_row = prm.add ? prm.add + b * s.channels + c0 : nullptr;

      const float first = static_cast<float>(xg[0]);  // the sums are of x - first
      double total = static_cast<double>(first) * group_numel;
      for (int64_t c = 0; c < D; ++c) {
        for_blocks(k, xg + c * HW, HW, in_buf, [&](const float* v, int64_t, int64_t len) {
          total += k.shifted_sum(v, len, first);
        });
        if (add_row) {
          total += static_cast<double>(add_row[c]) * HW;
        }
      }
      const double mean = total / group_numel;
      // Per-channel centre in x units: x + add - mean == x - centre.
      auto centre_of = [&](int64_t c) {
        return static_cast<float>(add_row ? mean - add_row[c] : mean);
      };
      double sq = 0.0;
      for (int64_t c = 0; c < D; ++c) {
        const float centre = centre_of(c);
        for_blocks(k, xg + c * HW, HW, in_buf, [&](const float* v, int64_t, int64_t len) {
          sq += k.centred_sq_sum(v, len, centre);
        });
      }
      const float rstd = static_cast<float>(1.0 / std::sqrt(sq / group_numel + prm.eps));
      for (int64_t c = 0; c < D; ++c) {
        const float centre = centre_of(c);
        const float scale = prm.weight ? rstd * prm.weight[c0 + c] : rstd;
        const float shift = prm.bias ? prm.bias[c0 + c] : 0.0f;
        T* yc = yg + c * HW;
        for_blocks(k, xg + c * HW, HW, in_buf, [&](const float* v, int64_t start, int64_t len) {
          float* out = float_out(yc + start, out_buf);
          k.normalize(v, out, len, centre, scale, shift, prm.silu);
          store(k, out, yc + start, len);
        });
      }
    }
  });
}

// NHWC (channels_last, 4-D): per-channel partial sums over chunks of spatial
// rows, reduced per group; every pass reads x contiguously.
template <typename T>
void group_norm_nhwc(const T* x, T* y, const GroupNormSizes& s, const Params& prm) {
  const RowKernels& k = row_kernels();
  const int64_t B = s.batch;
  const int64_t C = s.channels;
  const int64_t HW = s.spatial;
  const int64_t G = s.groups;
  const int64_t D = C / G;
  const int64_t rows_per_chunk = std::clamp<int64_t>(kChunkElems / C, 1, std::min(HW, kRunLength));
  const int64_t n_chunks = (HW + rows_per_chunk - 1) / rows_per_chunk;
  const int64_t n_items = B * n_chunks;
  std::vector<double> partial(n_items * C);
  std::vector<float> first(B * C);   // pixel 0's values: the first pass sums x - first
  std::vector<float> centre(B * C);  // x - centre == x + add - mean
  std::vector<float> scale(B * C);
  std::vector<float> shift(B * C);

  // Runs fn(input row as float, output row pointer, batch) over the rows of
  // every work item in [begin, end); row_buf holds converted rows.
  auto for_rows = [&](int64_t begin, int64_t end, std::vector<float>& row_buf, auto&& fn) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / n_chunks;
      const int64_t r0 = (item % n_chunks) * rows_per_chunk;
      const int64_t r1 = std::min(HW, r0 + rows_per_chunk);
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t off = (b * HW + r) * C;
        fn(item, b, as_float(k, x + off, C, row_buf), y + off);
      }
    }
  };
  // Per-channel sums of each work item into `partial` (pass 1: values,
  // pass 2: squared deviations from `centre`).
  auto accumulate = [&](bool squares) {
    at::parallel_for(0, n_items, 1, [&](int64_t begin, int64_t end) {
      std::vector<float> row_buf(std::is_same_v<T, float> ? 0 : C);
      std::vector<float> acc(C);
      int64_t current = -1;
      auto flush = [&] {
        if (current >= 0) {
          std::copy(acc.begin(), acc.end(), partial.begin() + current * C);
        }
        std::fill(acc.begin(), acc.end(), 0.0f);
      };
      for_rows(begin, end, row_buf, [&](int64_t item, int64_t b, const float* row, T*) {
        if (item != current) {
          flush();
          current = item;
        }
        if (squares) {
          k.add_sq_channels(row, centre.data() + b * C, acc.data(), C);
        } else {
          k.add_channels(row, first.data() + b * C, acc.data(), C);
        }
      });
      flush();
    });
  };
  // Per-group totals of `partial` for batch b.
  auto group_totals = [&](int64_t b, std::vector<double>& out) {
    std::fill(out.begin(), out.end(), 0.0);
    for (int64_t chunk = 0; chunk < n_chunks; ++chunk) {
      const double* p = partial.data() + (b * n_chunks + chunk) * C;
      for (int64_t c = 0; c < C; ++c) {
        out[c / D] += p[c];
      }
    }
  };

  std::vector<double> totals(G);
  for (int64_t b = 0; b < B; ++b) {
    std::vector<float> row_buf(std::is_same_v<T, float> ? 0 : C);
    const float* row = as_float(k, x + b * HW * C, C, row_buf);
    std::copy(row, row + C, first.begin() + b * C);
  }
  accumulate(false);
  for (int64_t b = 0; b < B; ++b) {
    group_totals(b, totals);
    for (int64_t c = 0; c < C; ++c) {
      totals[c / D] += static_cast<double>(first[b * C + c]) * HW;
    }
    for (int64_t c = 0; c < C; ++c) {
      const int64_t g = c / D;
      double total = totals[g];
      if (prm.add) {
        for (int64_t cc = g * D; cc < (g + 1) * D; ++cc) {
          total += static_cast<double>(prm.add[b * C + cc]) * HW;
        }
      }
      const double mean = total / (D * HW);
      centre[b * C + c] = static_cast<float>(prm.add ? mean - prm.add[b * C + c] : mean);
    }
  }

  accumulate(true);
  for (int64_t b = 0; b < B; ++b) {
    group_totals(b, totals);
    for (int64_t c = 0; c < C; ++c) {
      const double var = totals[c / D] / (D * HW);
      const float rstd = static_cast<float>(1.0 / std::sqrt(var + prm.eps));
      scale[b * C + c] = prm.weight ? rstd * prm.weight[c] : rstd;
      shift[b * C + c] = prm.bias ? prm.bias[c] : 0.0f;
    }
  }

  at::parallel_for(0, n_items, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> row_buf(std::is_same_v<T, float> ? 0 : C);
    std::vector<float> out_buf(std::is_same_v<T, float> ? 0 : C);
    for_rows(begin, end, row_buf, [&](int64_t, int64_t b, const float* row, T* out_row) {
      float* out = float_out(out_row, out_buf);
      k.normalize_channels(
          row, out, centre.data() + b * C, scale.data() + b * C, shift.data() + b * C, C, prm.silu);
      store(k, out, out_row, C);
    });
  });
}

template <typename T>
void run(
    const at::Tensor& x,
    at::Tensor& out,
    const GroupNormSizes& sizes,
    const Params& prm,
    bool channels_last) {
  const T* xp = x.data_ptr<T>();
  T* yp = out.data_ptr<T>();
  if (channels_last) {
    group_norm_nhwc(xp, yp, sizes, prm);
  } else {
    group_norm_nchw(xp, yp, sizes, prm);
  }
}

at::Tensor group_norm_cpu(
    const at::Tensor& input,
    const c10::optional<at::Tensor>& weight,
    const c10::optional<at::Tensor>& bias,
    int64_t num_groups,
    double eps,
    const c10::optional<at::Tensor>& add,
    bool silu) {
  const GroupNormSizes sizes =
      check_group_norm_args(input, weight, bias, num_groups, add);
  TORCH_CHECK(input.device().is_cpu(), "group_norm_cpu: expected a CPU tensor");
  const GroupNormOperands op = prepare_group_norm(input, weight, bias, add);
  const at::Tensor& x = op.x;
  at::Tensor out = op.out;
  const bool channels_last = op.channels_last;
  if (x.numel() == 0) {
    return out;
  }
  const Params prm{
      data_or_null(op.weight), data_or_null(op.bias), data_or_null(op.add),
      static_cast<float>(eps), silu};
  switch (x.scalar_type()) {
    case at::kFloat:
      run<float>(x, out, sizes, prm, channels_last);
      break;
    case at::kHalf:
      run<c10::Half>(x, out, sizes, prm, channels_last);
      break;
    default:  // bfloat16; other dtypes were rejected above
      run<c10::BFloat16>(x, out, sizes, prm, channels_last);
      break;
  }
  return out;
}

}  // namespace
}  // namespace rdm_fast

TORCH_LIBRARY_IMPL(rdm_fast, CPU, m) {
  m.impl("group_norm", &rdm_fast::group_norm_cpu);
}
