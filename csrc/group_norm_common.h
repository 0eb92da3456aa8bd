// Argument checks and layout helpers shared by the CPU and CUDA group_norm
// kernels. Errors on bad arguments are raised as ValueError in Python
// (TORCH_CHECK_VALUE), matching rdm_fast.ops.group_norm.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <c10/util/Optional.h>

#include <cstdint>
#include <sstream>
#include <string>

namespace rdm_fast {

// Problem sizes of one group_norm call; spatial is the product of all
// spatial dimensions (1 when x is (B, C)).
struct GroupNormSizes {
  int64_t batch;
  int64_t channels;
  int64_t spatial;
  int64_t groups;
};

// Formats sizes like a Python tuple, e.g. "(2, 6)" or "(12,)".
inline std::string shape_str(at::IntArrayRef sizes) {
  std::ostringstream os;
  os << "(";
  for (size_t i = 0; i < sizes.size(); ++i) {
    os << (i ? ", " : "") << sizes[i];
  }
  os << (sizes.size() == 1 ? ",)" : ")");
  return os.str();
}

inline bool is_supported_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16;
}

inline void check_param(
    const c10::optional<at::Tensor>& t,
    const char* name,
    const at::Tensor& x,
    at::IntArrayRef expected_shape,
    const char* expected_desc) {
  if (!t.has_value() || !t->defined()) {
    return;
  }
  TORCH_CHECK_VALUE(
      t->sizes() == expected_shape,
      "group_norm: expected ", name, " of shape ", expected_desc, " = ",
      shape_str(expected_shape), ", got shape ", shape_str(t->sizes()));
  TORCH_CHECK_VALUE(
      is_supported_dtype(t->scalar_type()),
      "group_norm: unsupported ", name, " dtype ", t->scalar_type(),
      " (expected float32, float16 or bfloat16)");
  TORCH_CHECK_VALUE(
      t->device() == x.device(), "group_norm: expected ", name,
      " on device ", x.device(), ", got ", t->device());
}

// Validates the arguments and returns the problem sizes.
inline GroupNormSizes check_group_norm_args(
    const at::Tensor& x,
    const c10::optional<at::Tensor>& weight,
    const c10::optional<at::Tensor>& bias,
    int64_t num_groups,
    const c10::optional<at::Tensor>& add) {
  TORCH_CHECK_VALUE(
      x.dim() >= 2,
      "group_norm: expected x of shape (B, C, *spatial) with at least 2 "
      "dims, got shape ", shape_str(x.sizes()));
  TORCH_CHECK_VALUE(
      is_supported_dtype(x.scalar_type()), "group_norm: unsupported dtype ",
      x.scalar_type(), " (expected float32, float16 or bfloat16)");
  const int64_t batch = x.size(0);
  const int64_t channels = x.size(1);
  TORCH_CHECK_VALUE(
      num_groups > 0 && channels % num_groups == 0,
      "group_norm: number of channels C=", channels,
      " must be divisible by num_groups=", num_groups, " (x of shape ",
      shape_str(x.sizes()), ")");
  const int64_t channel_shape[] = {channels};
  const int64_t add_shape[] = {batch, channels};
  check_param(weight, "weight", x, channel_shape, "(C,)");
  check_param(bias, "bias", x, channel_shape, "(C,)");
  check_param(add, "add", x, add_shape, "(B, C)");
  int64_t spatial = 1;
  for (int64_t d = 2; d < x.dim(); ++d) {
    spatial *= x.size(d);
  }
  return {batch, channels, spatial, num_groups};
}

// True when x is 4-D and laid out as NHWC (channels_last) but not also NCHW
// contiguous (tensors with trivial dims can be both; then NCHW is used).
inline bool is_channels_last_only(const at::Tensor& x) {
  return x.dim() == 4 && !x.is_contiguous() &&
      x.is_contiguous(at::MemoryFormat::ChannelsLast);
}

// Optional per-channel parameter as a contiguous float32 tensor (undefined
// when absent). These are (C,) or (B, C), so the conversion is cheap.
inline at::Tensor float_param(const c10::optional<at::Tensor>& t) {
  if (!t.has_value() || !t->defined()) {
    return at::Tensor();
  }
  return t->to(at::kFloat).contiguous();
}

inline const float* data_or_null(const at::Tensor& t) {
  return t.defined() ? t.data_ptr<float>() : nullptr;
}

// What both device kernels start from: x in a layout they read in place
// (NCHW-contiguous or channels_last), an output of the same layout, and the
// optional parameters as float32 tensors.
struct GroupNormOperands {
  at::Tensor x;
  at::Tensor out;
  at::Tensor weight;
  at::Tensor bias;
  at::Tensor add;
  bool channels_last;
};

inline GroupNormOperands prepare_group_norm(
    const at::Tensor& input,
    const c10::optional<at::Tensor>& weight,
    const c10::optional<at::Tensor>& bias,
    const c10::optional<at::Tensor>& add) {
  const bool channels_last = is_channels_last_only(input);
  at::Tensor x = channels_last || input.is_contiguous() ? input : input.contiguous();
  at::Tensor out = at::empty_like(x);
  return {x, out, float_param(weight), float_param(bias), float_param(add), channels_last};
}

}  // namespace rdm_fast
