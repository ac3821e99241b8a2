// TidalConfig: the layer schedule and selection budget of one TidalDecode model.
//
// Layer roles during decode (prefill is always full attention):
//   layer <  select_layers[0]  -> Full    plain attention over every cached token
//   layer in select_layers     -> Select  full attention + pick top_k positions (select_attention)
//   any other later layer      -> Sparse  attention over the positions of the last select layer
// With no select layers every layer is Full (TidalDecode off, the baseline).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace tidal {

// Largest top_k any op accepts (1M positions); a sanity bound on the indices allocation.
constexpr int64_t kMaxTopK = int64_t(1) << 20;

enum class SelectMode { Head, Group };
enum class LayerRole { Full, Select, Sparse };

// "head" / "group" -> SelectMode; anything else throws naming `op` and the argument.
SelectMode parse_select_mode(const std::string& mode, const char* op);
const char* to_string(SelectMode mode);
const char* to_string(LayerRole role);

// Checks the budget arguments shared by select_attention and TidalConfig; throws naming `op`.
void check_budget(int64_t top_k, int64_t sink, int64_t recent, const char* op);

struct TidalConfig {
  int64_t top_k = 2048;                       // tokens attended by sparse layers, all included
  std::vector<int64_t> select_layers{2, 13};  // strictly increasing layer indices
  SelectMode mode = SelectMode::Head;         // head: a set per query head; group: per KV head
  int64_t sink = 0;                           // first tokens always kept
  int64_t recent = 0;                         // last tokens always kept (the newest always is)
  int64_t correction_stride = 0;              // re-run the last S tokens with full attention every
                                              // S decode steps; 0 = off

  TidalConfig() = default;
  // Validates; throws c10::Error naming the bad field with expected vs actual.
  TidalConfig(int64_t top_k, std::vector<int64_t> select_layers, const std::string& mode = "head",
              int64_t sink = 0, int64_t recent = 0, int64_t correction_stride = 0);

  void validate() const;
  // Also checks every select layer is < num_layers (a model's layer count).
  void validate_for_model(int64_t num_layers) const;
  LayerRole role(int64_t layer_idx) const;
};

}  // namespace tidal
