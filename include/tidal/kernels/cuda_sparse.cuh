// sparse_attention's gather kernel, framework-free (CUDA and cooperative groups only).
//
// A sparse row reads a few thousand scattered K/V rows for 1 (head mode) or G (group mode) query
// rows. The tile kernel of cuda_attention.cuh stages 64-row tiles through shared memory for 16-row
// tensor-core MMAs, which such a row fills with 1-4 rows: it spent its time issuing copies and MMAs
// for rows that do not exist (ncu on an H200, 1x128K, top-k 2048 head mode: about 4,000 instructions
// a warp at 8 warps an SM, 20 us with the rows already in L2, where reading them from memory alone
// takes 11 us). Here each row of K/V goes straight into registers: a "slot" of D/8 lanes holds a row,
// 16 bytes a lane, and keeps two batches of rows in flight (the next batch loads while one is
// computed on); dot products are lane FMAs plus a shuffle reduction within the slot, and the online
// softmax runs per slot. The slots of a CTA combine through shared memory; the CTAs that split one index row
// write partial results for merge_splits_kernel. (Splits merged in a thread-block cluster through
// distributed shared memory instead were slower at every benchmark shape on an H100: 1x32K top-k
// 2048 head mode 20.8 us with a 7-CTA cluster, 17.2 us with 8 splits and the merge kernel.)
#pragma once

#include "tidal/kernels/cuda_attention.cuh"

namespace tidal::kernels::cuda {

constexpr int kGatherWarps = 8;
constexpr int kGatherThreads = kGatherWarps * 32;
constexpr int kGatherMaxRows = 4;  // query rows per index row the gather kernel takes (register budget)

// Head dims the gather kernel takes: a row is D/8 lanes of 16 bytes, a power of two up to a warp.
constexpr bool gather_head_dim(int64_t D) { return D == 32 || D == 64 || D == 128 || D == 256; }
// Query rows of an instance: rows_per_group rounded up to 1, 2 or 4 (extra rows are masked).
constexpr int gather_rows(int64_t rows_per_group) { return rows_per_group <= 1 ? 1 : (rows_per_group <= 2 ? 2 : 4); }
// K/V rows of a slot's batch (two batches are in registers at a time, beside R rows' q and o).
TIDAL_HOST_DEVICE constexpr int gather_batch(int R) { return R == 1 ? 4 : 2; }
// Slots (rows handled side by side) of a CTA: D/8 lanes each.
constexpr int64_t gather_slots(int64_t D) { return kGatherWarps * 32 / (D / 8); }

// Shared memory: every warp's softmax state for the CTA combine; a state is [O (D floats), m, l],
// padded to 16-byte rows.
template <int D, int R>
struct GatherSmem {
  static constexpr int kStride = D + 4;
  static constexpr size_t kBytes = size_t(kGatherWarps) * R * kStride * sizeof(float);
};

// 8 elements of a 16-byte chunk as floats.
template <typename T>
__device__ __forceinline__ void unpack8(const uint4& v, float f[8]) {
  const uint32_t w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    if constexpr (std::is_same_v<T, __nv_bfloat16>) {
      f[2 * i] = __uint_as_float(w[i] << 16);  // bf16 is the top half of a float
      f[2 * i + 1] = __uint_as_float(w[i] & 0xffff0000u);
    } else {
      const float2 x = __half22float2(*reinterpret_cast<const __half2*>(&w[i]));
      f[2 * i] = x.x;
      f[2 * i + 1] = x.y;
    }
  }
}

// Folds softmax state (mb, lb, ob) into (ma, la, oa): both over disjoint sets of positions.
__device__ __forceinline__ void combine_state(float& ma, float& la, float (&oa)[8], float mb, float lb,
                                              const float (&ob)[8]) {
  const float M = fmaxf(ma, mb);
  const float fa = state_weight(ma, M), fb = state_weight(mb, M);
  la = fa * la + fb * lb;
#pragma unroll
  for (int d = 0; d < 8; ++d) oa[d] = fa * oa[d] + fb * ob[d];
  ma = M;
}

// Element d of the merge of n softmax states, state i at base(i) as [O (D floats), m, l]: its m, l
// and O with merge_splits' weights.
struct Merged {
  float m, l, o;
};
template <int D, typename Base>
__device__ __forceinline__ Merged merge_states(int n, Base base, int d) {
  Merged c = {kNegInf, 0.f, 0.f};
  for (int i = 0; i < n; ++i) c.m = fmaxf(c.m, base(i)[D]);
  for (int i = 0; i < n; ++i) {
    const float* st = base(i);
    const float f = state_weight(st[D], c.m);
    c.l += f * st[D + 1];
    c.o += f * st[d];
  }
  return c;
}

// Grid: x = index row x split, y = batch row. p.rows_per_group (<= R) query rows share each index
// row; p.chunk entries per split.
template <typename T, int D, int R>
__global__ void __launch_bounds__(kGatherThreads, 2) sparse_gather_kernel(const AttnParams p, T* __restrict__ out) {
  constexpr int kLanes = D / 8;  // lanes per K/V row
  constexpr int kSlotsPerWarp = 32 / kLanes;
  constexpr int kSlots = kGatherWarps * kSlotsPerWarp;
  constexpr int U = gather_batch(R);
  using Smem = GatherSmem<D, R>;
  extern __shared__ __align__(16) unsigned char gather_smem[];
  constexpr int kStride = Smem::kStride;
  float* sW = reinterpret_cast<float*>(gather_smem);  // [warp][R] states
  wait_for_previous_kernel();

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int sub = lane % kLanes;                    // this lane's 16-byte chunk of a row
  const int slot = warp * kSlotsPerWarp + lane / kLanes;
  const uint32_t splits = static_cast<uint32_t>(p.splits);
  const uint32_t irow = blockIdx.x / splits, split = blockIdx.x - irow * splits;
  const int64_t b = blockIdx.y;
  const uint32_t rows = static_cast<uint32_t>(p.rows_per_group);  // valid query rows, <= R
  const uint32_t head0 = irow * rows;
  const int64_t kvh = head0 / static_cast<uint32_t>(p.Hq / p.Hkv);
  const int64_t L = clamp_len(p.seq_lens, b, p.N);
  const int32_t* idx = p.indices + (b * p.row_groups() + irow) * p.K;
  const int64_t e1 = min64((split + 1) * p.chunk, p.K);
  const T* kbase = static_cast<const T*>(p.k) + b * p.k_stride_b + kvh * p.k_stride_h + sub * 8;
  const T* vbase = static_cast<const T*>(p.v) + b * p.v_stride_b + kvh * p.v_stride_h + sub * 8;

  // This lane's 8 dims of each query row, scaled; rows past `rows` are zero and never written.
  float q[R][8];
#pragma unroll
  for (int r = 0; r < R; ++r) {
    const T* qr = static_cast<const T*>(p.q) + b * p.q_stride_b + (head0 + r) * p.q_stride_h + sub * 8;
#pragma unroll
    for (int e = 0; e < 8; ++e) q[r][e] = r < rows ? Mma<T>::to_float(qr[e]) * p.scale : 0.f;
  }
  float m[R], l[R], o[R][8];
#pragma unroll
  for (int r = 0; r < R; ++r) {
    m[r] = kNegInf;
    l[r] = 0.f;
#pragma unroll
    for (int e = 0; e < 8; ++e) o[r][e] = 0.f;
  }

  // Batches: a slot's batch at `base` holds entries base + slot + u * kSlots (u < U) below e1. Two
  // batches alternate in registers: the next one's rows and the one after's positions are in flight
  // while a batch is computed on, so a slot's loads never drain between batches. The loop bounds are
  // uniform over the CTA (the slot reductions shuffle across whole warps).
  struct Batch {
    uint4 k[U], v[U];
    uint32_t valid;  // bit u: entry u is a valid position
  };
  const int64_t step = int64_t(U) * kSlots;
  auto fetch_positions = [&](int64_t base, int32_t (&pos)[U]) {
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int64_t e = base + slot + int64_t(u) * kSlots;
      pos[u] = e < e1 ? idx[e] : -1;
    }
  };
  auto issue_rows = [&](const int32_t (&pos)[U], Batch& bt) {
    bt.valid = 0;
#pragma unroll
    for (int u = 0; u < U; ++u) {
      bt.k[u] = bt.v[u] = make_uint4(0u, 0u, 0u, 0u);
      if (pos[u] >= 0 && pos[u] < L) {  // -1 and out-of-range entries are skipped
        // Streaming loads (evict first): an op reads each row once.
        bt.k[u] = __ldcs(reinterpret_cast<const uint4*>(kbase + pos[u] * p.k_stride_n));
        bt.v[u] = __ldcs(reinterpret_cast<const uint4*>(vbase + pos[u] * p.v_stride_n));
        bt.valid |= 1u << u;
      }
    }
  };
  auto consume = [&](const Batch& bt) {
    float s[U][R];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      float kf[8];
      unpack8<T>(bt.k[u], kf);
#pragma unroll
      for (int r = 0; r < R; ++r) {
        float acc = 0.f;
#pragma unroll
        for (int e = 0; e < 8; ++e) acc = fmaf(q[r][e], kf[e], acc);
        s[u][r] = acc;
      }
    }
#pragma unroll
    for (int off = kLanes / 2; off > 0; off >>= 1)
#pragma unroll
      for (int u = 0; u < U; ++u)
#pragma unroll
        for (int r = 0; r < R; ++r) s[u][r] += __shfl_xor_sync(0xffffffffu, s[u][r], off);
#pragma unroll
    for (int r = 0; r < R; ++r) {
      float tmax = kNegInf;
#pragma unroll
      for (int u = 0; u < U; ++u) {
        s[u][r] = (bt.valid >> u) & 1u ? s[u][r] : kNegInf;
        tmax = fmaxf(tmax, s[u][r]);
      }
      const float m_new = fmaxf(m[r], tmax);
      const float m_use = m_new == kNegInf ? 0.f : m_new;  // nothing valid yet: avoid (-inf) - (-inf)
      const float alpha = exp2f((m[r] - m_use) * kLog2e);
      m[r] = m_new;
      l[r] *= alpha;
#pragma unroll
      for (int e = 0; e < 8; ++e) o[r][e] *= alpha;
#pragma unroll
      for (int u = 0; u < U; ++u) s[u][r] = exp2f((s[u][r] - m_use) * kLog2e);
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      float vf[8];
      unpack8<T>(bt.v[u], vf);
#pragma unroll
      for (int r = 0; r < R; ++r) {
        l[r] += s[u][r];
#pragma unroll
        for (int e = 0; e < 8; ++e) o[r][e] = fmaf(s[u][r], vf[e], o[r][e]);
      }
    }
  };
  {
    const int64_t begin = split * p.chunk;
    Batch a, b2;
    int32_t pa[U], pb[U];
    fetch_positions(begin, pa);
    issue_rows(pa, a);
    fetch_positions(begin + step, pb);
    for (int64_t base = begin; base < e1; base += 2 * step) {
      issue_rows(pb, b2);
      fetch_positions(base + 2 * step, pa);
      consume(a);
      if (base + step >= e1) break;
      issue_rows(pa, a);
      fetch_positions(base + 3 * step, pb);
      consume(b2);
    }
  }

  let_next_kernel_start();

  // The warp's slots (disjoint entries) into one state, then every warp's into shared memory.
#pragma unroll
  for (int off = kLanes; off < 32; off <<= 1)
#pragma unroll
    for (int r = 0; r < R; ++r) {
      float ob[8];
#pragma unroll
      for (int e = 0; e < 8; ++e) ob[e] = __shfl_xor_sync(0xffffffffu, o[r][e], off);
      const float mb = __shfl_xor_sync(0xffffffffu, m[r], off), lb = __shfl_xor_sync(0xffffffffu, l[r], off);
      combine_state(m[r], l[r], o[r], mb, lb, ob);
    }
  if (lane < kLanes) {
#pragma unroll
    for (int r = 0; r < R; ++r) {
      float* w = sW + (warp * R + r) * kStride;
      *reinterpret_cast<float4*>(w + sub * 8) = make_float4(o[r][0], o[r][1], o[r][2], o[r][3]);
      *reinterpret_cast<float4*>(w + sub * 8 + 4) = make_float4(o[r][4], o[r][5], o[r][6], o[r][7]);
      if (sub == 0) w[D] = m[r], w[D + 1] = l[r];
    }
  }
  __syncthreads();

  // The CTA's state, one (row, dim) element per thread and step: the output itself where the CTA
  // has the whole index row, else a partial for merge_splits.
  for (uint32_t e = tid; e < rows * D; e += kGatherThreads) {
    const uint32_t r = e / D, d = e % D;
    const Merged c = merge_states<D>(kGatherWarps, [&](int w) { return sW + (w * R + r) * kStride; }, d);
    const int64_t row = b * p.Hq + head0 + r;  // output row (S = 1)
    if (splits == 1) {
      out[row * D + d] = Mma<T>::from_float(c.o * inv_row_sum(c.l));
    } else {
      const int64_t slot_id = row * splits + split;
      p.part_o[slot_id * D + d] = c.o;
      if (d == 0) p.part_ml[slot_id * 2] = c.m, p.part_ml[slot_id * 2 + 1] = c.l;
    }
  }
}

}  // namespace tidal::kernels::cuda
