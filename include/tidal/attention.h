// TidalAttention: one attention layer that acts as full, select or sparse attention as its
// DecodeContext says, on a KV cache it owns (preallocated to a capacity) or borrows.
//
// With hidden_size > 0 it has Llama-style q/k/v/o projections (no bias) and takes hidden states;
// with rope_theta > 0 it applies the rotary embedding (Llama convention: rotate_half, position
// p gets angle p * theta^(-2i/D)) to q and k. The *_qkv methods take already projected (and
// rotated) q/k/v and return the attention output per head, for callers with their own projections.
//
// Positions: prefill writes tokens 0..T-1 of every sequence (prompts right-padded to T; a sequence's
// real length is the context's seq_lens), a decode step writes at ctx.positions(), a correction
// rewrites the last S tokens. Nothing here reads a device tensor on the host. Inference only: the
// methods run without autograd recording.
#pragma once

#include <torch/nn/module.h>
#include <torch/nn/modules/linear.h>
#include <torch/nn/pimpl.h>

#include "tidal/decode_context.h"
#include "tidal/ops.h"

namespace tidal {

struct TidalAttentionOptions {
  int64_t layer_idx = 0;
  int64_t num_heads = 32;     // query heads Hq
  int64_t num_kv_heads = 8;   // KV heads Hkv (Hq % Hkv == 0)
  int64_t head_dim = 128;     // D
  int64_t hidden_size = 0;    // > 0: q/k/v/o projections from/to this width
  double rope_theta = 0.0;    // > 0: rotary embedding with this base
  int64_t max_positions = 0;  // positions the rotary embedding is defined for (needed with rope)
  std::optional<double> scale;  // softmax scale; default 1/sqrt(D)
};

class TidalAttentionImpl : public torch::nn::Module {
 public:
  explicit TidalAttentionImpl(const TidalAttentionOptions& options);

  const TidalAttentionOptions& options() const { return options_; }

  // Owned cache: zeros [batch, Hkv, capacity, D] with `tensor_options` (dtype, device).
  void allocate_cache(int64_t batch, int64_t capacity, const at::TensorOptions& tensor_options);
  // Borrowed cache (e.g. a slice of a model-wide buffer): [B, Hkv, N, D], last dim contiguous.
  // Both reject here what the ops would reject at the first token: a dtype the device's kernels
  // lack (CPU: float/half/bfloat16; CUDA: half/bfloat16), k/v of different dtypes or devices, a
  // strided last dim, N > 2^31 - 1. (top_k > N is not an error: every token is kept.)
  void set_cache(at::Tensor k_cache, at::Tensor v_cache);
  const at::Tensor& k_cache() const { return k_cache_; }
  const at::Tensor& v_cache() const { return v_cache_; }

  // With projections: x [B, T, hidden] -> [B, T, hidden]; x [B, hidden] -> [B, hidden] for a step.
  at::Tensor prefill(const at::Tensor& x, DecodeContext& ctx);
  at::Tensor decode_step(const at::Tensor& x, DecodeContext& ctx);
  at::Tensor correct(const at::Tensor& x, DecodeContext& ctx);

  // Without projections: q [B, Hq, T, D], k/v [B, Hkv, T, D] (rotated already) -> [B, Hq, T, D].
  at::Tensor prefill_qkv(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, DecodeContext& ctx);
  // q [B, Hq, D], k/v [B, Hkv, D] -> [B, Hq, D]: appends k/v at ctx.positions(), attends per role.
  at::Tensor decode_qkv(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, DecodeContext& ctx);
  // q [B, Hq, S, D], k/v [B, Hkv, S, D] of the last S tokens -> [B, Hq, S, D], rewriting their K/V.
  at::Tensor correct_qkv(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, DecodeContext& ctx);

  // The rotary embedding of x [B, H, S, D] at positions [B, S] (int) (x itself without rope).
  at::Tensor rotate(const at::Tensor& x, const at::Tensor& positions) const;

  // For wrappers that own the tensors (the Python facade): make the layer use these projection
  // weights ([out, in], as nn.Linear); shares their storage.
  void set_projection_weights(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& o);

 private:
  at::Tensor project_in(torch::nn::Linear proj, const at::Tensor& x, int64_t heads);
  at::Tensor project_out(const at::Tensor& heads_out);
  at::Tensor chunk(const at::Tensor& x, const at::Tensor& start, DecodeContext& ctx);
  void require_cache(const char* what) const;
  void check_hidden(const char* what, const at::Tensor& x, int64_t rank) const;
  void check_batch(const char* what, int64_t batch, const DecodeContext& ctx) const;

  TidalAttentionOptions options_;
  torch::nn::Linear q_proj_{nullptr}, k_proj_{nullptr}, v_proj_{nullptr}, o_proj_{nullptr};
  // [D/2] float64 theta^(-2i/D): angles are made per call, no [N, D] tables. Not a buffer, so a
  // conversion of the module to bf16 can't round it; it follows the cache's device.
  mutable at::Tensor inv_freq_;
  at::Tensor k_cache_, v_cache_;
  // Host-side bound on the tokens in the cache (prefill length + decode steps since): a decode step
  // past the capacity is an error raised here, without reading the device lengths.
  int64_t tokens_bound_ = 0;
};

TORCH_MODULE(TidalAttention);

}  // namespace tidal
