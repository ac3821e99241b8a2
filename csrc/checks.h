// Input validation shared by the CPU and CUDA launchers, and the conversion of validated tensors into
// the framework-free kernel parameters. Every failure is a c10::Error whose message reads
//   "tidal.<op>: <argument>: expected <what>, got <actual>"
// so users (and tests) can tell which argument of which op was wrong.
#pragma once

#include <optional>

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include "tidal/kernels/params.h"

#define TIDAL_CHECK_ARG(cond, op, arg, expected, actual) \
  TORCH_CHECK((cond), "tidal.", op, ": ", arg, ": expected ", expected, ", got ", actual)

namespace tidal {

// top_k/sink/recent/mode of select_attention; returns true for group mode.
bool check_select_args(const char* op, int64_t top_k, c10::string_view mode, int64_t sink, int64_t recent);

// indices int32 [B, Hsel, K], Hsel in {Hq, Hkv}, same device as q.
void check_indices(const char* op, const at::Tensor& indices, const kernels::DecodeParams& p, const at::Tensor& q);

// Validated decode/select/sparse inputs as kernel parameters, holding the tensors they point into
// (q with a contiguous last dim, seq_lens contiguous, a fresh contiguous out [B, Hq, D]). Value
// checks of seq_lens run only for CPU tensors: reading device data would synchronize the host, so
// CUDA kernels clamp lengths to [0, N] instead.
struct DecodeLaunch {
  kernels::DecodeParams params;
  at::Tensor q, seq_lens, out;
};
DecodeLaunch prepare_decode(const char* op, const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                            const std::optional<at::Tensor>& seq_lens, std::optional<double> scale);

struct CorrectLaunch {
  kernels::CorrectParams params;
  at::Tensor q, k, v, start, out;
};
CorrectLaunch prepare_correct(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                              at::Tensor& k_cache, at::Tensor& v_cache, const at::Tensor& start,
                              std::optional<double> scale);

}  // namespace tidal
