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

// Shared memory of the attention kernel: kStages stages of K and V tiles (rows padded by 16 bytes
// so the MMA operand reads hit 32 distinct banks) and the positions of each tile row (-1 = masked).
// Three stages keep two tiles in flight per CTA while the third is computed on.
constexpr int kStages = 3;
template <typename T, int D>
struct AttnSmem {
  static constexpr int kPitch = D + 8;  // elements per smem row
  static constexpr size_t kTileElems = size_t(kTileTokens) * kPitch;
  static constexpr size_t kTileBytes = kStages * 2 * kTileElems * sizeof(T);
  static constexpr size_t kBytes = kTileBytes + kStages * kTileTokens * sizeof(int32_t);
  // The final cross-warp combine reuses the tiles: kWarps x kTileRows x D floats plus m, l.
  static_assert(size_t(kWarps) * kTileRows * (D + 2) * sizeof(float) <= kTileBytes,
                "combine buffer must fit in the tile buffers");
};

template <typename T, int D>
__global__ void __launch_bounds__(kThreads) attention_split_kernel(const AttnParams p) {
  using Smem = AttnSmem<T, D>;
  constexpr int kPitch = Smem::kPitch;
  constexpr int kChunks = D / 8;  // 16-byte chunks per row
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* sK = reinterpret_cast<T*>(smem_raw);
  T* sV = sK + kStages * Smem::kTileElems;
  int32_t* sPos = reinterpret_cast<int32_t*>(sV + kStages * Smem::kTileElems);

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  // Grid: x = row group x m tile (can exceed 65535: a long correct_kv chunk), y = split (<= kMaxSplits),
  // z = batch row (<= 65535, checked on the host).
  const int64_t split = blockIdx.y, b = blockIdx.z;
  const int64_t m_tiles = p.m_tiles();
  const int64_t rg = blockIdx.x / m_tiles, mt = blockIdx.x % m_tiles;
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

  // Issues the cp.async loads of tile `tile` into stage `stage`; invalid rows are zero-filled. All
  // positions (index loads for sparse) are fetched before the first copy so their latencies overlap.
  auto load_tile = [&](int64_t tile, int stage) {
    constexpr int kPerThread = kTileTokens * kChunks / kThreads;
    const int64_t t0 = p0 + tile * kTileTokens;
    int32_t pos[kPerThread];  // positions fit int32 (N is checked on the host)
#pragma unroll
    for (int j = 0; j < kPerThread; ++j) {
      const int64_t t = t0 + (tid + j * kThreads) / kChunks;
      pos[j] = -1;
      if (t < p1) {
        // gathered entries must be valid positions (< L); dense ones lie below the tile's limit
        const int64_t cand = gather ? idx_row[t] : t;
        if (cand >= 0 && cand < (gather ? L : max_limit)) pos[j] = static_cast<int32_t>(cand);
      }
    }
#pragma unroll
    for (int j = 0; j < kPerThread; ++j) {
      const int c = tid + j * kThreads, r = c / kChunks, ch = c % kChunks;
      const bool ok = pos[j] >= 0;
      const int64_t prow = ok ? pos[j] : 0;
      cp_async_16(sK + stage * Smem::kTileElems + r * kPitch + ch * 8, kbase + prow * p.k_stride_n + ch * 8, ok);
      cp_async_16(sV + stage * Smem::kTileElems + r * kPitch + ch * 8, vbase + prow * p.v_stride_n + ch * 8, ok);
      if (ch == 0) sPos[stage * kTileTokens + r] = pos[j];
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

  // Pipeline: tiles 0 .. kStages-2 in flight before the loop; each iteration waits for its tile,
  // then refills the stage the previous iteration consumed (the barrier orders that reuse).
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < num_tiles) load_tile(s, s);
    cp_async_commit();  // an empty group where there is no tile keeps the group count uniform
  }
  for (int64_t tile = 0; tile < num_tiles; ++tile) {
    const int stage = static_cast<int>(tile % kStages);
    cp_async_wait<kStages - 2>();
    __syncthreads();
    if (tile + kStages - 1 < num_tiles) load_tile(tile + kStages - 1, static_cast<int>((tile + kStages - 1) % kStages));
    cp_async_commit();

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

// Upper bound of the splits of one row (plan_splits caps them): the merge keeps a weight per split.
constexpr int kMaxSplits = 1024;

// Sum (or max) over a block of kThreads threads; every thread gets the result.
template <int kThreads, bool kMax>
__device__ __forceinline__ float block_reduce(float x, float* scratch) {
  for (int o = 16; o > 0; o >>= 1) {
    const float y = __shfl_xor_sync(0xffffffffu, x, o);
    x = kMax ? fmaxf(x, y) : x + y;
  }
  if ((threadIdx.x & 31) == 0) scratch[threadIdx.x >> 5] = x;
  __syncthreads();
  x = scratch[0];
  for (int w = 1; w < kThreads / 32; ++w) x = kMax ? fmaxf(x, scratch[w]) : x + scratch[w];
  __syncthreads();
  return x;
}

// Combines the splits of each row: out = sum_s e^{m_s - M} O_s / sum_s e^{m_s - M} l_s, zeros where no
// position was valid; optionally the row's logsumexp (select's group ranking needs it). One CTA of D
// threads a row: the split weights once, then each thread one output dim (independent loads).
template <typename T, int D>
__global__ void __launch_bounds__(D) merge_splits_kernel(const float* part_o, const float* part_ml, int splits,
                                                          T* out, float* lse) {
  __shared__ float w[kMaxSplits];
  __shared__ float scratch[D / 32];
  const int64_t row = blockIdx.x;
  const int d = threadIdx.x;
  const float* ml = part_ml + row * splits * 2;
  float m = kNegInf;
  for (int s = d; s < splits; s += D) m = fmaxf(m, ml[2 * s]);
  const float M = block_reduce<D, true>(m, scratch);
  float l = 0.f;
  for (int s = d; s < splits; s += D) {
    const float ms = ml[2 * s];
    const float f = (ms == kNegInf) ? 0.f : exp2f((ms - M) * kLog2e);  // NaN stays NaN
    w[s] = f;
    l += f * ml[2 * s + 1];
  }
  const float Lsum = block_reduce<D, false>(l, scratch);  // its barrier also publishes w
  const float* o = part_o + row * splits * D + d;
  float acc = 0.f;
#pragma unroll 8
  for (int s = 0; s < splits; ++s) acc += w[s] * o[int64_t(s) * D];
  const float inv = Lsum > 0.f ? 1.f / Lsum : (Lsum == 0.f ? 0.f : Lsum);  // NaN stays NaN
  out[row * D + d] = Mma<T>::from_float(acc * inv);
  if (lse != nullptr && d == 0) lse[row] = Lsum > 0.f ? M + logf(Lsum) : (Lsum == 0.f ? kNegInf : Lsum);
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

// Radix-select state of row r before pass `pass`: the key prefix chosen so far, its mask, and the
// rank `want` (1-based, from the top) of the cut key among the keys matching the prefix. Pass 0
// starts from nothing; later passes read what the previous pass's last CTA stored.
struct TopkState {
  uint32_t prefix, mask;
  int64_t want;
};

__device__ __forceinline__ TopkState topk_state(const TopkParams& p, int64_t r, int64_t free_slots, int pass) {
  if (pass == 0) return {0u, 0u, free_slots};
  const int64_t* st = p.state + r * 3;
  return {static_cast<uint32_t>(st[0]), static_cast<uint32_t>(st[1]), st[2]};
}

__device__ __forceinline__ int topk_shift(int pass) { return pass == 0 ? 21 : (pass == 1 ? 10 : 0); }
__device__ __forceinline__ uint32_t topk_digit_mask(int pass) { return pass == 2 ? 0x3ffu : 0x7ffu; }

// Chooses pass `pass`'s digit from the row's finished histogram and stores the next state
// (block-wide: every thread of the block calls it).
template <int kBlock>
__device__ void topk_advance(const TopkParams& p, int64_t r, int pass, TopkState st) {
  using Scan = cub::BlockScan<int, kBlock>;
  __shared__ typename Scan::TempStorage scan_tmp;
  __shared__ int sh_digit, sh_above;
  constexpr int kPer = kTopkBins / kBlock;
  const int* hist = p.hist + (pass * p.B * p.Hsel + r) * kTopkBins;
  int items[kPer], incl[kPer];
  for (int k = 0; k < kPer; ++k) items[k] = hist[kTopkBins - 1 - (threadIdx.x * kPer + k)];  // top digit first
  Scan(scan_tmp).InclusiveSum(items, incl);
  for (int k = 0; k < kPer; ++k) {
    const int above = incl[k] - items[k];
    if (items[k] > 0 && above < st.want && incl[k] >= st.want) {
      sh_digit = kTopkBins - 1 - (threadIdx.x * kPer + k);
      sh_above = above;
    }
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    int64_t* out = p.state + r * 3;
    out[0] = st.prefix | (static_cast<uint32_t>(sh_digit) << topk_shift(pass));
    out[1] = st.mask | (topk_digit_mask(pass) << topk_shift(pass));
    out[2] = st.want - sh_above;
  }
}

// Radix pass `pass` of the multi-CTA top-k: CTA (chunk, row) histograms the digit of its chunk's
// candidate keys that match the prefix of the earlier passes into the row's global histogram; the
// row's last CTA to finish then picks the digit and stores the state for the next kernel.
// Pass 0 of group mode first turns the group's scores into rank keys (max over the group's heads
// of s_h - lse_h, NaN sticking), written over the group's first row.
template <int kBlock>
__global__ void __launch_bounds__(kBlock) topk_hist_kernel(const TopkParams p, int pass) {
  __shared__ int hist[kTopkBins];
  __shared__ bool last;
  const int64_t r = blockIdx.x, chunk = blockIdx.y;  // rows in x (any count), chunks in y
  const TopkRow row = topk_row(p, r);
  if (row.trivial) return;
  const int64_t t0 = chunk * kTopkChunk;
  const int64_t lo = row.c0 > t0 ? row.c0 : t0, hi = min64(row.c1, t0 + kTopkChunk);
  const int64_t v0 = lo / 4, v1 = lo < hi ? (hi + 3) / 4 : v0;  // vectors lie inside the chunk

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
  }
  const TopkState st = topk_state(p, r, row.free_slots, pass);
  const int shift = topk_shift(pass);
  const uint32_t digit_mask = topk_digit_mask(pass);
  for (int i = threadIdx.x; i < kTopkBins; i += kBlock) hist[i] = 0;
  __syncthreads();
  for (int64_t base = v0 + threadIdx.x; base < v1; base += kTopkUnroll * kBlock) {
    uint32_t k[kTopkUnroll][4];  // several vector loads in flight before the first use
#pragma unroll
    for (int u = 0; u < kTopkUnroll; ++u)
      if (base + u * kBlock < v1) topk_keys4(p, row.row0, base + u * kBlock, k[u]);
#pragma unroll
    for (int u = 0; u < kTopkUnroll; ++u) {
      const int64_t v = base + u * kBlock;
      if (v >= v1) break;
      for (int e = 0; e < 4; ++e) {
        const int64_t t = 4 * v + e;
        if (t >= lo && t < hi && (k[u][e] & st.mask) == st.prefix) atomicAdd(&hist[(k[u][e] >> shift) & digit_mask], 1);
      }
    }
  }
  __syncthreads();
  int* global = p.hist + (pass * p.B * p.Hsel + r) * kTopkBins;
  for (int i = threadIdx.x; i < kTopkBins; i += kBlock)
    if (hist[i] != 0) atomicAdd(&global[i], hist[i]);
  // Last CTA of the row (threadfence-reduction pattern): every chunk's counts are in `global`.
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) last = atomicAdd(&p.done[pass * p.B * p.Hsel + r], 1) == p.chunks - 1;
  __syncthreads();
  if (last) {
    __threadfence();
    topk_advance<kBlock>(p, r, pass, st);
  }
}

// The cut key of row r (after the three passes) and how many keys equal to it to take.
__device__ __forceinline__ void topk_cut(const TopkParams& p, int64_t r, uint32_t& cut, int64_t& take_eq) {
  cut = static_cast<uint32_t>(p.state[r * 3]);
  take_eq = p.state[r * 3 + 2];
}

// Per chunk: candidate keys above the cut and equal to it (the write kernel's offsets).
template <int kBlock>
__global__ void __launch_bounds__(kBlock) topk_count_kernel(const TopkParams p) {
  using Reduce = cub::BlockReduce<int, kBlock>;
  __shared__ typename Reduce::TempStorage red_tmp;
  const int64_t r = blockIdx.x, chunk = blockIdx.y;  // rows in x (any count), chunks in y
  const TopkRow row = topk_row(p, r);
  if (row.trivial) return;
  uint32_t cut;
  int64_t take_eq;
  topk_cut(p, r, cut, take_eq);
  const int64_t t0 = chunk * kTopkChunk;
  const int64_t lo = row.c0 > t0 ? row.c0 : t0, hi = min64(row.c1, t0 + kTopkChunk);
  int n_gt = 0, n_eq = 0;
  const int64_t v1 = lo < hi ? (hi + 3) / 4 : lo / 4;
  for (int64_t base = lo / 4 + threadIdx.x; base < v1; base += kTopkUnroll * kBlock) {
    uint32_t k[kTopkUnroll][4];
#pragma unroll
    for (int u = 0; u < kTopkUnroll; ++u)
      if (base + u * kBlock < v1) topk_keys4(p, row.row0, base + u * kBlock, k[u]);
#pragma unroll
    for (int u = 0; u < kTopkUnroll; ++u) {
      const int64_t v = base + u * kBlock;
      if (v >= v1) break;
      for (int e = 0; e < 4; ++e) {
        const int64_t t = 4 * v + e;
        if (t < lo || t >= hi) continue;
        n_gt += k[u][e] > cut;
        n_eq += k[u][e] == cut;
      }
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
  constexpr int kItems = 8;
  const int64_t r = blockIdx.x, chunk = blockIdx.y;  // rows in x (any count), chunks in y
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
  topk_cut(p, r, cut, take_eq);
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
  __syncthreads();
  // Rounds of kBlock * kItems positions; in each, a thread scans kItems consecutive positions.
  int64_t written = sh_offset, eq_seen = sh_eq_before;
  for (int64_t round = t0; round < hi; round += int64_t(kBlock) * kItems) {
    const int64_t first = round + int64_t(tid) * kItems;
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
    int64_t eq_take = take_eq - (eq_seen + eq_rank);
    eq_take = eq_take < 0 ? 0 : (eq_take > n_eq ? n_eq : eq_take);
    int off, total;
    Scan(scan_tmp).ExclusiveSum(n_gt + static_cast<int>(eq_take), off, total);
    __syncthreads();
    int64_t dst = written + off;
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
    written += total;
    eq_seen += eq_total;
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
