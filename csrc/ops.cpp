// The public C++ API (include/tidal/ops.h): each function calls its op through the dispatcher, so the
// kernel is chosen by device exactly as for torch.ops.tidal.* in Python.
#include "tidal/ops.h"

#include <ATen/core/dispatch/Dispatcher.h>

namespace tidal {
namespace {

template <typename Signature>
c10::TypedOperatorHandle<Signature> op_handle(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

}  // namespace

at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                            const std::optional<at::Tensor>& seq_lens, std::optional<double> scale) {
  static auto op = op_handle<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                        const std::optional<at::Tensor>&, std::optional<double>)>(
      "tidal::decode_attention");
  return op.call(q, k_cache, v_cache, seq_lens, scale);
}

std::tuple<at::Tensor, at::Tensor> select_attention(const at::Tensor& q, const at::Tensor& k_cache,
                                                    const at::Tensor& v_cache,
                                                    const std::optional<at::Tensor>& seq_lens, int64_t top_k,
                                                    const std::string& mode, int64_t sink, int64_t recent,
                                                    std::optional<double> scale) {
  static auto op = op_handle<std::tuple<at::Tensor, at::Tensor>(
      const at::Tensor&, const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&, int64_t,
      c10::string_view, int64_t, int64_t, std::optional<double>)>("tidal::select_attention");
  return op.call(q, k_cache, v_cache, seq_lens, top_k, mode, sink, recent, scale);
}

at::Tensor sparse_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                            const at::Tensor& indices, const std::optional<at::Tensor>& seq_lens,
                            std::optional<double> scale) {
  static auto op = op_handle<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                        const std::optional<at::Tensor>&, std::optional<double>)>(
      "tidal::sparse_attention");
  return op.call(q, k_cache, v_cache, indices, seq_lens, scale);
}

at::Tensor correct_kv_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, at::Tensor& k_cache,
                                at::Tensor& v_cache, const at::Tensor& start, std::optional<double> scale) {
  static auto op = op_handle<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, at::Tensor&,
                                        at::Tensor&, const at::Tensor&, std::optional<double>)>(
      "tidal::correct_kv_attention");
  return op.call(q, k, v, k_cache, v_cache, start, scale);
}

}  // namespace tidal
