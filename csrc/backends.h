// The per-backend kernels behind each op, with the exact signatures registration.cpp binds to the
// schemas. tidal::cpu is always built; tidal::cuda only with TIDAL_WITH_CUDA.
#pragma once

#include <optional>
#include <tuple>

#include <ATen/core/Tensor.h>
#include <c10/util/string_view.h>

#define TIDAL_DECLARE_BACKEND_OPS                                                                          \
  at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,   \
                              const std::optional<at::Tensor>& seq_lens, std::optional<double> scale);     \
  std::tuple<at::Tensor, at::Tensor> select_attention(                                                     \
      const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,                           \
      const std::optional<at::Tensor>& seq_lens, int64_t top_k, c10::string_view mode, int64_t sink,       \
      int64_t recent, std::optional<double> scale);                                                        \
  at::Tensor sparse_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,   \
                              const at::Tensor& indices, const std::optional<at::Tensor>& seq_lens,        \
                              std::optional<double> scale);                                                \
  at::Tensor correct_kv_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,           \
                                  at::Tensor& k_cache, at::Tensor& v_cache, const at::Tensor& start,       \
                                  std::optional<double> scale);

namespace tidal::cpu {
TIDAL_DECLARE_BACKEND_OPS
}  // namespace tidal::cpu

namespace tidal::cuda {
TIDAL_DECLARE_BACKEND_OPS
}  // namespace tidal::cuda
