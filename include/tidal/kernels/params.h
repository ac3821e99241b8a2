// Problem descriptions shared by the CPU and CUDA kernels. Framework-free: raw pointers and
// element strides (int64, so caches past 2^31 elements index correctly). The launchers fill these
// from validated tensors; kernels never see a framework type.
#pragma once

#include <cstdint>

namespace tidal::kernels {

// Head dims every backend supports (CUDA kernels are instantiated for exactly these).
constexpr int64_t kHeadDims[] = {32, 64, 96, 128, 256};
constexpr bool is_supported_head_dim(int64_t D) {
  for (int64_t d : kHeadDims)
    if (d == D) return true;
  return false;
}

// One query per sequence against a [B, Hkv, N, D] KV cache (last dim contiguous).
struct DecodeParams {
  int64_t B = 0, Hq = 0, Hkv = 0, N = 0, D = 0;
  const void* q = nullptr;  // [B, Hq, D]
  int64_t q_stride_b = 0, q_stride_h = 0;
  const void* k = nullptr;  // [B, Hkv, N, D]
  int64_t k_stride_b = 0, k_stride_h = 0, k_stride_n = 0;
  const void* v = nullptr;  // [B, Hkv, N, D]
  int64_t v_stride_b = 0, v_stride_h = 0, v_stride_n = 0;
  void* out = nullptr;                 // contiguous [B, Hq, D]
  const int32_t* seq_lens = nullptr;   // [B]; nullptr = N for every row
  float scale = 1.0f;

  int64_t group_size() const { return Hq / Hkv; }
  // Valid length of row b, clamped to [0, N] so a bad value can never index out of bounds.
  int64_t seq_len(int64_t b) const {
    if (seq_lens == nullptr) return N;
    const int64_t len = seq_lens[b];
    return len < 0 ? 0 : (len > N ? N : len);
  }
};

// select_attention: DecodeParams plus the selection budget and its output.
struct SelectParams {
  DecodeParams attn;
  int32_t* indices = nullptr;  // contiguous [B, Hsel, top_k]
  int64_t top_k = 0, sink = 0, recent = 0;
  bool group_mode = false;     // Hsel = Hkv when true, Hq otherwise
};

// sparse_attention: DecodeParams plus the positions to attend.
struct SparseParams {
  DecodeParams attn;
  const int32_t* indices = nullptr;  // contiguous [B, Hsel, K]
  int64_t Hsel = 0, K = 0;           // Hsel == Hq: a row per query head; else a row per KV head
};

// correct_kv_attention: S new tokens per sequence, written at start[b] and attended causally.
struct CorrectParams {
  int64_t B = 0, Hq = 0, Hkv = 0, N = 0, D = 0, S = 0;
  const void* q = nullptr;  // [B, Hq, S, D]
  int64_t q_stride_b = 0, q_stride_h = 0, q_stride_s = 0;
  const void* k_new = nullptr;  // [B, Hkv, S, D]
  int64_t kn_stride_b = 0, kn_stride_h = 0, kn_stride_s = 0;
  const void* v_new = nullptr;  // [B, Hkv, S, D]
  int64_t vn_stride_b = 0, vn_stride_h = 0, vn_stride_s = 0;
  void* k = nullptr;  // cache [B, Hkv, N, D], written then read
  int64_t k_stride_b = 0, k_stride_h = 0, k_stride_n = 0;
  void* v = nullptr;
  int64_t v_stride_b = 0, v_stride_h = 0, v_stride_n = 0;
  void* out = nullptr;           // contiguous [B, Hq, S, D]
  const int32_t* start = nullptr;  // [B], validated: 0 <= start, start + S <= N
  float scale = 1.0f;
};

}  // namespace tidal::kernels
