// CUDA kernels of the tidal ops, framework-free (CUDA, cuda_fp16/cuda_bf16 and CUB only).
//
// One attention kernel serves all four ops. A CTA (4 warps) takes up to 16 query rows that share a
// KV head (the G query heads of a group for decode/select/group-sparse, one head for head-sparse,
// (query, head) pairs for correct_kv) and one split of the position space, streams K/V tiles of 64
// tokens through shared memory with cp.async (double buffered), computes S = Q K^T and O += P V with
// m16n8k16 tensor-core MMAs (fp32 accumulation), keeps an online softmax per warp, and writes a
// partial result (m, l, O) per split. merge_splits_kernel combines the splits (flash-decoding), and
// the topk_* kernels turn the raw scores select_attention asked for into sorted top-k index rows.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <cub/block/block_reduce.cuh>
#include <cub/block/block_scan.cuh>

#include "tidal/kernels/params.h"

namespace tidal::kernels::cuda {

constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;
static_assert(kTileTokens == 16 * kWarps, "each warp owns 16 tokens of a tile");

template <typename T>
struct Mma;

template <>
struct Mma<__nv_bfloat16> {
  static __device__ __forceinline__ uint32_t pack(float lo, float hi) {
    __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&v);
  }
  static __device__ __forceinline__ void mma(float c[4], const uint32_t a[4], uint32_t b0, uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
  static __device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
  static __device__ __forceinline__ __nv_bfloat16 from_float(float x) { return __float2bfloat16(x); }
};

template <>
struct Mma<__half> {
  static __device__ __forceinline__ uint32_t pack(float lo, float hi) {
    __half2 v = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&v);
  }
  static __device__ __forceinline__ void mma(float c[4], const uint32_t a[4], uint32_t b0, uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
  static __device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
  static __device__ __forceinline__ __half from_float(float x) { return __float2half(x); }
};

__device__ __forceinline__ void cp_async_16(void* smem, const void* gmem, bool valid) {
  const uint32_t dst = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
  const int src_bytes = valid ? 16 : 0;  // 0: zero-fill, nothing is read
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(gmem), "r"(src_bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N)); }

__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t r[4], const void* smem) {
  const uint32_t addr = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

__host__ __device__ __forceinline__ int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

__device__ __forceinline__ int64_t clamp_len(const int32_t* lens, int64_t b, int64_t N) {
  if (lens == nullptr) return N;
  const int64_t len = lens[b];
  return len < 0 ? 0 : (len > N ? N : len);
}

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kNegInf = -__builtin_huge_valf();

// Shared memory of the attention kernel: two stages of K and V tiles (rows padded by 16 bytes so
// the MMA operand reads hit 32 distinct banks) and the positions of each tile row (-1 = masked).
template <typename T, int D>
struct AttnSmem {
  static constexpr int kPitch = D + 8;  // elements per smem row
  static constexpr size_t kTileElems = size_t(kTileTokens) * kPitch;
  static constexpr size_t kBytes = 2 * 2 * kTileElems * sizeof(T) + 2 * kTileTokens * sizeof(int32_t);
  // The final cross-warp combine reuses the tiles: kWarps x kTileRows x D floats plus m, l.
  static_assert(size_t(kWarps) * kTileRows * (D + 2) * sizeof(float) <= 2 * 2 * kTileElems * sizeof(T),
                "combine buffer must fit in the tile buffers");
};

template <typename T, int D>
__global__ void __launch_bounds__(kThreads) attention_split_kernel(const AttnParams p) {
  using Smem = AttnSmem<T, D>;
  constexpr int kPitch = Smem::kPitch;
  constexpr int kChunks = D / 8;  // 16-byte chunks per row
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* sK = reinterpret_cast<T*>(smem_raw);
  T* sV = sK + 2 * Smem::kTileElems;
  int32_t* sPos = reinterpret_cast<int32_t*>(sV + 2 * Smem::kTileElems);

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int64_t split = blockIdx.x, b = blockIdx.z;
  const int64_t m_tiles = p.m_tiles();
  const int64_t rg = blockIdx.y / m_tiles, mt = blockIdx.y % m_tiles;
  const int64_t Gr = p.rows_per_group, rows = p.rows_per_cta_group();
  const int64_t G = p.Hq / p.Hkv;
  const int64_t kvh = (rg * Gr) / G;
  const int64_t N = p.N;
  const int64_t L = clamp_len(p.seq_lens, b, N);
  const bool gather = p.indices != nullptr;
  const int64_t start_b = p.start ? p.start[b] : 0;

  // This lane's two MMA rows (lane/4 and lane/4 + 8): global row id (h * S + i) and position limit.
  int64_t row_id[2];
  int64_t limit[2];
  bool row_ok[2];
  int64_t max_limit;
  for (int j = 0; j < 2; ++j) {
    const int64_t local = mt * kTileRows + (lane >> 2) + 8 * j;
    row_ok[j] = local < rows;
    const int64_t i = row_ok[j] ? local / Gr : 0, h = rg * Gr + (row_ok[j] ? local % Gr : 0);
    row_id[j] = h * p.S + i;
    limit[j] = p.start ? min64(start_b + i + 1, N) : L;
  }
  {
    const int64_t last_local = min64(mt * kTileRows + kTileRows, rows) - 1;
    max_limit = p.start ? min64(start_b + last_local / Gr + 1, N) : L;
  }
  const int64_t space = gather ? p.K : max_limit;
  const int64_t p0 = split * p.chunk, p1 = min64(p0 + p.chunk, space);
  const int64_t num_tiles = p1 > p0 ? (p1 - p0 + kTileTokens - 1) / kTileTokens : 0;

  const T* kbase = static_cast<const T*>(p.k) + b * p.k_stride_b + kvh * p.k_stride_h;
  const T* vbase = static_cast<const T*>(p.v) + b * p.v_stride_b + kvh * p.v_stride_h;
  const int32_t* idx_row = gather ? p.indices + (b * p.row_groups() + rg) * p.K : nullptr;

  // Issues the cp.async loads of tile `tile` into stage `stage`; invalid rows are zero-filled.
  auto load_tile = [&](int64_t tile, int stage) {
    const int64_t t0 = p0 + tile * kTileTokens;
    for (int c = tid; c < kTileTokens * kChunks; c += kThreads) {
      const int r = c / kChunks, ch = c % kChunks;
      const int64_t t = t0 + r;
      int64_t pos = -1;
      if (t < p1) {
        // gathered entries must be valid positions (< L); dense ones lie below the tile's limit
        const int64_t cand = gather ? idx_row[t] : t;
        if (cand >= 0 && cand < (gather ? L : max_limit)) pos = cand;
      }
      const bool ok = pos >= 0;
      const int64_t prow = ok ? pos : 0;
      cp_async_16(sK + stage * Smem::kTileElems + r * kPitch + ch * 8, kbase + prow * p.k_stride_n + ch * 8, ok);
      cp_async_16(sV + stage * Smem::kTileElems + r * kPitch + ch * 8, vbase + prow * p.v_stride_n + ch * 8, ok);
      if (ch == 0) sPos[stage * kTileTokens + r] = static_cast<int32_t>(pos);
    }
  };

  // Q fragments (A operand), rows beyond this CTA's rows are zero.
  uint32_t qa[D / 16][4];
  {
    const T* qrow[2];
    for (int j = 0; j < 2; ++j) {
      const int64_t h = row_id[j] / p.S, i = row_id[j] % p.S;
      qrow[j] = static_cast<const T*>(p.q) + b * p.q_stride_b + h * p.q_stride_h + i * p.q_stride_s;
    }
    for (int kc = 0; kc < D / 16; ++kc)
      for (int j = 0; j < 4; ++j) {
        const int r = j & 1, col = kc * 16 + (j >> 1) * 8 + 2 * (lane & 3);
        qa[kc][j] = row_ok[r] ? Mma<T>::pack(Mma<T>::to_float(qrow[r][col]), Mma<T>::to_float(qrow[r][col + 1]))
                              : 0u;
      }
  }

  float o[D / 8][4];
  for (int n = 0; n < D / 8; ++n) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.f;
  float m_run[2] = {kNegInf, kNegInf}, l_run[2] = {0.f, 0.f};

  if (num_tiles > 0) load_tile(0, 0);
  cp_async_commit();
  for (int64_t tile = 0; tile < num_tiles; ++tile) {
    const int stage = tile & 1;
    if (tile + 1 < num_tiles) load_tile(tile + 1, stage ^ 1);
    cp_async_commit();
    cp_async_wait<1>();
    __syncthreads();

    const T* tK = sK + stage * Smem::kTileElems;
    const T* tV = sV + stage * Smem::kTileElems;
    const int32_t* tPos = sPos + stage * kTileTokens;

    // S = Q K^T for this warp's 16 tokens: two n8 blocks.
    float s[2][4];
    for (int nb = 0; nb < 2; ++nb) {
      s[nb][0] = s[nb][1] = s[nb][2] = s[nb][3] = 0.f;
      const T* krow = tK + (warp * 16 + nb * 8 + (lane >> 2)) * kPitch + 2 * (lane & 3);
      for (int kc = 0; kc < D / 16; ++kc) {
        const uint32_t b0 = *reinterpret_cast<const uint32_t*>(krow + kc * 16);
        const uint32_t b1 = *reinterpret_cast<const uint32_t*>(krow + kc * 16 + 8);
        Mma<T>::mma(s[nb], qa[kc], b0, b1);
      }
    }
    // Scale, mask, optionally record raw scores; element e of block nb: row j = e / 2, token col.
    float tmax[2] = {kNegInf, kNegInf};
    for (int nb = 0; nb < 2; ++nb)
      for (int e = 0; e < 4; ++e) {
        const int j = e >> 1;
        const int tok = warp * 16 + nb * 8 + 2 * (lane & 3) + (e & 1);
        const int64_t pos = tPos[tok];
        const bool ok = row_ok[j] && pos >= 0 && pos < limit[j];
        const float x = ok ? s[nb][e] * p.scale : kNegInf;
        if (ok && p.scores != nullptr) p.scores[(b * p.Hq + row_id[j]) * p.scores_ld + pos] = x;
        s[nb][e] = x;
        tmax[j] = fmaxf(tmax[j], x);
      }
    float alpha[2], m_use[2];
    for (int j = 0; j < 2; ++j) {
      tmax[j] = fmaxf(tmax[j], __shfl_xor_sync(0xffffffffu, tmax[j], 1));
      tmax[j] = fmaxf(tmax[j], __shfl_xor_sync(0xffffffffu, tmax[j], 2));
      const float m_new = fmaxf(m_run[j], tmax[j]);
      m_use[j] = m_new == kNegInf ? 0.f : m_new;  // nothing valid yet: avoid (-inf) - (-inf)
      alpha[j] = exp2f((m_run[j] - m_use[j]) * kLog2e);
      m_run[j] = m_new;
    }
    uint32_t pa[4];
    {
      float pr[2][4];
      l_run[0] *= alpha[0];
      l_run[1] *= alpha[1];
      for (int nb = 0; nb < 2; ++nb)
        for (int e = 0; e < 4; ++e) {
          const int j = e >> 1;
          pr[nb][e] = exp2f((s[nb][e] - m_use[j]) * kLog2e);
          l_run[j] += pr[nb][e];  // this lane's share of the row sum; reduced after the loop
        }
      pa[0] = Mma<T>::pack(pr[0][0], pr[0][1]);
      pa[1] = Mma<T>::pack(pr[0][2], pr[0][3]);
      pa[2] = Mma<T>::pack(pr[1][0], pr[1][1]);
      pa[3] = Mma<T>::pack(pr[1][2], pr[1][3]);
    }
    for (int n = 0; n < D / 8; ++n) {
      o[n][0] *= alpha[0];
      o[n][1] *= alpha[0];
      o[n][2] *= alpha[1];
      o[n][3] *= alpha[1];
    }
    // O += P V: V fragments with ldmatrix.trans, 16 dims (two n8 blocks) per load.
    {
      const int mat = lane >> 3, r = lane & 7;
      const T* vrow = tV + (warp * 16 + r + (mat & 1) * 8) * kPitch + (mat >> 1) * 8;
      for (int j = 0; j < D / 16; ++j) {
        uint32_t vb[4];
        ldmatrix_x4_trans(vb, vrow + j * 16);
        Mma<T>::mma(o[2 * j], pa, vb[0], vb[1]);
        Mma<T>::mma(o[2 * j + 1], pa, vb[2], vb[3]);
      }
    }
    __syncthreads();  // the stage is overwritten by the next iteration's prefetch
  }
  cp_async_wait<0>();

  // Row sums across the 4 lanes that share a row.
  for (int j = 0; j < 2; ++j) {
    l_run[j] += __shfl_xor_sync(0xffffffffu, l_run[j], 1);
    l_run[j] += __shfl_xor_sync(0xffffffffu, l_run[j], 2);
  }

  // Combine the 4 warps through shared memory (the tile buffers are free now).
  __syncthreads();
  float* cO = reinterpret_cast<float*>(smem_raw);        // [kWarps][kTileRows][D]
  float* cM = cO + kWarps * kTileRows * D;               // [kWarps][kTileRows]
  float* cL = cM + kWarps * kTileRows;                   // [kWarps][kTileRows]
  for (int j = 0; j < 2; ++j) {
    const int row = (lane >> 2) + 8 * j;
    if ((lane & 3) == 0) {
      cM[warp * kTileRows + row] = m_run[j];
      cL[warp * kTileRows + row] = l_run[j];
    }
    for (int n = 0; n < D / 8; ++n) {
      const int d = n * 8 + 2 * (lane & 3);
      cO[(warp * kTileRows + row) * D + d] = o[n][2 * j];
      cO[(warp * kTileRows + row) * D + d + 1] = o[n][2 * j + 1];
    }
  }
  __syncthreads();
  for (int e = tid; e < kTileRows * D; e += kThreads) {
    const int row = e / D, d = e % D;
    const int64_t local = mt * kTileRows + row;
    if (local >= rows) continue;
    const int64_t rid = (rg * Gr + local % Gr) * p.S + local / Gr;
    float m = kNegInf;
    for (int w = 0; w < kWarps; ++w) m = fmaxf(m, cM[w * kTileRows + row]);
    float l = 0.f, acc = 0.f;
    for (int w = 0; w < kWarps; ++w) {
      const float mw = cM[w * kTileRows + row];
      const float f = mw == kNegInf ? 0.f : exp2f((mw - m) * kLog2e);
      l += f * cL[w * kTileRows + row];
      acc += f * cO[(w * kTileRows + row) * D + d];
    }
    const int64_t slot = (b * p.Hq * p.S + rid) * p.splits + split;
    p.part_o[slot * D + d] = acc;
    if (d == 0) {
      p.part_ml[slot * 2] = m;
      p.part_ml[slot * 2 + 1] = l;
    }
  }
}

// Combines the splits of each row: out = sum_s e^{m_s - M} O_s / sum_s e^{m_s - M} l_s, zeros where no
// position was valid; optionally the row's logsumexp (select's group ranking needs it). One warp a row.
template <typename T, int D>
__global__ void __launch_bounds__(128) merge_splits_kernel(const float* part_o, const float* part_ml, int64_t rows,
                                                            int splits, T* out, float* lse) {
  constexpr int kPer = D / 32;
  const int64_t row = blockIdx.x * 4 + (threadIdx.x >> 5);
  const int lane = threadIdx.x & 31;
  if (row >= rows) return;
  const float* ml = part_ml + row * splits * 2;
  float M = kNegInf;
  for (int s = 0; s < splits; ++s) M = fmaxf(M, ml[2 * s]);
  float acc[kPer];
  for (int i = 0; i < kPer; ++i) acc[i] = 0.f;
  float Lsum = 0.f;
  if (M != kNegInf) {
    for (int s = 0; s < splits; ++s) {
      const float ms = ml[2 * s];
      if (ms == kNegInf) continue;
      const float f = exp2f((ms - M) * kLog2e);
      Lsum += f * ml[2 * s + 1];
      const float* os = part_o + (row * splits + s) * D + lane * kPer;
      for (int i = 0; i < kPer; ++i) acc[i] += f * os[i];
    }
  }
  const float inv = Lsum > 0.f ? 1.f / Lsum : (Lsum == 0.f ? 0.f : Lsum);  // NaN stays NaN
  for (int i = 0; i < kPer; ++i) out[row * D + lane * kPer + i] = Mma<T>::from_float(acc[i] * inv);
  if (lse != nullptr && lane == 0) lse[row] = Lsum > 0.f ? M + logf(Lsum) : (Lsum == 0.f ? kNegInf : Lsum);
}

// ---- top-k selection -------------------------------------------------------------------------

// Order-preserving map of a float to uint32 (larger float -> larger key); NaN above everything and
// -0 equal to +0, matching the CPU kernel's ranks_before.
__device__ __forceinline__ uint32_t rank_key(float x) {
  if (x != x) return 0xffffffffu;
  if (x == 0.f) x = 0.f;
  const uint32_t u = __float_as_uint(x);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

// Selection row state shared by the top-k kernels: its valid length, the candidate range
// [c0, c1) between the forced sink and tail, and the free slots to fill from it.
struct TopkRow {
  int64_t L, c0, c1, free_slots;
  float* row0;  // head mode: the head's scores; group mode: the group's first row, holding keys
  bool trivial; // every slot is decided without ranking (L <= top_k, or no free slot)
};

__device__ __forceinline__ TopkRow topk_row(const TopkParams& p, int64_t r) {
  TopkRow t;
  const int64_t b = r / p.Hsel, g = r % p.Hsel, G = p.Hq / p.Hsel;
  t.L = clamp_len(p.seq_lens, b, p.N);
  const int64_t tail = p.recent > 1 ? p.recent : 1;
  t.c0 = p.sink;
  t.c1 = t.L - tail;
  t.free_slots = p.top_k - p.sink - tail;
  t.row0 = p.scores + (b * p.Hq + g * G) * p.ld;
  t.trivial = t.L <= p.top_k || t.free_slots <= 0;
  return t;
}

// The 4 keys of positions 4v .. 4v+3 (head mode: converted from the raw scores on the fly).
__device__ __forceinline__ void topk_keys4(const TopkParams& p, const float* row0, int64_t v, uint32_t k[4]) {
  if (p.lse != nullptr) {
    const uint4 x = reinterpret_cast<const uint4*>(row0)[v];
    k[0] = x.x, k[1] = x.y, k[2] = x.z, k[3] = x.w;
  } else {
    const float4 x = reinterpret_cast<const float4*>(row0)[v];
    k[0] = rank_key(x.x), k[1] = rank_key(x.y), k[2] = rank_key(x.z), k[3] = rank_key(x.w);
  }
}

// Replays the digit choices of the first `passes` radix passes of row r from their histograms:
// the key prefix found so far, its mask, and the rank `want` of the cut key among the keys that
// match the prefix. Every thread of the block calls it (block-wide scans).
template <int kBlock>
__device__ void topk_resolve(const TopkParams& p, int64_t r, int64_t free_slots, int passes, uint32_t& prefix,
                             uint32_t& mask, int64_t& want) {
  using Scan = cub::BlockScan<int, kBlock>;
  __shared__ typename Scan::TempStorage scan_tmp;
  __shared__ int sh_digit, sh_above;
  constexpr int kPer = kTopkBins / kBlock;
  prefix = 0, mask = 0, want = free_slots;
  const int64_t rows = p.B * p.Hsel;
  for (int pass = 0; pass < passes; ++pass) {
    const int shift = pass == 0 ? 21 : (pass == 1 ? 10 : 0);
    const uint32_t digit_mask = pass == 2 ? 0x3ffu : 0x7ffu;
    const int* hist = p.hist + (pass * rows + r) * kTopkBins;
    int items[kPer], incl[kPer];
    for (int k = 0; k < kPer; ++k) items[k] = hist[kTopkBins - 1 - (threadIdx.x * kPer + k)];  // top digit first
    Scan(scan_tmp).InclusiveSum(items, incl);
    for (int k = 0; k < kPer; ++k) {
      const int above = incl[k] - items[k];
      if (items[k] > 0 && above < want && incl[k] >= want) {
        sh_digit = kTopkBins - 1 - (threadIdx.x * kPer + k);
        sh_above = above;
      }
    }
    __syncthreads();
    want -= sh_above;
    prefix |= static_cast<uint32_t>(sh_digit) << shift;
    mask |= digit_mask << shift;
    __syncthreads();
  }
}

// Radix pass `pass` of the multi-CTA top-k: CTA (chunk, row) histograms the digit of its chunk's
// candidate keys that match the prefix of the earlier passes into the row's global histogram.
// Pass 0 of group mode first turns the group's scores into rank keys (max over the group's heads
// of s_h - lse_h, NaN sticking), written over the group's first row.
template <int kBlock>
__global__ void __launch_bounds__(kBlock) topk_hist_kernel(const TopkParams p, int pass) {
  __shared__ int hist[kTopkBins];
  const int64_t r = blockIdx.y, chunk = blockIdx.x;
  const TopkRow row = topk_row(p, r);
  if (row.trivial) return;
  const int64_t t0 = chunk * kTopkChunk;
  const int64_t lo = row.c0 > t0 ? row.c0 : t0, hi = min64(row.c1, t0 + kTopkChunk);
  if (lo >= hi) return;
  const int64_t v0 = lo / 4, v1 = (hi + 3) / 4;  // vectors lie inside the chunk (kTopkChunk % 4 == 0)

  if (pass == 0 && p.lse != nullptr) {
    const int64_t b = r / p.Hsel, g = r % p.Hsel, G = p.Hq / p.Hsel;
    for (int64_t v = v0 + threadIdx.x; v < v1; v += kBlock) {
      float best[4] = {kNegInf, kNegInf, kNegInf, kNegInf};
      bool nan[4] = {false, false, false, false};
      for (int64_t h = 0; h < G; ++h) {
        const float4 x = reinterpret_cast<const float4*>(row.row0 + h * p.ld)[v];
        const float l = p.lse[b * p.Hq + g * G + h];
        const float xs[4] = {x.x - l, x.y - l, x.z - l, x.w - l};
        for (int e = 0; e < 4; ++e) {
          nan[e] |= xs[e] != xs[e];
          best[e] = fmaxf(best[e], xs[e]);
        }
      }
      uint4 k;
      k.x = nan[0] ? 0xffffffffu : rank_key(best[0]);
      k.y = nan[1] ? 0xffffffffu : rank_key(best[1]);
      k.z = nan[2] ? 0xffffffffu : rank_key(best[2]);
      k.w = nan[3] ? 0xffffffffu : rank_key(best[3]);
      reinterpret_cast<uint4*>(row.row0)[v] = k;
    }
    __syncthreads();
  }
  uint32_t prefix, mask;
  int64_t want;
  topk_resolve<kBlock>(p, r, row.free_slots, pass, prefix, mask, want);
  const int shift = pass == 0 ? 21 : (pass == 1 ? 10 : 0);
  const uint32_t digit_mask = pass == 2 ? 0x3ffu : 0x7ffu;
  for (int i = threadIdx.x; i < kTopkBins; i += kBlock) hist[i] = 0;
  __syncthreads();
  for (int64_t v = v0 + threadIdx.x; v < v1; v += kBlock) {
    uint32_t k[4];
    topk_keys4(p, row.row0, v, k);
    for (int e = 0; e < 4; ++e) {
      const int64_t t = 4 * v + e;
      if (t >= lo && t < hi && (k[e] & mask) == prefix) atomicAdd(&hist[(k[e] >> shift) & digit_mask], 1);
    }
  }
  __syncthreads();
  int* global = p.hist + (pass * p.B * p.Hsel + r) * kTopkBins;
  for (int i = threadIdx.x; i < kTopkBins; i += kBlock)
    if (hist[i] != 0) atomicAdd(&global[i], hist[i]);
}

// The cut key of row r (after the three passes) and how many keys equal to it to take.
template <int kBlock>
__device__ void topk_cut(const TopkParams& p, int64_t r, int64_t free_slots, uint32_t& cut, int64_t& take_eq) {
  uint32_t mask;
  topk_resolve<kBlock>(p, r, free_slots, 3, cut, mask, take_eq);
}

// Per chunk: candidate keys above the cut and equal to it (the write kernel's offsets).
template <int kBlock>
__global__ void __launch_bounds__(kBlock) topk_count_kernel(const TopkParams p) {
  using Reduce = cub::BlockReduce<int, kBlock>;
  __shared__ typename Reduce::TempStorage red_tmp;
  const int64_t r = blockIdx.y, chunk = blockIdx.x;
  const TopkRow row = topk_row(p, r);
  if (row.trivial) return;
  uint32_t cut;
  int64_t take_eq;
  topk_cut<kBlock>(p, r, row.free_slots, cut, take_eq);
  const int64_t t0 = chunk * kTopkChunk;
  const int64_t lo = row.c0 > t0 ? row.c0 : t0, hi = min64(row.c1, t0 + kTopkChunk);
  int n_gt = 0, n_eq = 0;
  for (int64_t v = lo / 4 + threadIdx.x; lo < hi && v < (hi + 3) / 4; v += kBlock) {
    uint32_t k[4];
    topk_keys4(p, row.row0, v, k);
    for (int e = 0; e < 4; ++e) {
      const int64_t t = 4 * v + e;
      if (t < lo || t >= hi) continue;
      n_gt += k[e] > cut;
      n_eq += k[e] == cut;
    }
  }
  const int gt = Reduce(red_tmp).Sum(n_gt);
  __syncthreads();
  const int eq = Reduce(red_tmp).Sum(n_eq);
  if (threadIdx.x == 0) {
    p.counts[(r * p.chunks + chunk) * 2] = gt;
    p.counts[(r * p.chunks + chunk) * 2 + 1] = eq;
  }
}

// Writes row r's index entries: the forced and padding slots (chunk 0), and each chunk's chosen
// candidates at the offset the earlier chunks' counts give, in position order (so the row ends up
// sorted). At the cut key, the lowest positions win.
template <int kBlock>
__global__ void __launch_bounds__(kBlock) topk_write_kernel(const TopkParams p) {
  using Scan = cub::BlockScan<int, kBlock>;
  __shared__ typename Scan::TempStorage scan_tmp;
  __shared__ int64_t sh_offset, sh_eq_before;
  constexpr int kItems = kTopkChunk / kBlock;
  const int64_t r = blockIdx.y, chunk = blockIdx.x;
  const TopkRow row = topk_row(p, r);
  int32_t* out = p.indices + r * p.top_k;
  const int tid = threadIdx.x;
  if (chunk == 0) {
    if (row.L <= p.top_k) {
      for (int64_t t = tid; t < p.top_k; t += kBlock) out[t] = t < row.L ? static_cast<int32_t>(t) : -1;
    } else {
      const int64_t tail = row.L - row.c1;
      for (int64_t t = tid; t < p.sink; t += kBlock) out[t] = static_cast<int32_t>(t);
      for (int64_t t = tid; t < tail; t += kBlock) out[p.top_k - tail + t] = static_cast<int32_t>(row.c1 + t);
    }
  }
  if (row.trivial) return;
  const int64_t t0 = chunk * kTopkChunk;
  const int64_t lo = row.c0 > t0 ? row.c0 : t0, hi = min64(row.c1, t0 + kTopkChunk);
  if (lo >= hi) return;
  uint32_t cut;
  int64_t take_eq;
  topk_cut<kBlock>(p, r, row.free_slots, cut, take_eq);
  if (tid == 0) {
    int64_t offset = p.sink, eq_before = 0;
    for (int64_t c = 0; c < chunk; ++c) {
      const int64_t gt = p.counts[(r * p.chunks + c) * 2], eq = p.counts[(r * p.chunks + c) * 2 + 1];
      const int64_t take = min64(eq, take_eq - eq_before > 0 ? take_eq - eq_before : 0);
      offset += gt + take;
      eq_before += eq;
    }
    sh_offset = offset;
    sh_eq_before = eq_before;
  }
  // Each thread scans kItems consecutive positions (two vectors).
  const int64_t first = t0 + int64_t(tid) * kItems;
  uint32_t k[kItems];
  int n_eq = 0, n_gt = 0;
#pragma unroll
  for (int u = 0; u < kItems / 4; ++u) {
    if (first + 4 * u < hi) {
      topk_keys4(p, row.row0, first / 4 + u, k + 4 * u);
    } else {  // past the candidates (and maybe past the row): not read
      k[4 * u] = k[4 * u + 1] = k[4 * u + 2] = k[4 * u + 3] = 0;
    }
  }
#pragma unroll
  for (int i = 0; i < kItems; ++i) {
    const int64_t t = first + i;
    const bool c = t >= lo && t < hi;
    n_eq += (c && k[i] == cut) ? 1 : 0;
    n_gt += (c && k[i] > cut) ? 1 : 0;
  }
  int eq_rank, eq_total;
  Scan(scan_tmp).ExclusiveSum(n_eq, eq_rank, eq_total);
  __syncthreads();
  int64_t eq_take = take_eq - (sh_eq_before + eq_rank);
  eq_take = eq_take < 0 ? 0 : (eq_take > n_eq ? n_eq : eq_take);
  int off, total;
  Scan(scan_tmp).ExclusiveSum(n_gt + static_cast<int>(eq_take), off, total);
  int64_t dst = sh_offset + off;
#pragma unroll
  for (int i = 0; i < kItems; ++i) {
    const int64_t t = first + i;
    if (t < lo || t >= hi) continue;
    bool take = k[i] > cut;
    if (k[i] == cut && eq_take > 0) {
      take = true;
      --eq_take;
    }
    if (take) out[dst++] = static_cast<int32_t>(t);
  }
}

// correct_kv_attention's first step: copies the S new K/V rows of (b, kv head) into the caches at
// start[b] + i (rows past N, possible only for unchecked device values, are skipped).
template <typename T>
__global__ void write_kv_kernel(const CorrectParams c) {
  const int64_t i = blockIdx.x, g = blockIdx.y, b = blockIdx.z;
  const int64_t pos = c.start[b] + i;
  if (pos < 0 || pos >= c.N) return;
  const T* kn = static_cast<const T*>(c.k_new) + b * c.kn_stride_b + g * c.kn_stride_h + i * c.kn_stride_s;
  const T* vn = static_cast<const T*>(c.v_new) + b * c.vn_stride_b + g * c.vn_stride_h + i * c.vn_stride_s;
  T* k = static_cast<T*>(c.k) + b * c.k_stride_b + g * c.k_stride_h + pos * c.k_stride_n;
  T* v = static_cast<T*>(c.v) + b * c.v_stride_b + g * c.v_stride_h + pos * c.v_stride_n;
  for (int64_t d = threadIdx.x; d < c.D; d += blockDim.x) {
    k[d] = kn[d];
    v[d] = vn[d];
  }
}

}  // namespace tidal::kernels::cuda
