// DecodeContext: the per-generation state every layer of one model shares.
//
// It holds the TidalConfig, the valid length of each sequence (an int32 device tensor, advanced on
// the device, never read on the host), the indices the last select layer picked (a device tensor,
// never copied to the host), and the decode-step counter that drives the layer roles and the
// KV-cache-correction schedule. It is a torch custom class (torch.classes.tidal.DecodeContext), so
// one object serves C++, Python and TorchScript.
//
// A generation:
//   ctx.begin_prefill(prompt_lens)      every layer: full causal attention over the prompt
//   loop:
//     ctx.begin_step()                  lengths += 1; the new token sits at positions()
//     every layer l: role(l) -> full / select (stores indices) / sparse (reads them)
//     if ctx.correction_due(): re-run the last correction_stride tokens with full attention
//
// Thread safety: none. A context belongs to one generation, driven by one thread on one stream;
// distinct contexts are independent.
#pragma once

#include <optional>

#include <ATen/core/Tensor.h>
#include <torch/custom_class.h>

#include "tidal/config.h"

namespace tidal {

class DecodeContext : public torch::CustomClassHolder {
 public:
  // num_layers: the model's layer count (select layers beyond it are rejected here).
  DecodeContext(TidalConfig config, int64_t num_layers);

  const TidalConfig& config() const { return config_; }
  int64_t num_layers() const { return num_layers_; }

  // Starts a generation: seq_lens int32 [B] are the prompt lengths (on the model's device).
  // Clears the selection and the step counter; until begin_step every layer is full.
  void begin_prefill(const at::Tensor& seq_lens);
  // Starts a decode step: every sequence grows by one token, at position old length. The lengths
  // advance in place, so a CUDA graph that captured begin_step advances them on every replay.
  void begin_step();

  bool in_prefill() const { return prefill_; }
  int64_t step() const { return step_; }  // decode steps begun since the prefill
  LayerRole role(int64_t layer_idx) const;
  // True on the steps after which the last correction_stride tokens are re-run with full attention.
  bool correction_due() const;

  at::Tensor seq_lens() const;   // int32 [B]: valid lengths, the current token included (live)
  at::Tensor positions() const;  // int32 [B]: the current token's position (seq_lens - 1)
  // int64 [B] copies of positions() and of 0..B-1, kept up to date by begin_step: the index
  // tensors every layer's cache append uses, made once per step instead of once per layer.
  const at::Tensor& position_index() const { return position_index_; }
  const at::Tensor& batch_index() const { return batch_index_; }
  // Where a correction chunk of `chunk` tokens starts: seq_lens - chunk (int32 [B]).
  at::Tensor correction_start(int64_t chunk) const;

  // The selection of the last select layer of this step (int32 [B, Hsel, top_k]).
  const at::Tensor& indices() const;
  bool has_indices() const { return indices_.defined(); }
  void set_indices(at::Tensor indices);

 private:
  void require_lengths(const char* what) const;

  TidalConfig config_;
  int64_t num_layers_;
  at::Tensor seq_lens_;
  at::Tensor position_index_, batch_index_;
  at::Tensor indices_;
  int64_t step_ = 0;
  bool prefill_ = true;
};

}  // namespace tidal
