#include "tidal/decode_context.h"

#include <ATen/ops/arange.h>
#include <ATen/ops/sub.h>

#include "../checks.h"

namespace tidal {

DecodeContext::DecodeContext(TidalConfig config, int64_t num_layers)
    : config_(std::move(config)), num_layers_(num_layers) {
  TIDAL_CHECK_ARG(num_layers >= 1, "DecodeContext", "num_layers", "at least one layer", num_layers);
  config_.validate_for_model(num_layers);
}

void DecodeContext::begin_prefill(const at::Tensor& seq_lens) {
  TIDAL_CHECK_ARG(seq_lens.defined() && seq_lens.dim() == 1 && seq_lens.scalar_type() == at::kInt,
                  "DecodeContext.begin_prefill", "seq_lens", "an int32 tensor [B]",
                  seq_lens.defined() ? c10::str(seq_lens.scalar_type(), " ", seq_lens.sizes()) : "undefined");
  seq_lens_ = seq_lens.clone();  // owned: the caller's tensor is never advanced in place
  position_index_ = at::sub(seq_lens_, 1).to(at::kLong);
  batch_index_ = at::arange(seq_lens_.size(0), seq_lens_.options().dtype(at::kLong));
  indices_ = at::Tensor();
  step_ = 0;
  prefill_ = true;
}

void DecodeContext::begin_step() {
  require_lengths("begin_step");
  seq_lens_.add_(1);  // device ops, in place: the lengths never visit the host
  position_index_.copy_(seq_lens_);
  position_index_.sub_(1);
  indices_ = at::Tensor();  // a step's sparse layers use only that step's selection
  ++step_;
  prefill_ = false;
}

LayerRole DecodeContext::role(int64_t layer_idx) const {
  TIDAL_CHECK_ARG(layer_idx >= 0 && layer_idx < num_layers_, "DecodeContext.role", "layer_idx",
                  c10::str("0 <= layer_idx < ", num_layers_), layer_idx);
  return prefill_ ? LayerRole::Full : config_.role(layer_idx);
}

bool DecodeContext::correction_due() const {
  const int64_t stride = config_.correction_stride;
  return !prefill_ && stride > 0 && step_ % stride == 0;
}

at::Tensor DecodeContext::seq_lens() const {
  require_lengths("seq_lens");
  return seq_lens_;
}

at::Tensor DecodeContext::positions() const {
  require_lengths("positions");
  return at::sub(seq_lens_, 1);
}

at::Tensor DecodeContext::correction_start(int64_t chunk) const {
  require_lengths("correction_start");
  TIDAL_CHECK_ARG(chunk >= 1, "DecodeContext.correction_start", "chunk", "chunk >= 1", chunk);
  return at::sub(seq_lens_, chunk);
}

const at::Tensor& DecodeContext::indices() const {
  TIDAL_CHECK_ARG(indices_.defined(), "DecodeContext.indices", "indices",
                  "a selection made by a select layer earlier in this step",
                  c10::str("none (step ", step_, ", first select layer ",
                           config_.select_layers.empty() ? -1 : config_.select_layers.front(), ")"));
  return indices_;
}

void DecodeContext::set_indices(at::Tensor indices) {
  TIDAL_CHECK_ARG(indices.defined() && indices.dim() == 3 && indices.scalar_type() == at::kInt,
                  "DecodeContext.set_indices", "indices", "an int32 tensor [B, Hsel, top_k]",
                  indices.defined() ? c10::str(indices.scalar_type(), " ", indices.sizes()) : "undefined");
  indices_ = std::move(indices);
}

void DecodeContext::require_lengths(const char* what) const {
  TIDAL_CHECK_ARG(seq_lens_.defined(), c10::str("DecodeContext.", what).c_str(), "seq_lens",
                  "begin_prefill(seq_lens) first", "no lengths yet");
}

}  // namespace tidal
