// Problem descriptions shared by the CPU and CUDA kernels. Framework-free: raw pointers and
// element strides (int64, so caches past 2^31 elements index correctly). The launchers fill these
// from validated tensors; kernels never see a framework type.
#pragma once

#include <cstdint>

#ifdef __CUDACC__
#define TIDAL_HOST_DEVICE __host__ __device__
#else
#define TIDAL_HOST_DEVICE
#endif

namespace tidal::kernels {

// Head dims every backend supports (CUDA kernels are instantiated for exactly these).
constexpr int64_t kHeadDims[] = {32, 64, 96, 128, 256};
constexpr bool is_supported_head_dim(int64_t D) {
  for (int64_t d : kHeadDims)
    if (d == D) return true;
  return false;
}

// Positions at the end of a row every selection keeps: the `recent` last ones, and at least the
// newest token. The candidates ranked by score are [sink, L - forced_tail(recent)).
TIDAL_HOST_DEVICE constexpr int64_t forced_tail(int64_t recent) { return recent > 1 ? recent : 1; }

constexpr int kTopkBins = 2048;  // top-k radix digits of 11, 11 and 10 bits
// select (head mode): the tile kernel counts the top-k's first digits of up to kDigitRows query rows
// a CTA in 16-bit shared-memory counters, so a CTA takes at most kDigitMaxCount positions. It adds
// them into the row's histogram as floats (a vector reduction adds 4 bins), exact up to
// kExactFloatCount positions a row.
constexpr int kDigitRows = 4;
constexpr int64_t kDigitMaxCount = 65535;
constexpr int64_t kExactFloatCount = int64_t(1) << 24;
// Where it does, select's workspace is those histograms ([B, Hq, kTopkBins] floats) and then the
// number of tile CTAs done, a float as well (at most kExactFloatCount CTAs), padded to 4 floats.
TIDAL_HOST_DEVICE constexpr int64_t select_hist_floats(int64_t B, int64_t Hq) { return B * Hq * kTopkBins; }
TIDAL_HOST_DEVICE constexpr int64_t select_workspace_floats(int64_t B, int64_t Hq) {
  return select_hist_floats(B, Hq) + 4;
}
// The done count in the workspace `hist` (float or const float).
template <typename F>
TIDAL_HOST_DEVICE constexpr F* select_done_count(F* hist, int64_t B, int64_t Hq) {
  return hist + select_hist_floats(B, Hq);
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

// ---- CUDA kernels (include/tidal/kernels/cuda_attention.cuh) ----

// K/V rows per shared-memory tile of the tile kernel, for sm_90 code or not: 128 where three stages
// of them fit sm_90's shared memory (a K or V tile then streams as one 32 KB run: on an H100, decode
// at 1x128K took 1.04x cuDNN's time against 1.08x with 64-row tiles), else 64 (D = 256; sm_80,
// whose 163 KB a CTA would not hold 128-row tiles of D = 128).
TIDAL_HOST_DEVICE constexpr int tile_tokens(int64_t D, bool sm90) { return sm90 && D <= 128 ? 128 : 64; }
constexpr int kTileRows = 16;    // query rows per CTA: the tensor-core MMA's M

// Everything the attention kernel needs; the launcher fills it. Positions are either dense
// (0 .. limit) or gathered from an index row (indices != nullptr).
struct AttnParams {
  const void* q = nullptr;  // [B, Hq, S, D] (S = 1 for decode)
  int64_t q_stride_b = 0, q_stride_h = 0, q_stride_s = 0;
  const void* k = nullptr;
  int64_t k_stride_b = 0, k_stride_h = 0, k_stride_n = 0;
  const void* v = nullptr;
  int64_t v_stride_b = 0, v_stride_h = 0, v_stride_n = 0;
  const int32_t* seq_lens = nullptr;  // [B]; nullptr = N. Clamped to [0, N].
  const int32_t* start = nullptr;     // [B]; set for correct_kv: row (i, h) sees positions <= start + i
  const int32_t* indices = nullptr;   // [B, row_groups, K]; set for sparse
  int64_t B = 0, Hq = 0, Hkv = 0, N = 0, S = 1, K = 0;
  int64_t rows_per_group = 1;  // query heads per row group: G, or 1 for head-mode sparse
  int64_t chunk = 0;           // positions per split, a multiple of tile_tokens(D, sm90) (tile kernel)
  int splits = 1;
  bool sm90 = false;           // device and code are sm_90+: bulk copies, early (programmatic) launch
  float scale = 1.f;
  float* scores = nullptr;  // [B, Hq, scores_ld]: scale * q.k of valid positions, -inf or unset past them (select only)
  int64_t scores_ld = 0;    // row pitch of scores: N rounded up to a multiple of 32 (128-byte lines)
  float* hist = nullptr;    // [B, Hq, kTopkBins], zeroed (select, head mode, digits_fit): first-digit counts,
                            // then the tile CTAs' done count (select_workspace_floats, count_done)
  int64_t sink = 0, tail = 1;  // top-k candidates [sink, L - tail), tail = forced_tail(recent) (select, head mode)
  float* part_o = nullptr;  // [B, Hq * S, splits, D]
  float* part_ml = nullptr; // [B, Hq * S, splits, 2]: running max m and sum l

  TIDAL_HOST_DEVICE int64_t row_groups() const { return Hq / rows_per_group; }
  TIDAL_HOST_DEVICE int64_t rows_per_cta_group() const { return S * rows_per_group; }
  TIDAL_HOST_DEVICE int64_t m_tiles() const { return (rows_per_cta_group() + kTileRows - 1) / kTileRows; }
  TIDAL_HOST_DEVICE int64_t tile_ctas() const { return B * row_groups() * m_tiles() * splits; }  // the grid
};

struct TopkParams {
  float* scores = nullptr;      // [B, Hq, ld] raw scores, dead after the kernel (it drops their L2 lines)
  int64_t ld = 0;               // row pitch, a multiple of 4 (32: the lines are dropped)
  const float* lse = nullptr;   // [B, Hq] (group mode)
  const float* hist = nullptr;  // [B, Hq, kTopkBins] (head mode): the attention pass's first-digit counts,
                                // then its done count (select_workspace_floats)
  const int32_t* seq_lens = nullptr;
  int32_t* indices = nullptr;   // [B, Hsel, top_k]
  int64_t B = 0, Hq = 0, Hsel = 0, N = 0, top_k = 0, sink = 0, recent = 0;
  int cluster = 1;              // CTAs (a thread-block cluster) per selection row
  bool sm90 = false;            // device and code are sm_90+: early (programmatic) launch
  bool spread = false;          // one CTA an SM (padded shared memory, sm_90)
  int64_t chunk = 0;            // positions per CTA, a multiple of 4 (32: the lines are dropped)
  int done_target = 0;          // with hist: the tile CTAs whose done count to wait for (count_done), else 0
};

constexpr int kTopkBlock = 512;        // threads of a top-k CTA
constexpr int kTopkChunk = 16384;      // positions a CTA aims for where rows outnumber the device
constexpr int kTopkMinChunk = 2048;    // fewest positions a CTA takes (a row's cluster size cap)
// Possible winners a CTA lists in shared memory, kTopkListCap / 16 a warp, and the cluster's
// cut-bin keys staged behind them. At 4096 (256 a warp) a warp's list or staged keys overflowed
// into the slower path on rows whose cut fell low in a wide bin (4x128K, k=4096, 65536 positions a
// CTA: 1.22-1.25x cuDNN's time on an H100 over four random inputs, 1.14x at 6144).
constexpr int kTopkListCap = 6144;
constexpr int kTopkBinCap = 8192;      // cut-bin keys of a whole cluster, each CTA a copy (96 KB
                                       // of shared memory in all with the histograms and the list)
constexpr int kMaxCluster = 8;         // the portable cluster size (top-k kernel)

}  // namespace tidal::kernels
