#include "tidal/config.h"

#include <algorithm>

#include "checks.h"

namespace tidal {

SelectMode parse_select_mode(const std::string& mode, const char* op) {
  if (mode == "head") return SelectMode::Head;
  if (mode == "group") return SelectMode::Group;
  TIDAL_CHECK_ARG(false, op, "mode", "\"head\" or \"group\"", c10::str("\"", mode, "\""));
  return SelectMode::Head;  // unreachable
}

const char* to_string(SelectMode mode) { return mode == SelectMode::Head ? "head" : "group"; }

const char* to_string(LayerRole role) {
  switch (role) {
    case LayerRole::Full: return "full";
    case LayerRole::Select: return "select";
    case LayerRole::Sparse: return "sparse";
  }
  return "?";
}

void check_budget(int64_t top_k, int64_t sink, int64_t recent, const char* op) {
  TIDAL_CHECK_ARG(top_k >= 1 && top_k <= kMaxTopK, op, "top_k", c10::str("1 <= top_k <= ", kMaxTopK), top_k);
  TIDAL_CHECK_ARG(sink >= 0, op, "sink", "sink >= 0", sink);
  TIDAL_CHECK_ARG(recent >= 0, op, "recent", "recent >= 0", recent);
  // The newest token is always kept, so it takes a slot even when recent == 0.
  TIDAL_CHECK_ARG(sink + std::max<int64_t>(recent, 1) <= top_k, op, "sink/recent",
                  c10::str("sink + max(recent, 1) <= top_k = ", top_k),
                  c10::str(sink + std::max<int64_t>(recent, 1), " (sink ", sink, ", recent ", recent, ")"));
}

TidalConfig::TidalConfig(int64_t top_k_, std::vector<int64_t> select_layers_, const std::string& mode_,
                         int64_t sink_, int64_t recent_, int64_t correction_stride_)
    : top_k(top_k_),
      select_layers(std::move(select_layers_)),
      mode(parse_select_mode(mode_, "TidalConfig")),
      sink(sink_),
      recent(recent_),
      correction_stride(correction_stride_) {
  validate();
}

void TidalConfig::validate() const {
  constexpr const char* op = "TidalConfig";
  check_budget(top_k, sink, recent, op);
  for (size_t i = 0; i < select_layers.size(); ++i) {
    TIDAL_CHECK_ARG(select_layers[i] >= 0, op, "select_layers", "layer indices >= 0",
                    c10::str(select_layers[i], " at position ", i));
    if (i > 0)
      TIDAL_CHECK_ARG(select_layers[i] > select_layers[i - 1], op, "select_layers", "strictly increasing layer indices",
                      c10::str(c10::IntArrayRef(select_layers)));
  }
  TIDAL_CHECK_ARG(correction_stride >= 0, op, "correction_stride", "correction_stride >= 0 (0 = off)",
                  correction_stride);
}

void TidalConfig::validate_for_model(int64_t num_layers) const {
  validate();
  if (!select_layers.empty())
    TIDAL_CHECK_ARG(select_layers.back() < num_layers, "TidalConfig", "select_layers",
                    c10::str("layer indices < the model's ", num_layers, " layers"), c10::str(c10::IntArrayRef(select_layers)));
}

LayerRole TidalConfig::role(int64_t layer_idx) const {
  if (select_layers.empty() || layer_idx < select_layers.front()) return LayerRole::Full;
  if (std::binary_search(select_layers.begin(), select_layers.end(), layer_idx)) return LayerRole::Select;
  return LayerRole::Sparse;
}

}  // namespace tidal
