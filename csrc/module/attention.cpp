#include "tidal/attention.h"

#include <cmath>
#include <limits>

#include <torch/nn/functional/linear.h>
#include <torch/torch.h>

#include "../checks.h"
#include "tidal/ops.h"

namespace tidal {
namespace {

using torch::indexing::Slice;

at::Tensor rotate_half(const at::Tensor& x) {
  const int64_t half = x.size(-1) / 2;
  return at::cat({-x.narrow(-1, half, half), x.narrow(-1, 0, half)}, -1);
}

// The cache dtypes the ops take on the cache's device (CPU: float too; CUDA: the tensor-core types).
void check_cache_dtype(const char* op, const char* arg, at::ScalarType dt, bool cuda) {
  TIDAL_CHECK_ARG(dt == at::kHalf || dt == at::kBFloat16 || (dt == at::kFloat && !cuda), op, arg,
                  cuda ? "dtype Half or BFloat16 on CUDA" : "dtype Float, Half or BFloat16", dt);
}

}  // namespace

TidalAttentionImpl::TidalAttentionImpl(const TidalAttentionOptions& o) : options_(o) {
  constexpr const char* op = "TidalAttention";
  TIDAL_CHECK_ARG(o.layer_idx >= 0, op, "layer_idx", ">= 0", o.layer_idx);
  TIDAL_CHECK_ARG(o.num_heads >= 1 && o.num_kv_heads >= 1 && o.num_heads % o.num_kv_heads == 0, op,
                  "num_heads/num_kv_heads", "num_heads a positive multiple of num_kv_heads",
                  c10::str(o.num_heads, "/", o.num_kv_heads));
  TIDAL_CHECK_ARG(kernels::is_supported_head_dim(o.head_dim), op, "head_dim", "32, 64, 96, 128 or 256", o.head_dim);
  TIDAL_CHECK_ARG(o.hidden_size >= 0, op, "hidden_size", ">= 0 (0: no projections)", o.hidden_size);
  // Checked here, not at the first op call that would reject it.
  TIDAL_CHECK_ARG(!o.scale.has_value() || std::isfinite(*o.scale), op, "scale", "a finite number or none",
                  o.scale.has_value() ? *o.scale : 0.0);
  if (o.hidden_size > 0) {
    auto linear = [&](int64_t in, int64_t out) { return torch::nn::Linear(torch::nn::LinearOptions(in, out).bias(false)); };
    q_proj_ = register_module("q_proj", linear(o.hidden_size, o.num_heads * o.head_dim));
    k_proj_ = register_module("k_proj", linear(o.hidden_size, o.num_kv_heads * o.head_dim));
    v_proj_ = register_module("v_proj", linear(o.hidden_size, o.num_kv_heads * o.head_dim));
    o_proj_ = register_module("o_proj", linear(o.num_heads * o.head_dim, o.hidden_size));
  }
  if (o.rope_theta > 0) {
    TIDAL_CHECK_ARG(o.max_positions >= 1, op, "max_positions", ">= 1 with rope_theta > 0", o.max_positions);
    // angle(p, i) = p * theta^(-2i/D), made per call in float64 (exact enough at 1M positions)
    const auto f64 = torch::TensorOptions().dtype(torch::kFloat64);
    inv_freq_ = torch::pow(o.rope_theta, -torch::arange(0, o.head_dim, 2, f64) / double(o.head_dim));
  }
}

void TidalAttentionImpl::set_projection_weights(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                const at::Tensor& o) {
  TIDAL_CHECK_ARG(q_proj_, "TidalAttention.set_projection_weights", "hidden_size", "> 0 (a layer with projections)", 0);
  const std::pair<torch::nn::Linear*, const at::Tensor*> pairs[] = {{&q_proj_, &q}, {&k_proj_, &k}, {&v_proj_, &v}, {&o_proj_, &o}};
  for (const auto& [proj, w] : pairs) {
    TIDAL_CHECK_ARG(w->sizes() == (*proj)->weight.sizes(), "TidalAttention.set_projection_weights", "weight",
                    c10::str("shape ", (*proj)->weight.sizes()), w->sizes());
    (*proj)->weight.set_data(*w);
  }
}


void TidalAttentionImpl::allocate_cache(int64_t batch, int64_t capacity, const at::TensorOptions& tensor_options) {
  constexpr const char* op = "TidalAttention.allocate_cache";
  TIDAL_CHECK_ARG(batch >= 0, op, "batch", ">= 0", batch);
  TIDAL_CHECK_ARG(capacity >= 0 && capacity <= std::numeric_limits<int32_t>::max(), op, "capacity",
                  "0 <= capacity <= 2^31 - 1 (int32 positions)", capacity);
  check_cache_dtype(op, "dtype", c10::typeMetaToScalarType(tensor_options.dtype()), tensor_options.device().is_cuda());
  const auto shape = {batch, options_.num_kv_heads, capacity, options_.head_dim};
  set_cache(torch::zeros(shape, tensor_options), torch::zeros(shape, tensor_options));
}

void TidalAttentionImpl::set_cache(at::Tensor k_cache, at::Tensor v_cache) {
  constexpr const char* op = "TidalAttention.set_cache";
  for (const auto& [arg, t] : {std::pair<const char*, const at::Tensor&>{"k_cache", k_cache}, {"v_cache", v_cache}}) {
    TIDAL_CHECK_ARG(t.defined() && t.dim() == 4 && t.size(1) == options_.num_kv_heads && t.size(3) == options_.head_dim,
                    op, arg, c10::str("[B, ", options_.num_kv_heads, ", N, ", options_.head_dim, "]"),
                    t.defined() ? c10::str(t.sizes()) : "undefined");
  }
  TIDAL_CHECK_ARG(k_cache.sizes() == v_cache.sizes(), op, "v_cache", c10::str("shape ", k_cache.sizes()), v_cache.sizes());
  // What every op would reject at the first token, rejected here where the cache is attached.
  const auto dt = k_cache.scalar_type();
  check_cache_dtype(op, "k_cache", dt, k_cache.is_cuda());
  TIDAL_CHECK_ARG(v_cache.scalar_type() == dt, op, "v_cache", c10::str("dtype ", dt, " (as k_cache)"),
                  v_cache.scalar_type());
  TIDAL_CHECK_ARG(v_cache.device() == k_cache.device(), op, "v_cache",
                  c10::str("device ", k_cache.device(), " (as k_cache)"), v_cache.device());
  for (const auto& [arg, t] : {std::pair<const char*, const at::Tensor&>{"k_cache", k_cache}, {"v_cache", v_cache}})
    TIDAL_CHECK_ARG(t.stride(3) == 1 || t.size(3) <= 1, op, arg, "a contiguous last dim (stride 1)",
                    c10::str("stride ", t.stride(3)));
  TIDAL_CHECK_ARG(k_cache.size(2) <= std::numeric_limits<int32_t>::max(), op, "k_cache",
                  "a capacity N <= 2^31 - 1 (int32 positions)", k_cache.size(2));
  k_cache_ = std::move(k_cache);
  v_cache_ = std::move(v_cache);
  tokens_bound_ = 0;
  if (inv_freq_.defined()) inv_freq_ = inv_freq_.to(k_cache_.device());  // here, not inside a graph capture
}

at::Tensor TidalAttentionImpl::rotate(const at::Tensor& x, const at::Tensor& positions) const {
  if (!inv_freq_.defined()) return x;
  if (inv_freq_.device() != positions.device()) inv_freq_ = inv_freq_.to(positions.device());
  // positions [B, S] -> angles [B, 1, S, D/2] (float64 on the device), both halves share them
  const auto angles = (positions.to(inv_freq_.options()).unsqueeze(-1) * inv_freq_).unsqueeze(1);
  const auto cos = at::cat({angles.cos(), angles.cos()}, -1).to(torch::kFloat32);
  const auto sin = at::cat({angles.sin(), angles.sin()}, -1).to(torch::kFloat32);
  const auto xf = x.to(torch::kFloat32);
  return (xf * cos + rotate_half(xf) * sin).to(x.scalar_type());
}

at::Tensor TidalAttentionImpl::project_in(torch::nn::Linear proj, const at::Tensor& x, int64_t heads) {
  // x [B, T, hidden] -> [B, heads, T, D]
  return proj(x).view({x.size(0), x.size(1), heads, options_.head_dim}).transpose(1, 2);
}

at::Tensor TidalAttentionImpl::project_out(const at::Tensor& heads_out) {
  // [B, Hq, T, D] -> [B, T, hidden]
  const auto out = heads_out.transpose(1, 2).reshape({heads_out.size(0), heads_out.size(2), -1});
  return o_proj_(out);
}

void TidalAttentionImpl::require_cache(const char* what) const {
  TIDAL_CHECK_ARG(k_cache_.defined(), c10::str("TidalAttention.", what).c_str(), "k_cache",
                  "allocate_cache() or set_cache() first", "no cache");
}

void TidalAttentionImpl::check_hidden(const char* what, const at::Tensor& x, int64_t rank) const {
  const std::string op = c10::str("TidalAttention.", what);
  TIDAL_CHECK_ARG(q_proj_, op.c_str(), "hidden_size", "> 0 for the hidden-state methods (else use the *_qkv ones)", 0);
  TIDAL_CHECK_ARG(x.defined() && x.dim() == rank && x.size(-1) == options_.hidden_size, op.c_str(), "x",
                  rank == 3 ? c10::str("[B, T, ", options_.hidden_size, "]") : c10::str("[B, ", options_.hidden_size, "]"),
                  x.defined() ? c10::str(x.sizes()) : "undefined");
}

// The batch of the inputs, of the cache and of the context (its lengths) must agree.
void TidalAttentionImpl::check_batch(const char* what, int64_t batch, const DecodeContext& ctx) const {
  const std::string op = c10::str("TidalAttention.", what);
  require_cache(what);
  TIDAL_CHECK_ARG(batch == k_cache_.size(0), op.c_str(), "batch", c10::str(k_cache_.size(0), " (the cache's)"), batch);
  const int64_t ctx_batch = ctx.seq_lens().size(0);
  TIDAL_CHECK_ARG(ctx_batch == batch, op.c_str(), "ctx", c10::str("lengths for ", batch, " sequences"), ctx_batch);
  // Checked on every call, prefill included, so a layer beyond the context's model fails before the
  // first decode token (where ctx.role would reject it).
  TIDAL_CHECK_ARG(options_.layer_idx < ctx.num_layers(), op.c_str(), "ctx",
                  c10::str("a context of more than layer_idx = ", options_.layer_idx, " layers"),
                  c10::str(ctx.num_layers(), " layers"));
}

// Projections + rope for x [B, T, hidden] at positions start[b] + t, then the chunk attention.
at::Tensor TidalAttentionImpl::chunk(const at::Tensor& x, const at::Tensor& start, DecodeContext& ctx) {
  torch::NoGradGuard no_grad;
  const auto pos = start.to(torch::kLong).unsqueeze(1) + torch::arange(x.size(1), start.options().dtype(torch::kLong));
  const auto q = rotate(project_in(q_proj_, x, options_.num_heads), pos);
  const auto k = rotate(project_in(k_proj_, x, options_.num_kv_heads), pos);
  const auto v = project_in(v_proj_, x, options_.num_kv_heads);
  return project_out(tidal::correct_kv_attention(q, k, v, k_cache_, v_cache_, start.to(torch::kInt), options_.scale));
}

at::Tensor TidalAttentionImpl::prefill(const at::Tensor& x, DecodeContext& ctx) {
  check_hidden("prefill", x, 3);
  check_batch("prefill", x.size(0), ctx);
  tokens_bound_ = x.size(1);
  return chunk(x, torch::zeros({x.size(0)}, x.options().dtype(torch::kInt)), ctx);
}

at::Tensor TidalAttentionImpl::correct(const at::Tensor& x, DecodeContext& ctx) {
  check_hidden("correct", x, 3);
  check_batch("correct", x.size(0), ctx);
  return chunk(x, ctx.correction_start(x.size(1)), ctx);
}

at::Tensor TidalAttentionImpl::decode_step(const at::Tensor& x, DecodeContext& ctx) {
  torch::NoGradGuard no_grad;
  check_hidden("decode_step", x, 2);
  check_batch("decode_step", x.size(0), ctx);
  const auto x3 = x.unsqueeze(1);
  const auto pos = ctx.position_index().unsqueeze(1);
  const auto q = rotate(project_in(q_proj_, x3, options_.num_heads), pos).squeeze(2);
  const auto k = rotate(project_in(k_proj_, x3, options_.num_kv_heads), pos).squeeze(2);
  const auto v = project_in(v_proj_, x3, options_.num_kv_heads).squeeze(2);
  return project_out(decode_qkv(q, k, v, ctx).unsqueeze(2)).squeeze(1);
}

at::Tensor TidalAttentionImpl::prefill_qkv(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                           DecodeContext& ctx) {
  torch::NoGradGuard no_grad;
  check_batch("prefill_qkv", q.size(0), ctx);
  tokens_bound_ = q.dim() == 4 ? q.size(2) : 0;
  const auto start = torch::zeros({q.size(0)}, q.options().dtype(torch::kInt));
  return tidal::correct_kv_attention(q, k, v, k_cache_, v_cache_, start, options_.scale);
}

at::Tensor TidalAttentionImpl::correct_qkv(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                           DecodeContext& ctx) {
  torch::NoGradGuard no_grad;
  check_batch("correct_qkv", q.size(0), ctx);
  return tidal::correct_kv_attention(q, k, v, k_cache_, v_cache_, ctx.correction_start(q.size(2)), options_.scale);
}

at::Tensor TidalAttentionImpl::decode_qkv(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                          DecodeContext& ctx) {
  torch::NoGradGuard no_grad;
  check_batch("decode_qkv", q.size(0), ctx);
  TIDAL_CHECK_ARG(tokens_bound_ < k_cache_.size(2), "TidalAttention.decode_qkv", "k_cache",
                  c10::str("room for another token (capacity ", k_cache_.size(2), ")"),
                  c10::str(tokens_bound_, " tokens (prefill + decode steps) already"));
  ++tokens_bound_;
  TIDAL_CHECK_ARG(k.dim() == 3 && k.sizes() == v.sizes() && k.size(0) == k_cache_.size(0) &&
                      k.size(1) == options_.num_kv_heads && k.size(2) == options_.head_dim,
                  "TidalAttention.decode_qkv", "k/v",
                  c10::str("[", k_cache_.size(0), ", ", options_.num_kv_heads, ", ", options_.head_dim, "]"),
                  c10::str(k.sizes(), " / ", v.sizes()));
  // Append the new token's K/V at each sequence's own position (device indices: no host sync).
  // Clamped on the device too: a position past the capacity (lengths the host bound can't see,
  // e.g. a borrowed cache filled by the caller) overwrites the last row instead of writing outside.
  const auto pos = ctx.position_index().clamp(0, k_cache_.size(2) - 1);
  const auto& rows = ctx.batch_index();
  k_cache_.index_put_({rows, Slice(), pos}, k.to(k_cache_.scalar_type()));
  v_cache_.index_put_({rows, Slice(), pos}, v.to(v_cache_.scalar_type()));

  const auto lens = ctx.seq_lens();
  const TidalConfig& cfg = ctx.config();
  switch (ctx.role(options_.layer_idx)) {
    case LayerRole::Full:
      return tidal::decode_attention(q, k_cache_, v_cache_, lens, options_.scale);
    case LayerRole::Select: {
      auto [out, idx] = tidal::select_attention(q, k_cache_, v_cache_, lens, cfg.top_k, to_string(cfg.mode),
                                                cfg.sink, cfg.recent, options_.scale);
      ctx.set_indices(idx);
      return out;
    }
    case LayerRole::Sparse:
      return tidal::sparse_attention(q, k_cache_, v_cache_, ctx.indices(), lens, options_.scale);
  }
  return {};
}

}  // namespace tidal
