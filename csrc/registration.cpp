// The one registration of the `tidal` operator library: every schema, and its CPU and CUDA kernels.
// Python fake (shape) kernels for torch.compile live in tidal_ext/_fake.py.
#include <torch/custom_class.h>
#include <torch/library.h>

#include "backends.h"
#include "tidal/config.h"
#include "tidal/decode_context.h"

namespace tidal {
namespace {

// TidalConfig as a TorchScript/Python object (torch.classes.tidal.TidalConfig): the constructor
// validates, so Python's tidal_ext.TidalConfig and C++ share one set of checks.
struct TidalConfigObject : torch::CustomClassHolder {
  TidalConfig config;
  TidalConfigObject(int64_t top_k, std::vector<int64_t> select_layers, std::string mode, int64_t sink,
                    int64_t recent, int64_t correction_stride)
      : config(top_k, std::move(select_layers), mode, sink, recent, correction_stride) {}
};

}  // namespace
}  // namespace tidal

TORCH_LIBRARY(tidal, m) {
  // Full attention of one decode query per sequence over its valid cached tokens.
  m.def("decode_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor? seq_lens=None, float? scale=None) -> Tensor");
  // decode_attention's output plus the top_k positions (int32 [B, Hsel, top_k], sorted, -1 padded)
  // that the following sparse layers attend to; mode "head" ranks per query head, "group" per KV head.
  m.def("select_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor? seq_lens=None, int top_k=2048, "
        "str mode=\"head\", int sink=0, int recent=0, float? scale=None) -> (Tensor, Tensor)");
  // Attention over only the positions in `indices` (a row per query head or per KV head); entries
  // that are -1 or >= seq_len are skipped and never read.
  m.def("sparse_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor indices, Tensor? seq_lens=None, "
        "float? scale=None) -> Tensor");
  // Writes S new K/V rows per sequence at start[b] into the caches (in place), then causal attention
  // of the S queries over the cache: the KV-cache correction (and chunked prefill) step of a layer.
  m.def("correct_kv_attention(Tensor q, Tensor k, Tensor v, Tensor(a!) k_cache, Tensor(b!) v_cache, "
        "Tensor start, float? scale=None) -> Tensor");

  m.class_<tidal::TidalConfigObject>("TidalConfig")
      .def(torch::init<int64_t, std::vector<int64_t>, std::string, int64_t, int64_t, int64_t>())
      .def("role", [](const c10::intrusive_ptr<tidal::TidalConfigObject>& self, int64_t layer) {
        return std::string(tidal::to_string(self->config.role(layer)));
      })
      .def("validate_for_model", [](const c10::intrusive_ptr<tidal::TidalConfigObject>& self, int64_t num_layers) {
        self->config.validate_for_model(num_layers);
      });

  // The per-generation state shared by all layers (include/tidal/decode_context.h): lengths and
  // selection stay device tensors; the same object works from C++, Python and TorchScript.
  using Ctx = c10::intrusive_ptr<tidal::DecodeContext>;
  m.class_<tidal::DecodeContext>("DecodeContext")
      .def(torch::init([](const c10::intrusive_ptr<tidal::TidalConfigObject>& config, int64_t num_layers) {
        return c10::make_intrusive<tidal::DecodeContext>(config->config, num_layers);
      }))
      .def("begin_prefill", &tidal::DecodeContext::begin_prefill)
      .def("begin_step", &tidal::DecodeContext::begin_step)
      .def("in_prefill", &tidal::DecodeContext::in_prefill)
      .def("step", &tidal::DecodeContext::step)
      .def("role", [](const Ctx& self, int64_t layer) { return std::string(tidal::to_string(self->role(layer))); })
      .def("correction_due", &tidal::DecodeContext::correction_due)
      .def("seq_lens", &tidal::DecodeContext::seq_lens)
      .def("positions", &tidal::DecodeContext::positions)
      .def("correction_start", &tidal::DecodeContext::correction_start)
      .def("indices", [](const Ctx& self) { return self->indices(); })
      .def("has_indices", &tidal::DecodeContext::has_indices)
      .def("set_indices", &tidal::DecodeContext::set_indices)
      .def("num_layers", &tidal::DecodeContext::num_layers)
      .def("top_k", [](const Ctx& self) { return self->config().top_k; })
      .def("mode", [](const Ctx& self) { return std::string(tidal::to_string(self->config().mode)); })
      .def("sink", [](const Ctx& self) { return self->config().sink; })
      .def("recent", [](const Ctx& self) { return self->config().recent; })
      .def("correction_stride", [](const Ctx& self) { return self->config().correction_stride; });
}

TORCH_LIBRARY_IMPL(tidal, CPU, m) {
  m.impl("decode_attention", &tidal::cpu::decode_attention);
  m.impl("select_attention", &tidal::cpu::select_attention);
  m.impl("sparse_attention", &tidal::cpu::sparse_attention);
  m.impl("correct_kv_attention", &tidal::cpu::correct_kv_attention);
}

#ifdef TIDAL_WITH_CUDA
TORCH_LIBRARY_IMPL(tidal, CUDA, m) {
  m.impl("decode_attention", &tidal::cuda::decode_attention);
  m.impl("select_attention", &tidal::cuda::select_attention);
  m.impl("sparse_attention", &tidal::cuda::sparse_attention);
  m.impl("correct_kv_attention", &tidal::cuda::correct_kv_attention);
}
#endif
