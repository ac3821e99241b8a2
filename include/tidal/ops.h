// TidalDecode operators: the public C++ API.
//
// Each function calls the registered `torch.ops.tidal.*` operator through the dispatcher, so the
// CPU or CUDA kernel is chosen by the inputs' device, exactly as from Python or TorchScript.
//
// Shapes: B batch, Hq query heads, Hkv KV heads (Hq % Hkv == 0, G = Hq / Hkv query heads per KV
// head), D head dim (32, 64, 96, 128 or 256), N cache capacity.
//   q                 [B, Hq, D]       one decode query per sequence (any strides)
//   k_cache, v_cache  [B, Hkv, N, D]   last dim contiguous, other strides free (a slice of a bigger
//                                      buffer works); same dtype as q
//   seq_lens          int32 [B]        valid lengths 0..N, same device; nullopt = N for every row.
//                                      Tokens 0..seq_lens[b]-1 are valid; the newest is the last.
//   scale             nullopt = 1/sqrt(D)
// Dtypes: float32, float16, bfloat16 (CPU); float16, bfloat16 (CUDA). Accumulation is float32.
// Outputs are contiguous, in q's dtype. A sequence with seq_len 0 (a padding slot) gives zeros.
// Offsets are 64-bit (tensors past 2^31 elements work); CUDA grid limit: B <= 65535.
// Thread safety: the ops keep no state between calls (scratch comes from the caching allocator on
// the current stream), so calls from several threads or on several streams at once are safe.
#pragma once

#include <optional>
#include <string>
#include <tuple>

#include <ATen/core/Tensor.h>

namespace tidal {

// Full attention of one query per sequence over its valid tokens -> [B, Hq, D].
at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                            const std::optional<at::Tensor>& seq_lens = std::nullopt,
                            std::optional<double> scale = std::nullopt);

// The output of decode_attention plus the top_k positions to keep for the sparse layers:
// indices int32 [B, Hsel, top_k], Hsel = Hq for mode "head", Hkv for mode "group".
//  * head:  query head h ranks token t by s_h(t) = scale * q_h . k_t.
//  * group: KV head g ranks token t by max over its query heads h of s_h(t) - logsumexp_t' s_h(t')
//           (the largest log-probability any head of the group gives t).
//  * Always kept, counted inside the budget: the newest valid token (seq_len-1), the first `sink`
//    tokens and the last `recent` tokens. The rest of the budget goes to the highest-ranked other
//    valid tokens; equal scores prefer the lower position, NaN ranks above every number.
//  * seq_len <= top_k: every valid token is kept. Unused slots are -1.
//  * Each row is sorted ascending: valid positions first, then the -1 slots.
//  * Errors: top_k < 1, top_k > kMaxTopK, sink < 0, recent < 0, sink + max(recent, 1) > top_k,
//    mode not "head"/"group".
std::tuple<at::Tensor, at::Tensor> select_attention(
    const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
    const std::optional<at::Tensor>& seq_lens = std::nullopt, int64_t top_k = 2048,
    const std::string& mode = "head", int64_t sink = 0, int64_t recent = 0,
    std::optional<double> scale = std::nullopt);

// Softmax attention of q over exactly the positions listed in `indices` (int32 [B, Hsel, K]):
// Hsel == Hq: query head h uses row h; Hsel == Hkv: every query head of KV group g uses row g
// (when Hq == Hkv the two agree). Entries < 0 or >= seq_len are skipped and never read; a listed
// position counts once per listing (select_attention never lists one twice). A row with no valid
// entry gives zeros.
at::Tensor sparse_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                            const at::Tensor& indices,
                            const std::optional<at::Tensor>& seq_lens = std::nullopt,
                            std::optional<double> scale = std::nullopt);

// KV-cache correction / chunked prefill step of one layer. q [B, Hq, S, D]; k, v [B, Hkv, S, D]
// (cache dtype); start int32 [B]. Writes k, v into k_cache, v_cache (in place) at positions
// start[b] .. start[b]+S-1, then query i attends causally to positions 0 .. start[b]+i.
// Returns [B, Hq, S, D] in q's dtype. Errors: start < 0 or start + S > N.
at::Tensor correct_kv_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                at::Tensor& k_cache, at::Tensor& v_cache, const at::Tensor& start,
                                std::optional<double> scale = std::nullopt);

}  // namespace tidal
