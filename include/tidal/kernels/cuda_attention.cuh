// CUDA kernels of the tidal ops, framework-free (CUDA, cuda_fp16/cuda_bf16, CUB and cooperative
// groups only).
//
// One attention kernel serves all four ops. A CTA takes up to 16 query rows that share a KV head
// (the G query heads of a group for decode/select/group-sparse, one head for head-sparse, (query,
// head) pairs for correct_kv) and one split of the position space, streams K/V tiles of
// tile_tokens(D, sm90) tokens (a warp per 16 of them) through shared memory in three stages (on
// sm_90 tensor copies of whole tiles, or a bulk copy per row; cp.async below), computes S = Q K^T
// and O += P V with m16n8k16 tensor-core MMAs (fp32 accumulation), keeps an online softmax per warp,
// and writes a partial result (m, l, O) per split. merge_splits_kernel combines the splits
// (flash-decoding), and topk_kernel turns the raw scores select_attention asked for into sorted
// top-k index rows.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <cub/block/block_reduce.cuh>
#include <cub/block/block_scan.cuh>
#include <cooperative_groups.h>

#include "tidal/kernels/params.h"

// 1 in sm_90+ device code (clusters, bulk copies, mbarrier waits, grid dependency control), 0 in the
// host pass and in sm_80 code. The host learns which code a device runs from has_sm90 (launch.cu).
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
#define TIDAL_SM90 1
#else
#define TIDAL_SM90 0
#endif
// A PTX instruction with no operands, in sm_90+ device code only (nothing elsewhere).
#if TIDAL_SM90
#define TIDAL_SM90_ASM(instruction) asm volatile(instruction ";\n" ::: "memory")
#else
#define TIDAL_SM90_ASM(instruction) ((void)0)
#endif

namespace tidal::kernels::cuda {

// Threads of a tile-kernel CTA: a warp per 16 tokens of a tile.
TIDAL_HOST_DEVICE constexpr int tile_threads(int D, bool sm90) { return tile_tokens(D, sm90) / 16 * 32; }

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

__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}
// An 8-byte store to shared memory at a 32-bit shared address (a hot loop's base stays one register).
__device__ __forceinline__ void st_shared(uint32_t addr, uint2 v) {
  asm volatile("st.shared.v2.u32 [%0], {%1, %2};\n" ::"r"(addr), "r"(v.x), "r"(v.y) : "memory");
}

__device__ __forceinline__ void cp_async_16(void* smem, const void* gmem, bool valid) {
  const uint32_t dst = smem_u32(smem);
  const int src_bytes = valid ? 16 : 0;  // 0: zero-fill, nothing is read
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(gmem), "r"(src_bytes));
}
// "memory": shared-memory reads of the landed data stay after the wait, even with no barrier after it.
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory"); }

// sm_90 bulk copies (the TMA unit) and the mbarriers that count their bytes. A bulk copy moves a
// whole K/V row in one instruction, off the LSU: on an H100, decode at 1x128K took 1.09x cuDNN's
// time against 1.14x with 16-byte cp.async (64-row tiles), 1.04x against 1.14x with 128-row tiles.
// sm_80 code never calls them (TIDAL_SM90 gates the callers): there their bodies are empty.
__device__ __forceinline__ void mbar_init(uint64_t* bar, unsigned count) {
#if TIDAL_SM90
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(smem_u32(bar)), "r"(count) : "memory");
  asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
#endif
}
__device__ __forceinline__ void mbar_arrive_expect_tx(uint64_t* bar, unsigned bytes) {
#if TIDAL_SM90
  asm volatile("{\n.reg .b64 st;\nmbarrier.arrive.expect_tx.shared::cta.b64 st, [%0], %1;\n}\n" ::"r"(smem_u32(bar)),
               "r"(bytes)
               : "memory");
#endif
}
__device__ __forceinline__ void mbar_wait(uint64_t* bar, unsigned parity) {
#if TIDAL_SM90
  asm volatile(
      "{\n.reg .pred done;\nWAIT:\nmbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n@!done bra WAIT;\n}\n" ::"r"(
          smem_u32(bar)),
      "r"(parity)
      : "memory");
#endif
}
// A CUtensorMap (cuda.h's 128-byte, 64-byte aligned descriptor) as the kernel receives it, encoded
// by the launcher; CUDA headers stay out of the kernel's parameters.
struct alignas(64) TensorMap {
  unsigned char bytes[128];
};
// The K and V caches as [B, Hkv, N, D] tensor maps: boxes of 64 dims (128 bytes, swizzled) by a
// tile's rows. A __grid_constant__ kernel parameter, so that the copy engine reads it in place.
struct KvMaps {
  TensorMap k, v;
};
// The tensor copy of box (c0, c1, c2, c3) of `map` into shared memory (sm_90 code; empty elsewhere).
__device__ __forceinline__ void tensor_copy_4d(void* smem, const TensorMap* map, int c0, int c1, int c2, int c3,
                                               uint64_t* bar, uint64_t policy) {
#if TIDAL_SM90
  asm volatile(
      "cp.async.bulk.tensor.4d.shared::cluster.global.tile.mbarrier::complete_tx::bytes.L2::cache_hint"
      " [%0], [%1, {%2, %3, %4, %5}], [%6], %7;\n" ::"r"(smem_u32(smem)),
      "l"(map), "r"(c0), "r"(c1), "r"(c2), "r"(c3), "r"(smem_u32(bar)), "l"(policy)
      : "memory");
#endif
}
// Orders this thread's generic-proxy writes to shared memory before later copy-engine writes there.
__device__ __forceinline__ void fence_proxy_async() { TIDAL_SM90_ASM("fence.proxy.async.shared::cta"); }

// The bulk copy of `bytes` into shared memory, its lines taking L2 policy `policy`; first orders
// this thread's earlier generic-proxy writes to shared memory (a zero fill of the same row) before it.
__device__ __forceinline__ void bulk_copy(void* smem, const void* gmem, unsigned bytes, uint64_t* bar,
                                          uint64_t policy) {
#if TIDAL_SM90
  fence_proxy_async();
  asm volatile(
      "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes.L2::cache_hint"
      " [%0], [%1], %2, [%3], %4;\n" ::"r"(smem_u32(smem)),
      "l"(gmem), "r"(bytes), "r"(smem_u32(bar)), "l"(policy)
      : "memory");
#endif
}

// L2 eviction priorities (sm_90 code; 0 elsewhere, unused): an op reads the K/V stream once, so its
// lines go first; select's scores, which the top-k reads right after, stay. On an H100 (top-k 2048,
// head mode) select took 232.3 us against 239.9 at 1x128K and 74.2 against 78.0 at 1x32K.
template <bool kEvictLast>
__device__ __forceinline__ uint64_t l2_policy() {
  uint64_t policy = 0;
#if TIDAL_SM90
  if constexpr (kEvictLast)
    asm volatile("createpolicy.fractional.L2::evict_last.b64 %0, 1.0;\n" : "=l"(policy));
  else
    asm volatile("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;\n" : "=l"(policy));
#endif
  return policy;
}
// Invalidates the 128-byte L2 line at `line` (128-byte aligned) without writing it back: its data
// is dead. Later reads of it return undefined values. No memory clobber: nothing reads it again.
constexpr int kL2LineFloats = 32;
__device__ __forceinline__ void l2_discard(const float* line) {
  asm volatile("discard.global.L2 [%0], 128;\n" ::"l"(line));
}
// *dst = v, its line taking L2 policy `policy` (sm_90 code; a plain store elsewhere).
__device__ __forceinline__ void store_hinted(float4* dst, const float4& v, uint64_t policy) {
#if TIDAL_SM90
  asm volatile("st.global.L2::cache_hint.v4.f32 [%0], {%1, %2, %3, %4}, %5;\n" ::"l"(dst), "f"(v.x), "f"(v.y), "f"(v.z),
               "f"(v.w), "l"(policy)
               : "memory");
#else
  *dst = v;
#endif
}

// Order-preserving map of a float to uint32 (larger float -> larger key); NaN above everything and
// -0 equal to +0, matching the CPU kernel's ranks_before.
__device__ __forceinline__ uint32_t rank_key(float x) {
  if (x != x) return 0xffffffffu;
  if (x == 0.f) x = 0.f;
  const uint32_t u = __float_as_uint(x);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

// The top-k's first radix digit of a key: its top 11 bits.
__device__ __forceinline__ uint32_t first_digit(uint32_t key) { return key >> 21; }

// Programmatic dependent launch (sm_90): a kernel may start while the previous kernel of the stream
// finishes, so its launch latency and set-up overlap that kernel's tail. Every kernel here waits for
// the previous one's results before its first global read (select's head-mode merge, behind the
// top-k, at its end: see merge_splits_kernel), and lets the next one start once its main loop is
// done; both are no-ops without the launch attribute or below sm_90. The launchers ask
// for it where a kernel follows another of the same op (merge_splits, top-k, select's tile kernel
// behind its histogram's zero fill): on an H100 that took 1-2 us off decode and select; launching
// each op's first kernel early as well lost 1-3% on the 32-layer step. The one exception is that
// zero fill, which is only select's first kernel and waits at once (0.4-0.7 us off select).
__device__ __forceinline__ void wait_for_previous_kernel() { TIDAL_SM90_ASM("griddepcontrol.wait"); }
__device__ __forceinline__ void let_next_kernel_start() { TIDAL_SM90_ASM("griddepcontrol.launch_dependents"); }

// select (head mode, with the digit counts): each tile CTA adds 1 to a count once its scores, digit
// counts and partials are written (a release), and the top-k and its merge wait for the count (an
// acquire) instead of the tile kernel's end, which they learn about 0.5 us later (H100 traces; A/B
// at 1x32K: 63.1 against 63.9 us). They start only once every tile CTA has let them (programmatic
// launch) or ended, so every CTA they wait for is running: the wait ends.
__device__ __forceinline__ void count_done(float* count) {
  asm volatile("red.release.gpu.global.add.f32 [%0], %1;" ::"l"(count), "f"(1.f) : "memory");
}
__device__ __forceinline__ void wait_for_count(const float* count, float target) {
  if (threadIdx.x == 0) {
    float v;
    do {
      asm volatile("ld.acquire.gpu.global.f32 %0, [%1];" : "=f"(v) : "l"(count) : "memory");
    } while (v < target);
  }
  __syncthreads();
}

__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t r[4], const void* smem) {
  const uint32_t addr = smem_u32(smem);
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

// Weight of a softmax state with running max m when states merge under the max M: 0 for a state
// that saw no valid position; (+inf) - (+inf) gives NaN, so a NaN stays NaN.
__device__ __forceinline__ float state_weight(float m, float M) { return m == kNegInf ? 0.f : exp2f((m - M) * kLog2e); }
// 1 / L of a merged row: 0 where no position was valid (L = 0), NaN stays NaN.
__device__ __forceinline__ float inv_row_sum(float L) { return L > 0.f ? 1.f / L : (L == 0.f ? 0.f : L); }

// Shared memory of the attention kernel: kStages stages of K and V tiles and the positions of each
// tile row (-1 = masked). Three stages keep two tiles in flight per CTA while the third is computed
// on. Rows copied one by one (a bulk copy or cp.asyncs a row) are padded by 16 bytes so the MMA
// operand reads hit 32 distinct banks; tiles the tensor copies fill (kSwizzled) hold 64-dim halves of
// 128-byte rows whose 16-byte chunks the copy engine swizzles (chunk c of row r at c ^ (r % 8)),
// which spreads those reads as well. Swizzled tiles start at a 1024-byte boundary (the swizzle's
// period): the kernel aligns the buffer, which has room for that.
constexpr int kStages = 3;
template <typename T, int D, bool kSm90, bool kSwizzled = false>
struct AttnSmem {
  static constexpr int kTileTokens = tile_tokens(D, kSm90), kWarps = kTileTokens / 16;
  static constexpr int kPitch = kSwizzled ? D : D + 8;  // elements per smem row
  static constexpr size_t kTileElems = size_t(kTileTokens) * kPitch;
  static constexpr size_t kTileBytes = kStages * 2 * kTileElems * sizeof(T);
  static constexpr size_t kAlign = kSwizzled ? 1024 : 16;
  static constexpr size_t kBytes = kTileBytes + kStages * kTileTokens * sizeof(int32_t) + (kAlign - 16);
  static_assert(!kSwizzled || D % 64 == 0, "swizzled tiles hold 64-dim halves");
  // The final cross-warp combine reuses the tiles: kWarps x kTileRows rows of kCombinePitch floats
  // plus m, l, weight, and each row's m, l. The pitch (D + 8, a multiple of 8 past 32 banks) puts
  // a half warp's 8-byte stores of 4 rows on 32 distinct banks (a pitch of D: 4-way conflicts).
  static constexpr int kCombinePitch = D + 8;
  static_assert((size_t(kWarps) * kTileRows * (kCombinePitch + 3) + 2 * kTileRows) * sizeof(float) <= kTileBytes,
                "combine buffer must fit in the tile buffers");
  // With select's digit counts (p.hist): kDigitRows x kTopkBins 16-bit counters after the rest.
  static constexpr size_t kDigitBytes = size_t(kDigitRows) * kTopkBins * sizeof(uint16_t);
  // Element offset of 16-byte chunk c (8 elements) of tile row r.
  static __device__ __forceinline__ int at(int r, int c) {
    if constexpr (kSwizzled)
      return (c >> 3) * kTileTokens * 64 + r * 64 + (((c & 7) ^ (r & 7)) << 3);
    else
      return r * kPitch + c * 8;
  }
};

// Whether the tile kernel of head dim D may load its tiles by tensor copies (sm_90, dense positions):
// its tiles then hold 64-dim halves.
TIDAL_HOST_DEVICE constexpr bool tile_tensor_copies(int D) { return D == 64 || D == 128; }

// kTensorCopies (sm_90 code, tile_tensor_copies(D), dense positions): one tensor copy of K and one of V
// per 64 dims of a tile, from `maps`, instead of a bulk copy per row.
template <typename T, int D, bool kTensorCopies>
__global__ void __launch_bounds__(tile_threads(D, TIDAL_SM90))
    attention_split_kernel(const AttnParams p, const __grid_constant__ KvMaps maps) {
  using Smem = AttnSmem<T, D, TIDAL_SM90, kTensorCopies>;
  constexpr int kTileTokens = Smem::kTileTokens, kWarps = Smem::kWarps, kThreads = tile_threads(D, TIDAL_SM90);
  constexpr int kChunks = D / 8;  // 16-byte chunks per row
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* sK = reinterpret_cast<T*>((reinterpret_cast<uintptr_t>(smem_raw) + Smem::kAlign - 1) & ~(Smem::kAlign - 1));
  T* sV = sK + kStages * Smem::kTileElems;
  int32_t* sPos = reinterpret_cast<int32_t*>(sV + kStages * Smem::kTileElems);
  // select's digit counts: row r's digits 2w, 2w + 1 in the low, high half of word r * kTopkBins / 2 + w
  uint32_t* sDigits = reinterpret_cast<uint32_t*>(smem_raw + Smem::kBytes);
  constexpr int kDigitWords = kDigitRows * kTopkBins / 2;

  // select (head mode): the kernel starts early behind the zero fill of its histogram (zero_fill_kernel)
  // and waits for it only before its digit flush, so the fill overlaps the main loop.
  if (p.hist == nullptr) wait_for_previous_kernel();
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  // Grid: x = row group x m tile (can exceed 65535: a long correct_kv chunk), y = split (<= kMaxSplits),
  // z = batch row (<= 65535, checked on the host). Head and row indices fit 32 bits (Hq * S rows of
  // D >= 32 elements each fit memory), so their divisions are 32-bit: a short CTA (sparse attention)
  // spends a noticeable share of its time on this set-up.
  const int64_t split = blockIdx.y, b = blockIdx.z;
  const uint32_t m_tiles = static_cast<uint32_t>(p.m_tiles());
  const uint32_t rg = blockIdx.x / m_tiles, mt = blockIdx.x - rg * m_tiles;
  const uint32_t Gr = static_cast<uint32_t>(p.rows_per_group), rows = static_cast<uint32_t>(p.rows_per_cta_group());
  const uint32_t G = static_cast<uint32_t>(p.Hq / p.Hkv);
  const int64_t kvh = (rg * Gr) / G;
  const int64_t N = p.N;
  const int64_t L = clamp_len(p.seq_lens, b, N);
  const bool gather = p.indices != nullptr;
  const int64_t start_b = p.start ? p.start[b] : 0;

  // This lane's two MMA rows (lane/4 and lane/4 + 8): head h, query i, position limit, and where
  // select's raw scores of the row go.
  int64_t head[2], query[2], limit[2];
  float* score_row[2];
  bool row_ok[2];
  int64_t max_limit;
  for (int j = 0; j < 2; ++j) {
    const uint32_t local = mt * kTileRows + (lane >> 2) + 8 * j;
    row_ok[j] = local < rows;
    const uint32_t i = row_ok[j] ? local / Gr : 0;
    query[j] = i;
    head[j] = rg * Gr + (row_ok[j] ? local - i * Gr : 0);
    limit[j] = p.start ? min64(start_b + i + 1, N) : L;
    score_row[j] = p.scores != nullptr ? p.scores + ((b * p.Hq + head[j]) * p.S + i) * p.scores_ld : nullptr;
  }
  {
    const uint32_t last_local = (mt * kTileRows + kTileRows < rows ? mt * kTileRows + kTileRows : rows) - 1;
    max_limit = p.start ? min64(start_b + last_local / Gr + 1, N) : L;
  }
  const int64_t space = gather ? p.K : max_limit;
  const int64_t p0 = split * p.chunk, p1 = min64(p0 + p.chunk, space);
  const int64_t num_tiles = p1 > p0 ? (p1 - p0 + kTileTokens - 1) / kTileTokens : 0;

  const T* kbase = static_cast<const T*>(p.k) + b * p.k_stride_b + kvh * p.k_stride_h;
  const T* vbase = static_cast<const T*>(p.v) + b * p.v_stride_b + kvh * p.v_stride_h;
  const int32_t* idx_row = gather ? p.indices + (b * p.row_groups() + rg) * p.K : nullptr;

  // Tile row t's position, -1 where it is masked: past the split, or (gathered) an invalid entry.
  // Positions fit int32 (N is checked on the host).
  auto position = [&](int64_t t) -> int32_t {
    if (t >= p1) return -1;
    // gathered entries must be valid positions (< L); dense ones lie below the tile's limit
    const int64_t cand = gather ? idx_row[t] : t;
    return cand >= 0 && cand < (gather ? L : max_limit) ? static_cast<int32_t>(cand) : -1;
  };

  // sm_90: each thread moves one K or V row of a tile by bulk copy; stage s's mbarrier completes once
  // every warp has arrived and the copies' bytes have landed. Invalid rows are zeroed by hand. With
  // tensor copies, thread 0 arrives once and issues them all.
  const bool bulk = TIDAL_SM90 && p.sm90;
  __shared__ __align__(8) uint64_t stage_bar[kStages];
  static_assert(kThreads == 2 * kTileTokens, "a thread per K or V row of a tile");
  if (bulk) {
    if (tid == 0)
      for (int s = 0; s < kStages; ++s) mbar_init(&stage_bar[s], kTensorCopies ? 1 : kWarps);
    __syncthreads();
  }
  const uint64_t kv_policy = l2_policy<false>(), score_policy = l2_policy<true>();
  auto load_tile_bulk = [&](int64_t tile, int stage) {
    const int r = tid % kTileTokens;
    const bool is_v = tid >= kTileTokens;
    const int32_t pos = position(p0 + tile * kTileTokens + r);
    T* dst = (is_v ? sV : sK) + stage * Smem::kTileElems + Smem::at(r, 0);
    // One arrival a warp, expecting the bytes of its lanes' copies.
    const unsigned copies = __popc(__ballot_sync(0xffffffffu, pos >= 0));
    if (lane == 0) mbar_arrive_expect_tx(&stage_bar[stage], copies * D * sizeof(T));
    __syncwarp();
    if (pos >= 0) {
      bulk_copy(dst, is_v ? vbase + pos * p.v_stride_n : kbase + pos * p.k_stride_n, D * sizeof(T), &stage_bar[stage],
                kv_policy);
    } else {
#pragma unroll
      for (int c = 0; c < kChunks; ++c) reinterpret_cast<uint4*>(dst)[c] = make_uint4(0, 0, 0, 0);
    }
    if (!is_v) sPos[stage * kTileTokens + r] = pos;
  };

  // Else the cp.async loads of the tile; invalid rows are zero-filled. All positions (index loads
  // for sparse) are fetched before the first copy so their latencies overlap.
  auto load_tile_async = [&](int64_t tile, int stage) {
    constexpr int kPerThread = kTileTokens * kChunks / kThreads;
    const int64_t t0 = p0 + tile * kTileTokens;
    int32_t pos[kPerThread];
#pragma unroll
    for (int j = 0; j < kPerThread; ++j) pos[j] = position(t0 + (tid + j * kThreads) / kChunks);
#pragma unroll
    for (int j = 0; j < kPerThread; ++j) {
      const int c = tid + j * kThreads, r = c / kChunks, ch = c % kChunks;
      const bool ok = pos[j] >= 0;
      const int64_t prow = ok ? pos[j] : 0;
      cp_async_16(sK + stage * Smem::kTileElems + Smem::at(r, ch), kbase + prow * p.k_stride_n + ch * 8, ok);
      cp_async_16(sV + stage * Smem::kTileElems + Smem::at(r, ch), vbase + prow * p.v_stride_n + ch * 8, ok);
      if (ch == 0) sPos[stage * kTileTokens + r] = pos[j];
    }
  };
  // Tensor copies of a whole tile; rows past the tensor's N arrive as zeros, the kernel zeroes the
  // V rows from max_limit on after they land (zero_tail_rows). Positions are written as above.
  auto load_tile_tensor = [&](int64_t tile, int stage) {
    const int64_t t0 = p0 + tile * kTileTokens;
    if (tid == 0) {
      mbar_arrive_expect_tx(&stage_bar[stage], 2 * kTileTokens * D * sizeof(T));
      for (int h = 0; h < D / 64; ++h) {
        const int off = stage * Smem::kTileElems + h * kTileTokens * 64;
        tensor_copy_4d(sK + off, &maps.k, h * 64, static_cast<int>(t0), static_cast<int>(kvh), static_cast<int>(b),
                       &stage_bar[stage], kv_policy);
        tensor_copy_4d(sV + off, &maps.v, h * 64, static_cast<int>(t0), static_cast<int>(kvh), static_cast<int>(b),
                       &stage_bar[stage], kv_policy);
      }
    }
    if (tid < kTileTokens) sPos[stage * kTileTokens + tid] = position(t0 + tid);
  };
  // V rows at or past max_limit hold whatever the cache holds there (NaN, say), and a zero weight
  // times NaN is NaN: zero them, once the copies have landed. Only a tile that reaches max_limit.
  auto zero_tail_rows = [&](int64_t tile, int stage) {
    const int64_t t0 = p0 + tile * kTileTokens;
    if (t0 + kTileTokens <= max_limit) return;
    for (int e = tid; e < kTileTokens * kChunks; e += kThreads) {
      const int r = e / kChunks, c = e % kChunks;
      if (t0 + r >= max_limit)
        reinterpret_cast<uint4*>(sV + stage * Smem::kTileElems + Smem::at(r, c))[0] = make_uint4(0, 0, 0, 0);
    }
    fence_proxy_async();  // the stage's next tensor copies land after these writes
  };
  auto load_tile = [&](int64_t tile, int stage) {
    if constexpr (kTensorCopies)
      load_tile_tensor(tile, stage);
    else if (bulk)
      load_tile_bulk(tile, stage);
    else
      load_tile_async(tile, stage);
  };

  // Pipeline: tiles 0 .. kStages-2 in flight before the loop, issued before the Q loads below so
  // that the latency of those loads overlaps theirs (on an H100, decode and select at 1x32K took
  // about 1 us less); each iteration waits for its tile, then refills the stage the previous
  // iteration consumed (the barrier orders that reuse).
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < num_tiles) load_tile(s, s);
    cp_async_commit();  // an empty group where there is no tile keeps the group count uniform
  }

  // Q fragments (A operand), rows beyond this CTA's rows are zero.
  uint32_t qa[D / 16][4];
  {
    const T* qrow[2];
    for (int j = 0; j < 2; ++j)
      qrow[j] = static_cast<const T*>(p.q) + b * p.q_stride_b + head[j] * p.q_stride_h + query[j] * p.q_stride_s;
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

  if (p.hist != nullptr)  // the loop's first barrier orders this before the first count
    for (int w = tid; w < kDigitWords; w += kThreads) sDigits[w] = 0;

  for (int64_t tile = 0; tile < num_tiles; ++tile) {
    const int stage = static_cast<int>(tile % kStages);
    if (bulk)
      mbar_wait(&stage_bar[stage], static_cast<unsigned>(tile / kStages) & 1u);
    if constexpr (kTensorCopies)
      zero_tail_rows(tile, stage);
    else if (!bulk)
      cp_async_wait<kStages - 2>();
    __syncthreads();  // the stage's zero fills and positions; the stage refilled next is consumed
    if (tile + kStages - 1 < num_tiles) load_tile(tile + kStages - 1, static_cast<int>((tile + kStages - 1) % kStages));
    cp_async_commit();

    const T* tK = sK + stage * Smem::kTileElems;
    const T* tV = sV + stage * Smem::kTileElems;
    const int32_t* tPos = sPos + stage * kTileTokens;

    // S = Q K^T for this warp's 16 tokens: two n8 blocks.
    float s[2][4];
    for (int nb = 0; nb < 2; ++nb) {
      s[nb][0] = s[nb][1] = s[nb][2] = s[nb][3] = 0.f;
      const int kr = warp * 16 + nb * 8 + (lane >> 2);
      const T* krow = tK + 2 * (lane & 3);
      for (int kc = 0; kc < D / 16; ++kc) {
        const uint32_t b0 = *reinterpret_cast<const uint32_t*>(krow + Smem::at(kr, 2 * kc));
        const uint32_t b1 = *reinterpret_cast<const uint32_t*>(krow + Smem::at(kr, 2 * kc + 1));
        Mma<T>::mma(s[nb], qa[kc], b0, b1);
      }
    }
    // Scale and mask; element e of block nb: row j = e / 2, token col.
    float tmax[2] = {kNegInf, kNegInf};
    for (int nb = 0; nb < 2; ++nb)
      for (int e = 0; e < 4; ++e) {
        const int j = e >> 1;
        const int tok = warp * 16 + nb * 8 + 2 * (lane & 3) + (e & 1);
        const int64_t pos = tPos[tok];
        const bool ok = row_ok[j] && pos >= 0 && pos < limit[j];
        const float x = ok ? s[nb][e] * p.scale : kNegInf;
        s[nb][e] = x;
        tmax[j] = fmaxf(tmax[j], x);
      }
    // select's raw scores (dense positions, so a tile's tokens are consecutive positions from a
    // multiple of 4): even lanes of a quad take the odd lane's pair and store 4 positions as one
    // float4. Masked positions in it get -inf; they lie below scores_ld, a multiple of 4 >= N.
    if (p.scores != nullptr)
      for (int nb = 0; nb < 2; ++nb)
        for (int j = 0; j < 2; ++j) {
          const float y0 = __shfl_xor_sync(0xffffffffu, s[nb][2 * j], 1);
          const float y1 = __shfl_xor_sync(0xffffffffu, s[nb][2 * j + 1], 1);
          const int64_t pos = tPos[warp * 16 + nb * 8 + 2 * (lane & 3)];
          if ((lane & 1) == 0 && row_ok[j] && pos >= 0)
            store_hinted(reinterpret_cast<float4*>(score_row[j] + pos),
                         make_float4(s[nb][2 * j], s[nb][2 * j + 1], y0, y1), score_policy);
        }
    // select, head mode: the first digits of each row's candidates [sink, L - tail), counted while
    // the scores are in registers, so the top-k need not read every score once more for them. The
    // CTA's rows (<= kDigitRows) are lane / 4 of row block j = 0; a lane's 4 scores are one row's, at
    // positions (dense) t0 + 8 nb + c. Keys crowd into a few digits: a lane adds equal ones at once.
    if (p.hist != nullptr && row_ok[0] && lane < 4 * kDigitRows) {
      const int64_t t0 = p0 + tile * kTileTokens + warp * 16 + 2 * (lane & 3), c1 = min64(limit[0] - p.tail, p1);
      uint32_t slot[4];
      bool cand[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int64_t t = t0 + 8 * (i >> 1) + (i & 1);
        cand[i] = t >= p.sink && t < c1;
        slot[i] = (lane >> 2) * kTopkBins + first_digit(rank_key(s[i >> 1][i & 1]));
      }
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        if (!cand[i]) continue;
        uint32_t n = 1;
#pragma unroll
        for (int k = i + 1; k < 4; ++k)
          if (cand[k] && slot[k] == slot[i]) {
            ++n;
            cand[k] = false;
          }
        atomicAdd(&sDigits[slot[i] / 2], n << (16 * (slot[i] & 1)));
      }
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
      const int mat = lane >> 3, vr = warp * 16 + (lane & 7) + (mat & 1) * 8;
      for (int j = 0; j < D / 16; ++j) {
        uint32_t vb[4];
        ldmatrix_x4_trans(vb, tV + Smem::at(vr, 2 * j + (mat >> 1)));
        Mma<T>::mma(o[2 * j], pa, vb[0], vb[1]);
        Mma<T>::mma(o[2 * j + 1], pa, vb[2], vb[3]);
      }
    }
  }
  cp_async_wait<0>();
  let_next_kernel_start();

  // Row sums across the 4 lanes that share a row.
  for (int j = 0; j < 2; ++j) {
    l_run[j] += __shfl_xor_sync(0xffffffffu, l_run[j], 1);
    l_run[j] += __shfl_xor_sync(0xffffffffu, l_run[j], 2);
  }

  // Combine the 4 warps through shared memory (the tile buffers are free now): each row's warp
  // weights once, then the CTA's valid rows element by element.
  __syncthreads();
  if (p.hist != nullptr) {  // the CTA's digit counts into its rows' (zeroed) histograms
    wait_for_previous_kernel();
    // Words w, w + 1 hold bins 2w .. 2w + 3: sm_90 adds them by one vector reduction (one float4),
    // which took the flush from about 1.2 to 0.35 us on an H100 (scalar reductions, one a nonzero
    // bin: the flush's time went with their number).
    float* hist = p.hist + (b * p.Hq + rg * Gr) * kTopkBins;
    for (int w = 2 * tid; w < kDigitWords; w += 2 * kThreads) {
      const uint2 v = *reinterpret_cast<const uint2*>(sDigits + w);
      if ((v.x | v.y) == 0u) continue;
      const float c[4] = {static_cast<float>(v.x & 0xffffu), static_cast<float>(v.x >> 16),
                          static_cast<float>(v.y & 0xffffu), static_cast<float>(v.y >> 16)};
#if TIDAL_SM90
      asm volatile("red.global.add.v4.f32 [%0], {%1, %2, %3, %4};" ::"l"(hist + 2 * w), "f"(c[0]), "f"(c[1]),
                   "f"(c[2]), "f"(c[3])
                   : "memory");
#else
      for (int i = 0; i < 4; ++i)
        if (c[i] != 0.f) atomicAdd(hist + 2 * w + i, c[i]);
#endif
    }
  }
  constexpr int kPitch = Smem::kCombinePitch;
  float* cO = reinterpret_cast<float*>(smem_raw);        // [kWarps][kTileRows][kPitch]
  float* cM = cO + kWarps * kTileRows * kPitch;          // [kWarps][kTileRows]
  float* cL = cM + kWarps * kTileRows;                   // [kWarps][kTileRows]
  float* cW = cL + kWarps * kTileRows;                   // [kWarps][kTileRows] weight of each warp
  float* cRow = cW + kWarps * kTileRows;                 // [kTileRows][2]: the row's m and l
  // Only the CTA's valid rows (decode's 4 of 16 with 4 query heads a KV head).
  const uint32_t valid_rows = rows - mt * kTileRows < kTileRows ? rows - mt * kTileRows : kTileRows;
  for (int j = 0; j < 2; ++j) {
    const int row = (lane >> 2) + 8 * j;
    if (row >= static_cast<int>(valid_rows)) continue;
    if ((lane & 3) == 0) {
      cM[warp * kTileRows + row] = m_run[j];
      cL[warp * kTileRows + row] = l_run[j];
    }
    for (int n = 0; n < D / 8; ++n)
      *reinterpret_cast<float2*>(cO + (warp * kTileRows + row) * kPitch + n * 8 + 2 * (lane & 3)) =
          make_float2(o[n][2 * j], o[n][2 * j + 1]);
  }
  __syncthreads();
  if (tid < static_cast<int>(valid_rows)) {
    float m = kNegInf;
    for (int w = 0; w < kWarps; ++w) m = fmaxf(m, cM[w * kTileRows + tid]);
    float l = 0.f;
    for (int w = 0; w < kWarps; ++w) {
      const float f = state_weight(cM[w * kTileRows + tid], m);
      cW[w * kTileRows + tid] = f;
      l += f * cL[w * kTileRows + tid];
    }
    cRow[2 * tid] = m;
    cRow[2 * tid + 1] = l;
  }
  __syncthreads();
  for (uint32_t e = tid; e < valid_rows * D; e += kThreads) {
    const uint32_t row = e / D, d = e % D;  // D is a compile-time constant
    const uint32_t local = mt * kTileRows + row, i = local / Gr;
    const int64_t rid = int64_t(rg * Gr + (local - i * Gr)) * p.S + i;
    float acc = 0.f;
    for (int w = 0; w < kWarps; ++w) acc += cW[w * kTileRows + row] * cO[(w * kTileRows + row) * kPitch + d];
    const int64_t slot = (b * p.Hq * p.S + rid) * p.splits + split;
    p.part_o[slot * D + d] = acc;
    if (d == 0) {
      p.part_ml[slot * 2] = cRow[2 * row];
      p.part_ml[slot * 2 + 1] = cRow[2 * row + 1];
    }
  }
  if (p.hist != nullptr) {
    __syncthreads();  // every thread's writes are in (the release is cumulative over the barrier)
    if (tid == 0) count_done(select_done_count(p.hist, p.B, p.Hq));
  }
}

// Zeroes n items of dst. It starts early behind the stream's previous kernel and waits for it (dst
// may be memory that kernel still reads), then lets the next kernel (select's tile kernel, which
// reads the previous kernels' results without waiting again) start at once. A template (of one
// instance) so that the .cu files including this header share one definition.
template <typename V>
__global__ void zero_fill_kernel(V* dst, int64_t n) {
  wait_for_previous_kernel();
  let_next_kernel_start();
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x)
    dst[i] = V{};
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
// threads a row: the split weights once, then each thread one output dim. The first kPreload
// splits' partials load before the weights are known, so the loads' latency overlaps the two block
// reductions (the kernel is a chain of a few dependent loads: its latency is its time).
//
// kBehindTopk: the kernel follows select's top-k (head mode), which lets it start once every top-k
// CTA has waited for the attention pass: so the partials are complete when it starts (where the
// tile CTAs count themselves done, `done`, it waits for that count too), it reads them past L1 (no
// stale line of an earlier kernel), and it runs beside the top-k instead of before it. It waits
// for the top-k only at its end, so that the stream's next kernel still starts after both.
template <bool kBehindTopk>
__device__ __forceinline__ float load_partial(const float* p) {
  return kBehindTopk ? __ldcg(p) : *p;
}
template <typename T, int D, bool kBehindTopk>
__global__ void __launch_bounds__(D) merge_splits_kernel(const float* part_o, const float* part_ml, int splits,
                                                          T* out, float* lse, const float* done, float done_target) {
  constexpr int kPreload = 16;
  __shared__ float w[kMaxSplits];
  __shared__ float scratch[D / 32];
  if (!kBehindTopk) wait_for_previous_kernel();
  let_next_kernel_start();
  if (kBehindTopk && done != nullptr) wait_for_count(done, done_target);
  const int64_t row = blockIdx.x;
  const int d = threadIdx.x;
  const float* ml = part_ml + row * splits * 2;
  const float* o = part_o + row * splits * D + d;
  float early[kPreload];
#pragma unroll
  for (int s = 0; s < kPreload; ++s) early[s] = s < splits ? load_partial<kBehindTopk>(o + s * D) : 0.f;
  float m = kNegInf;
  for (int s = d; s < splits; s += D) m = fmaxf(m, load_partial<kBehindTopk>(ml + 2 * s));
  const float M = block_reduce<D, true>(m, scratch);
  float l = 0.f;
  for (int s = d; s < splits; s += D) {
    const float f = state_weight(load_partial<kBehindTopk>(ml + 2 * s), M);
    w[s] = f;
    l += f * load_partial<kBehindTopk>(ml + 2 * s + 1);
  }
  const float Lsum = block_reduce<D, false>(l, scratch);  // its barrier also publishes w
  float acc = 0.f;
#pragma unroll
  for (int s = 0; s < kPreload; ++s)
    if (s < splits) acc += w[s] * early[s];
#pragma unroll 8
  for (int s = kPreload; s < splits; ++s) acc += w[s] * load_partial<kBehindTopk>(o + int64_t(s) * D);
  out[row * D + d] = Mma<T>::from_float(acc * inv_row_sum(Lsum));
  if (lse != nullptr && d == 0) lse[row] = Lsum > 0.f ? M + logf(Lsum) : (Lsum == 0.f ? kNegInf : Lsum);
  if (kBehindTopk) wait_for_previous_kernel();
}

// ---- top-k selection -------------------------------------------------------------------------
//
// One kernel: a cluster of p.cluster CTAs per selection row, each owning a contiguous chunk of the
// row's positions. Pass A reads the chunk's scores once, turns them into rank keys and histograms
// their top 11 bits (head mode, where p.hist is given: the attention pass counted them, and pass A
// only loads that histogram); the CTAs sum the cluster's histograms through distributed shared
// memory, so each knows the bin of the cut key. A second read lists, in position order, the chunk's
// keys at or above that bin (every possible winner, usually a few hundred) in shared memory; head
// mode writes those in the cut bin into every cluster CTA's shared memory. Every CTA then holds the
// cluster's cut-bin keys (a few thousand at most, usually) and ranks them on its own: one more
// radix pass (11 bits) leaves a few keys, which one warp ranks (a 10-bit pass where more than 32
// are left, as with ties); that gives the exact cut key and the lower chunks' winner counts. Each
// warp writes its part of the list's winners at its offset in position order, so rows come out
// sorted. Where a list or a chunk's share of the cut-bin keys would overflow (and in group mode),
// the passes run through the cluster's histograms instead, over the list or the re-read keys.
// Without clusters (sm_80), p.cluster is 1 and the "cluster" calls are the CTA's own.

// The two halves of a cluster barrier, for a CTA that is done with its peers' shared memory well
// before it ends: it arrives then, and waits (so that no peer still reads its own) just before it
// exits. Every thread calls both, the same number of times. No-ops without clusters.
__device__ __forceinline__ void cluster_arrive() { TIDAL_SM90_ASM("barrier.cluster.arrive.release.aligned"); }
__device__ __forceinline__ void cluster_wait() { TIDAL_SM90_ASM("barrier.cluster.wait.acquire.aligned"); }
// An arrival that orders no memory operation (a barrier that only tells that every CTA has started).
__device__ __forceinline__ void cluster_arrive_relaxed() { TIDAL_SM90_ASM("barrier.cluster.arrive.relaxed.aligned"); }
// Both halves at once; without clusters, the CTA's own barrier.
__device__ __forceinline__ void cluster_barrier() {
#if TIDAL_SM90
  cluster_arrive();
  cluster_wait();
#else
  __syncthreads();
#endif
}

// The same shared-memory object in CTA `rank` of this cluster.
template <typename T>
__device__ __forceinline__ T* cluster_peer(T* ptr, unsigned rank) {
#if TIDAL_SM90
  return cooperative_groups::this_cluster().map_shared_rank(ptr, rank);
#else
  return ptr;  // clusters of one CTA
#endif
}

// Selection row state: its valid length, the candidate range [c0, c1) between the forced sink and
// tail, and the free slots to fill from it.
struct TopkRow {
  int64_t L, c0, c1, free_slots;
  float* row0;  // head mode: the head's scores; group mode: the group's first row
  bool trivial; // every slot is decided without ranking (L <= top_k, or no free slot)
};

__device__ __forceinline__ TopkRow topk_row(const TopkParams& p, int64_t b, int64_t g) {
  TopkRow t;
  const int64_t G = p.Hq / p.Hsel;
  t.L = clamp_len(p.seq_lens, b, p.N);
  const int64_t tail = forced_tail(p.recent);
  t.c0 = p.sink;
  t.c1 = t.L - tail;
  t.free_slots = p.top_k - p.sink - tail;
  t.row0 = p.scores + (b * p.Hq + g * G) * p.ld;
  t.trivial = t.L <= p.top_k || t.free_slots <= 0;
  return t;
}

__device__ __forceinline__ uint32_t key_at(const uint4& k, int e) {
  return e == 0 ? k.x : (e == 1 ? k.y : (e == 2 ? k.z : k.w));
}

// A vector's 16 bytes are loaded and turned into keys in two steps, so that a thread issues all of
// a round's loads before the first conversion waits for its data.
// The 16 bytes of positions 4v .. 4v+3 (zero past v1).
__device__ __forceinline__ uint4 topk_raw4(const float* row, int v, int v1) {
  return v < v1 ? reinterpret_cast<const uint4*>(row)[v] : make_uint4(0u, 0u, 0u, 0u);
}
// Their 4 rank keys: group mode's are stored (pass A wrote them over the group's first row), head
// mode's are converted from the raw scores on every read.
__device__ __forceinline__ uint4 topk_keys_of(const uint4& raw, bool group) {
  if (group) return raw;
  return make_uint4(rank_key(__uint_as_float(raw.x)), rank_key(__uint_as_float(raw.y)),
                    rank_key(__uint_as_float(raw.z)), rank_key(__uint_as_float(raw.w)));
}
__device__ __forceinline__ uint4 topk_keys4(const float* row0, bool group, int v) {
  return topk_keys_of(reinterpret_cast<const uint4*>(row0)[v], group);
}

// Pass A's keys of the kU vectors vb + u * stride (zero past v1): head mode's from the raw scores,
// group mode's rank max over the group's heads of s_h - lse_h (NaN sticks), a head's kU loads at a
// time.
template <int kU>
__device__ __forceinline__ void topk_first_keys(const TopkParams& p, const TopkRow& row, int64_t b, int64_t g, int vb,
                                                int stride, int v1, uint4 (&k)[kU]) {
#pragma unroll
  for (int u = 0; u < kU; ++u) k[u] = topk_raw4(row.row0, vb + u * stride, v1);
  if (p.lse == nullptr) {
#pragma unroll
    for (int u = 0; u < kU; ++u) k[u] = topk_keys_of(k[u], false);
    return;
  }
  const int64_t G = p.Hq / p.Hsel;
  float best[kU][4];
  bool nan[kU][4];
  for (int64_t h = 0; h < G; ++h) {
    if (h > 0)
#pragma unroll
      for (int u = 0; u < kU; ++u) k[u] = topk_raw4(row.row0 + h * p.ld, vb + u * stride, v1);
    const float l = p.lse[b * p.Hq + g * G + h];
#pragma unroll
    for (int u = 0; u < kU; ++u)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const float x = __uint_as_float(key_at(k[u], e)) - l;
        nan[u][e] = (h > 0 && nan[u][e]) || x != x;
        best[u][e] = h > 0 ? fmaxf(best[u][e], x) : x;
      }
  }
#pragma unroll
  for (int u = 0; u < kU; ++u)
    k[u] = make_uint4(nan[u][0] ? 0xffffffffu : rank_key(best[u][0]), nan[u][1] ? 0xffffffffu : rank_key(best[u][1]),
                      nan[u][2] ? 0xffffffffu : rank_key(best[u][2]), nan[u][3] ? 0xffffffffu : rank_key(best[u][3]));
}

// The scores are dead once a top-k CTA has read its chunk: it drops their L2 lines, so they are never
// written back to DRAM, where the write-back would slow the next kernel's stream. `row0`: the row
// (group mode: the group's first row) whose chunk `rank` is dropped.
__device__ __forceinline__ void topk_drop_chunk(const TopkParams& p, float* row0, unsigned rank) {
  const bool whole_lines = reinterpret_cast<uintptr_t>(p.scores) % (kL2LineFloats * sizeof(float)) == 0 &&
                           p.ld % kL2LineFloats == 0 && p.chunk % kL2LineFloats == 0;
  if (!whole_lines) return;  // a line may hold scores another CTA still reads
  const int rows = p.lse != nullptr ? static_cast<int>(p.Hq / p.Hsel) : 1;
  const int begin = static_cast<int>(rank * p.chunk), end = static_cast<int>(min64(begin + p.chunk, p.ld));
  for (int h = 0; h < rows; ++h)
    for (int t = begin + threadIdx.x * kL2LineFloats; t < end; t += blockDim.x * kL2LineFloats)
      l2_discard(row0 + h * p.ld + t);
}

// Shared memory of the top-k kernel beyond its static part: two histograms (radix passes alternate
// between them, so a pass never clears one a peer may still be reading), the candidate list and
// the cluster's cut-bin keys (a region of kTopkBinCap / cluster a chunk).
constexpr size_t kTopkSmemBytes =
    2 * kTopkBins * sizeof(int) + kTopkListCap * sizeof(uint2) + kTopkBinCap * sizeof(uint32_t);
// The same, padded past half of an sm_90 SM's 228 KB: one CTA an SM (TopkParams::spread).
constexpr size_t kTopkSpreadSmemBytes = 120 * 1024;
static_assert(kTopkSmemBytes <= kTopkSpreadSmemBytes, "the padded size holds the top-k's shared memory");

// Adds 1 to bin `bin` for every active lane; lanes of a warp with the same bin add once together
// (score keys crowd into a few bins, and same-address shared atomics serialize). Whole warps call it.
__device__ __forceinline__ void warp_histogram_add(int* h, bool active, uint32_t bin) {
  const unsigned same = __match_any_sync(0xffffffffu, active ? bin : 0xffffffffu);
  if (active && (threadIdx.x & 31) == __ffs(same) - 1) atomicAdd(&h[bin], __popc(same));
}

// Block-wide ordered write of one round of kItems keys per thread (thread-major order = position
// order): keys above the cut, and keys equal to it while the row's tie budget lasts (lowest positions
// first). `written` and `eq_seen` carry over between rounds. Every thread of the block calls it.
// One scan counts both kinds (16 bits each): the equal keys lower threads take are the first
// min(their equal keys, budget), so each thread's offset follows from the two prefix sums.
template <int kBlock, int kItems, typename Scan>
__device__ __forceinline__ void topk_write_round(typename Scan::TempStorage& scan, const uint32_t (&k)[kItems],
                                                 const int32_t (&pos)[kItems], const bool (&ok)[kItems],
                                                 uint32_t cut, int64_t take_eq, int64_t& eq_seen,
                                                 int64_t& written, int32_t* out) {
  static_assert(kBlock * kItems < (1 << 16), "a round's counts fit 16 bits");
  int n_eq = 0, n_gt = 0;
#pragma unroll
  for (int i = 0; i < kItems; ++i) {
    n_eq += (ok[i] && k[i] == cut) ? 1 : 0;
    n_gt += (ok[i] && k[i] > cut) ? 1 : 0;
  }
  int before, total;
  Scan(scan).ExclusiveSum(n_gt | (n_eq << 16), before, total);
  __syncthreads();
  const int64_t budget = take_eq > eq_seen ? take_eq - eq_seen : 0;  // equal keys still to take
  const int64_t eq_rank = before >> 16, round_eq = total >> 16;
  int64_t eq_take = budget - eq_rank;
  eq_take = eq_take < 0 ? 0 : (eq_take > n_eq ? n_eq : eq_take);
  int64_t dst = written + (before & 0xffff) + min64(eq_rank, budget);
#pragma unroll
  for (int i = 0; i < kItems; ++i) {
    if (!ok[i]) continue;
    bool take = k[i] > cut;
    if (k[i] == cut && eq_take > 0) {
      take = true;
      --eq_take;
    }
    if (take) out[dst++] = pos[i];
  }
  written += (total & 0xffff) + min64(round_eq, budget);
  eq_seen += round_eq;
}

// Two CTAs an SM (registers <= 64 a thread): plan_topk's cluster sizes assume it.
template <int kBlock>
__global__ void __launch_bounds__(kBlock, 2) topk_kernel(const TopkParams p) {
  using Scan = cub::BlockScan<int, kBlock>;
  using Reduce = cub::BlockReduce<int, kBlock>;
  constexpr int kWarpsT = kBlock / 32;
  __shared__ union {
    typename Scan::TempStorage scan;
    typename Reduce::TempStorage reduce;
  } tmp;
  __shared__ int sh_digit, sh_above;
  __shared__ int sh_counts[2];  // this chunk's candidates above / equal to the cut (peers read them)
  __shared__ int sh_bin[2];     // this chunk's listed keys in / above pass A's cut bin
  __shared__ int sh_peer[2][kMaxCluster];  // the same of each chunk of the cluster (each CTA writes its own)
  constexpr int kWarpRanked = 32;           // the most keys left after pass B one warp ranks, one a lane
  __shared__ uint2 sh_cand[kWarpRanked];    // head mode: the cut-bin keys left after pass B (key, chunk)
  __shared__ int sh_ncand, sh_lower_gt;     // their number; the lower chunks' cut-bin keys above them
  __shared__ int sh_warp_bin[kWarpsT];      // head mode: a warp's listed keys in (low half-word) / above the cut bin
  extern __shared__ __align__(16) unsigned char topk_smem[];
  int* hist = reinterpret_cast<int*>(topk_smem);               // [2][kTopkBins]
  uint2* list = reinterpret_cast<uint2*>(hist + 2 * kTopkBins);  // [kTopkListCap] (key, position)
  uint32_t* cluster_bin = reinterpret_cast<uint32_t*>(list + kTopkListCap);  // [kTopkBinCap] (head mode)
#if !TIDAL_SM90
  if (p.cluster != 1) __trap();  // the host asks for clusters only where the code has them
#endif
  // Grid: x = selection head x cluster rank (clusters are consecutive x), y = batch row.
  const unsigned cs = static_cast<unsigned>(p.cluster), rank = blockIdx.x % cs;
  const int64_t g = blockIdx.x / cs, b = blockIdx.y;
  const int tid = threadIdx.x;
  const int warp = tid / 32, lane = tid % 32;
  const unsigned lower_lanes = (1u << lane) - 1;
  const TopkRow row = topk_row(p, b, g);
  int32_t* out = p.indices + (b * p.Hsel + g) * p.top_k;
  if (rank == 0) {  // the slots decided without ranking
    if (row.L <= p.top_k) {
      for (int64_t t = tid; t < p.top_k; t += kBlock) out[t] = t < row.L ? static_cast<int32_t>(t) : -1;
    } else {
      const int64_t tail = row.L - row.c1;
      for (int64_t t = tid; t < p.sink; t += kBlock) out[t] = static_cast<int32_t>(t);
      for (int64_t t = tid; t < tail; t += kBlock) out[p.top_k - tail + t] = static_cast<int32_t>(row.c1 + t);
    }
  }
  // The histograms the passes count into start at zero (head mode with the attention pass's digit
  // counts loads the first, after the wait).
  static_assert(kTopkBins % 4 == 0, "histograms are zeroed 16 bytes a store");
  for (int i = tid + (p.hist != nullptr ? kTopkBins / 4 : 0); i < 2 * kTopkBins / 4; i += kBlock)
    reinterpret_cast<int4*>(hist)[i] = make_int4(0, 0, 0, 0);
  // The set-up above (the row's length, the slots decided without ranking, the histograms) touches
  // nothing the attention pass writes, and the stream's kernels before select's first are done (that
  // kernel waited for them, as select's tile kernel, which reads the lengths early too, relies on):
  // the CTA does it before it waits for the attention pass, where it starts early.
  if (p.done_target > 0)
    wait_for_count(select_done_count(p.hist, p.B, p.Hq), static_cast<float>(p.done_target));
  else
    wait_for_previous_kernel();
  let_next_kernel_start();  // head mode's merge runs beside this kernel (merge_splits_kernel)
  if (row.trivial) {  // the whole cluster leaves together, before any cluster barrier
    topk_drop_chunk(p, row.row0, rank);
    return;
  }
  // Head mode's CTAs write into their peers' shared memory after listing. Where the attention pass
  // counted the first digits (p.hist), no cluster barrier comes before that: this one's wait (just
  // before the writes) makes sure every peer has started. Otherwise pass A's barrier does (a thread
  // must not arrive twice without waiting in between).
  const bool group = p.lse != nullptr;
  if (p.hist != nullptr) cluster_arrive_relaxed();

  // This CTA's candidates [lo, hi) and the 4-position vectors [v0, v1) covering them (N < 2^31).
  const int t0 = static_cast<int>(rank * p.chunk);
  const int lo = static_cast<int>(row.c0 > t0 ? row.c0 : t0), hi = static_cast<int>(min64(row.c1, t0 + p.chunk));
  const int v0 = lo / 4, v1 = lo < hi ? (hi + 3) / 4 : v0;
  if (p.hist == nullptr) __syncthreads();  // the zeroed histogram pass A counts into

  // Chooses the digit of pass `pass` from the histograms `h` of `peers` CTAs (the cluster's, or 1
  // where each CTA holds the row's) and narrows (prefix, mask, want); want = rank (1-based, from the
  // top) of the cut key among the keys matching the prefix.
  uint32_t prefix = 0, mask = 0;
  int64_t want = row.free_slots;
  constexpr int kPer = 4;  // bins per thread: one 16-byte load from each peer
  static_assert(kTopkBins == kPer * kBlock, "a thread scans kPer bins");
  const int bin0 = kTopkBins - kPer * (tid + 1);  // this thread's bins bin0 .. bin0 + 3, scanned top digit first
  // From this thread's counts (items[k]: bin bin0 + kPer - 1 - k). The keys in higher bins: a warp
  // scan, then the higher warps' sums (two block barriers in all; sh_digit and sh_warp_sum are
  // next written after the next pick's first barrier, when every thread has read them).
  __shared__ int sh_warp_sum[kWarpsT];
  auto pick_digit = [&](const int (&items)[kPer], int shift, uint32_t digit_mask) {
    const int own = items[0] + items[1] + items[2] + items[3];
    int incl = own;
#pragma unroll
    for (int d = 1; d < 32; d <<= 1) {
      const int y = __shfl_up_sync(0xffffffffu, incl, d);
      if (lane >= d) incl += y;
    }
    if (lane == 31) sh_warp_sum[warp] = incl;
    __syncthreads();
    const int warp_sum = lane < kWarpsT ? sh_warp_sum[lane] : 0;
    int above = __reduce_add_sync(0xffffffffu, lane < warp ? warp_sum : 0) + incl - own;
#pragma unroll
    for (int k = 0; k < kPer; ++k) {
      if (items[k] > 0 && above < want && above + items[k] >= want) {
        sh_digit = bin0 + kPer - 1 - k;
        sh_above = above;
      }
      above += items[k];
    }
    __syncthreads();
    prefix |= static_cast<uint32_t>(sh_digit) << shift;
    mask |= digit_mask << shift;
    want -= sh_above;
  };
  auto choose_digit = [&](const int* h, int shift, uint32_t digit_mask, unsigned peers) {
    if (peers > 1)
      cluster_barrier();  // every CTA's histogram is complete
    else
      __syncthreads();
    int items[kPer] = {};
#pragma unroll
    for (unsigned q = 0; q < kMaxCluster; ++q) {
      if (q >= peers) break;
      const int4 x = *reinterpret_cast<const int4*>((peers > 1 ? cluster_peer(h, q) : h) + bin0);
      items[0] += x.w, items[1] += x.z, items[2] += x.y, items[3] += x.x;
    }
    pick_digit(items, shift, digit_mask);
  };

  // Pass A: every key once from global memory (group mode: computed, then stored over the first row),
  // histogram of the top 11 bits. Head mode's histogram comes from the attention pass: every CTA
  // loads the row's and finds the first digit on its own (no cluster barrier), from registers.
  if (tid == 0) sh_bin[0] = sh_bin[1] = sh_ncand = sh_lower_gt = 0;  // counted into later (pick_digit syncs)
  if (p.hist != nullptr) {
    const float4 c = reinterpret_cast<const float4*>(p.hist + (b * p.Hsel + g) * kTopkBins)[bin0 / kPer];
    const int items[kPer] = {static_cast<int>(c.w), static_cast<int>(c.z), static_cast<int>(c.y),
                             static_cast<int>(c.x)};  // exact counts
    pick_digit(items, 21, 0x7ffu);
  } else {
    constexpr int kUnroll = 4;  // vector loads in flight per thread
    for (int vb = v0; vb < v1; vb += kUnroll * kBlock) {
      uint4 k[kUnroll];
      topk_first_keys<kUnroll>(p, row, b, g, vb + tid, kBlock, v1, k);
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int v = vb + u * kBlock + tid;
        if (group && v < v1) reinterpret_cast<uint4*>(row.row0)[v] = k[u];
        for (int e = 0; e < 4; ++e) {
          const int t = 4 * v + e;
          if (v < v1 && t >= lo && t < hi) atomicAdd(&hist[first_digit(key_at(k[u], e))], 1);
        }
      }
    }
    choose_digit(hist, 21, 0x7ffu, cs);
  }

  // The list: every key of this chunk at or above pass A's cut bin (all possible winners), in
  // position order. Warp w lists its own 1/kWarpsT of the chunk into its own segment (ballot
  // compaction, no block barrier), and later passes read each warp's segment where it lies.
  constexpr int kSegment = kTopkListCap / kWarpsT;
  const int per_warp = ((v1 - v0 + kWarpsT - 1) / kWarpsT + 31) / 32 * 32;  // vectors, whole rounds
  const int wv0 = v0 + warp * per_warp, wv1 = min(v1, wv0 + per_warp);
  int seg = 0;  // this warp's entries (may pass kSegment: overflow)
  const int region = kTopkBinCap / static_cast<int>(cs);  // cut-bin keys of a chunk in cluster_bin
  {
    // The hot loop, issue-bound: one compare per position. Head mode compares the raw scores with the
    // cut bin's lowest score (-inf or +inf where the bin lies past them: NaN is listed either way,
    // +inf extra where the cut is among NaNs, which later passes rank below it) and lists raw
    // scores, turned into keys right after; group mode's row holds keys. A position counts where
    // it lies in this warp's share of [lo, hi): one unsigned compare.
    const uint32_t floor_key = prefix;
    const float floor_score =
        floor_key <= 0x007fffffu   ? kNegInf
        : floor_key >= 0xff800000u ? -kNegInf
                                   : __uint_as_float(floor_key & 0x80000000u ? floor_key & 0x7fffffffu : ~floor_key);
    const int wlo = max(lo, 4 * wv0), span = max(min(hi, 4 * wv1) - wlo, 0);
    uint2* mine = list + warp * kSegment;
    const uint32_t mine_s = smem_u32(mine);
    uint4 next = topk_raw4(row.row0, wv0 + lane, wv1);
    for (int vb = wv0; vb < wv1; vb += 32) {
      const int v = vb + lane;
      const uint4 raw = next;  // the next round's bytes load while this one is listed
      next = topk_raw4(row.row0, vb + 32 + lane, wv1);
      // A listed position's slot: the round's listed positions of the lower lanes (one ballot an
      // element: no chain of shuffles), then its lane's lower elements.
      bool take[4];
      int at = seg;
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const uint32_t bits = key_at(raw, e);
        take[e] = static_cast<unsigned>(4 * v + e - wlo) < static_cast<unsigned>(span) &&
                  (group ? bits >= floor_key : !(__uint_as_float(bits) < floor_score));
        const unsigned listed = __ballot_sync(0xffffffffu, take[e]);
        at += __popc(listed & lower_lanes);
        seg += __popc(listed);
      }
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        if (take[e] && at < kSegment)
          st_shared(mine_s + 8 * at, make_uint2(key_at(raw, e), static_cast<uint32_t>(4 * v + e)));
        at += take[e] ? 1 : 0;
      }
    }
    // Head mode: the warp turns its entries into keys, stages those in the cut bin at the back of
    // its segment and counts them and those above it (no atomic a round), then writes the staged
    // keys into this chunk's region of every cluster CTA's `cluster_bin` (remote stores: no CTA
    // reads a peer's shared memory, where each read waits a round trip), before the block's
    // barrier (the warp waits for no other). Group mode's cut bin is wide: its keys are
    // log-probabilities.
    if (!group) {
      __syncwarp();
      const int n = min(seg, kSegment);  // an overflow spoils the counts: they go unused then
      // staged[-1 - j]: the warp's j-th cut-bin key, 32-bit words down from the segment's end; it
      // must not reach the n entries (2n words) above.
      uint32_t* staged = reinterpret_cast<uint32_t*>(mine + kSegment);
      int n_in = 0, n_above = 0;
      for (int base = 0; base < n; base += 32) {
        const int i = base + lane;
        uint32_t key = 0;
        if (i < n) {
          key = rank_key(__uint_as_float(mine[i].x));
          mine[i].x = key;
        }
        const unsigned in = __ballot_sync(0xffffffffu, i < n && (key & mask) == prefix);
        const int j = n_in + __popc(in & lower_lanes);
        if (((in >> lane) & 1) && 2 * n + j < 2 * kSegment) staged[-1 - j] = key;
        n_in += __popc(in);
        n_above += __popc(__ballot_sync(0xffffffffu, i < n && (key & mask) > prefix));
      }
      const bool staged_all = 2 * n + n_in <= 2 * kSegment;  // else the chunk's count spoils the sum
      int at = 0;
      if (lane == 0) {
        at = atomicAdd(&sh_bin[0], staged_all ? n_in : kTopkBinCap + 1);
        atomicAdd(&sh_bin[1], n_above);
        sh_warp_bin[warp] = n_in | n_above << 16;  // < 2^16 each
      }
      at = __shfl_sync(0xffffffffu, at, 0);
      if (p.hist != nullptr) cluster_wait();  // every peer has started (the arrival is long past)
      __syncwarp();
      if (staged_all)
        for (int j = lane; j < n_in && at + j < region; j += 32) {
          const uint32_t key = staged[-1 - j];
          for (unsigned q = 0; q < cs; ++q) cluster_peer(cluster_bin, q)[rank * region + at + j] = key;
        }
    }
  }
  const bool use_list = !__syncthreads_or(seg > kSegment);  // else (rare: many ties, a huge budget) re-scan the keys
  // The list stays in the warps' segments (each in position order, the warps in order): every
  // later pass over it reads the warp's own, and the ordered write needs one count per warp.
  const uint2* my_list = list + warp * kSegment;
  auto for_my_entries = [&](auto f) {
    for (int i = lane; i < seg; i += 32) f(my_list[i]);
  };
  // Head mode: the chunk's cut-bin keys are in its peers' regions; its counts go to their sh_peer
  // (an overflowed list or region spoils the sum).
  if (!group) {
    if (tid < static_cast<int>(cs)) {
      const int n = use_list && sh_bin[0] <= region ? sh_bin[0] : kTopkBinCap + 1;
      cluster_peer(&sh_peer[0][0], tid)[rank] = n;
      cluster_peer(&sh_peer[1][0], tid)[rank] = sh_bin[1];
    }
    cluster_arrive();
  }

  // Head mode's usual case: after one cluster barrier every CTA holds the cluster's cut-bin keys
  // (`cluster_bin`, a region a chunk) and the chunks' counts, ranks the keys on its own (pass B, then
  // one warp or pass C) and counts the lower chunks' winners from them: one cluster barrier where
  // passes B and C through the shared histograms and the count exchange take three. Where a chunk's
  // list or region overflows (and in group mode), the whole cluster goes that way instead.
  int n_bin = 0, lower_above = 0;  // the cluster's cut-bin keys; the lower chunks' keys above the bin
  bool gathered = false;
  if (!group) {
    cluster_wait();  // every chunk's cut-bin keys and counts are in place
    for (unsigned q = 0; q < cs; ++q) {
      if (q < rank) lower_above += sh_peer[1][q];
      n_bin += sh_peer[0][q];
    }
    gathered = n_bin <= kTopkBinCap;  // else passes B and C count into the cluster's second histograms,
                                      // which are still zero from the start
  }
  // Calls f(key, chunk) for the cut-bin keys of chunks [0, chunks), each once in the block.
  auto for_bin_keys = [&](unsigned chunks, auto f) {
    for (unsigned q = 0; q < chunks; ++q)
      for (int j = tid; j < sh_peer[0][q]; j += kBlock) f(cluster_bin[q * region + j], q);
  };

  int64_t written = p.sink, eq_seen = 0;  // this chunk's first output slot; lower chunks' cut keys
  if (gathered) {
    // Pass B (11 more bits) in this CTA's second histogram, zeroed at the start (no peer reads it).
    int* second = hist + kTopkBins;
    for_bin_keys(cs, [&](uint32_t key, unsigned) {
      if ((key & mask) == prefix) atomicAdd(&second[(key >> 10) & 0x7ffu], 1);
    });
    choose_digit(second, 10, 0x7ffu, 1);
    // Pass C: the cut-bin keys spread over pass B's 2048 bins, so few match the 22 bits chosen so
    // far. Up to kWarpRanked of them are collected (key, chunk) for one warp to rank; the lower
    // chunks' keys above those bits are counted on the way.
    int lower_gt = 0;
    for_bin_keys(cs, [&](uint32_t key, unsigned q) {
      if ((key & mask) == prefix) {
        const int at = atomicAdd(&sh_ncand, 1);
        if (at < kWarpRanked) sh_cand[at] = make_uint2(key, q);
      }
      lower_gt += q < rank && (key & mask) > prefix ? 1 : 0;
    });
    lower_gt = __reduce_add_sync(0xffffffffu, lower_gt);
    if (lane == 0 && lower_gt > 0) atomicAdd(&sh_lower_gt, lower_gt);
    __syncthreads();
    const int n_cand = sh_ncand;
    if (n_cand <= kWarpRanked) {
      // Every warp ranks them alike (no barrier after): lane i's key is the cut where fewer than
      // `want` keys lie above it and at least `want` at or above it.
      const bool valid = lane < n_cand;
      const uint2 c = valid ? sh_cand[lane] : make_uint2(0, 0);
      int gt = 0, ge = 0;
      for (int j = 0; j < n_cand; ++j) {
        const uint32_t other = __shfl_sync(0xffffffffu, c.x, j);
        gt += other > c.x ? 1 : 0;
        ge += other >= c.x ? 1 : 0;
      }
      const int src = __ffs(__ballot_sync(0xffffffffu, valid && gt < want && ge >= want)) - 1;
      const uint32_t cut = __shfl_sync(0xffffffffu, c.x, src);
      want -= __shfl_sync(0xffffffffu, gt, src);
      const bool lower = valid && c.y < rank;
      eq_seen = __popc(__ballot_sync(0xffffffffu, lower && c.x == cut));
      written += lower_above + sh_lower_gt + __popc(__ballot_sync(0xffffffffu, lower && c.x > cut)) +
                 min64(eq_seen, want);
      prefix = cut;
      mask = 0xffffffffu;
    } else {  // many equal keys: pass C by histogram, then the lower chunks' winners
      for (int i = tid; i < kTopkBins; i += kBlock) hist[i] = 0;
      __syncthreads();
      for_bin_keys(cs, [&](uint32_t key, unsigned) {
        if ((key & mask) == prefix) atomicAdd(&hist[key & 0x3ffu], 1);
      });
      choose_digit(hist, 0, 0x3ffu, 1);
      // Their keys above the bin, and their cut-bin keys above / at the cut, the at-cut ones taken
      // in chunk order while the tie budget `want` lasts. Counts < 2^16 (<= kTopkBinCap): above the
      // cut in the high half-word, at it in the low.
      int packed = 0;
      for_bin_keys(rank, [&](uint32_t key, unsigned) { packed += key > prefix ? 0x10000 : (key == prefix ? 1 : 0); });
      packed = Reduce(tmp.reduce).Sum(packed);
      if (tid == 0) sh_digit = packed;
      __syncthreads();
      packed = sh_digit;
      eq_seen = packed & 0xffff;
      written += lower_above + (packed >> 16) + min64(eq_seen, want);
    }
  } else {
    // Passes B and C (11 and 10 more bits) through the cluster's histograms, over the listed keys
    // matching the prefix (or all keys again, where the list overflowed).
    for (int pass = 1; pass < 3; ++pass) {
      const int shift = pass == 1 ? 10 : 0;
      const uint32_t digit_mask = pass == 1 ? 0x7ffu : 0x3ffu;
      int* h = hist + (pass & 1) * kTopkBins;
      if (pass == 2) {  // peers finished reading pass A's histogram before the last cluster barrier
        for (int i = tid; i < kTopkBins; i += kBlock) h[i] = 0;
        __syncthreads();
      }
      if (use_list) {
        for_my_entries([&](uint2 e) {
          if ((e.x & mask) == prefix) atomicAdd(&h[(e.x >> shift) & digit_mask], 1);
        });
      } else {
        for (int vb = v0; vb < v1; vb += kBlock) {
          const int v = vb + tid;
          const uint4 k = v < v1 ? topk_keys4(row.row0, group, v) : make_uint4(0, 0, 0, 0);
          for (int e = 0; e < 4; ++e) {
            const int t = 4 * v + e;
            const uint32_t key = key_at(k, e);
            warp_histogram_add(h, v < v1 && t >= lo && t < hi && (key & mask) == prefix,
                               (key >> shift) & digit_mask);
          }
        }
      }
      choose_digit(h, shift, digit_mask, cs);
    }
    // This chunk's winners above and at the cut (prefix, now whole), then its offset from the lower
    // chunks' counts.
    int n_gt = 0, n_eq = 0;
    if (use_list) {
      for_my_entries([&](uint2 e) {
        n_gt += e.x > prefix ? 1 : 0;
        n_eq += e.x == prefix ? 1 : 0;
      });
    } else {
      for (int v = v0 + tid; v < v1; v += kBlock) {
        const uint4 k = topk_keys4(row.row0, group, v);
        for (int e = 0; e < 4; ++e) {
          const int t = 4 * v + e;
          n_gt += (t >= lo && t < hi && key_at(k, e) > prefix) ? 1 : 0;
          n_eq += (t >= lo && t < hi && key_at(k, e) == prefix) ? 1 : 0;
        }
      }
    }
    const int gt_total = Reduce(tmp.reduce).Sum(n_gt);
    __syncthreads();
    const int eq_total = Reduce(tmp.reduce).Sum(n_eq);
    if (tid == 0) {
      sh_counts[0] = gt_total;
      sh_counts[1] = eq_total;
    }
    cluster_barrier();
    for (unsigned q = 0; q < rank; ++q) {
      const int* c = cluster_peer(sh_counts, q);
      const int64_t gt = c[0], eq = c[1];
      written += gt + min64(eq, want - eq_seen > 0 ? want - eq_seen : 0);
      eq_seen += eq;
    }
    cluster_arrive();  // no peer reads this CTA's shared memory after this
  }
  // The chunk's last read is long done. Its lines go only now: the cluster arrivals above order
  // this CTA's memory operations (a GPU-wide fence), and would wait for these.
  if (use_list) topk_drop_chunk(p, row.row0, rank);
  const uint32_t cut = prefix;
  const int64_t take_eq = want;  // keys equal to the cut to take, lowest positions first

  // The ordered write. From the list: each warp writes its segment's winners in order after the
  // lower warps' (one count a warp, one barrier). An entry equal to the cut is taken where fewer
  // than take_eq equal keys of the row lie before it; its slot counts those taken before it.
  if (use_list) {
    __shared__ int sh_warp_won[kWarpsT];  // a warp's entries above (low half-word) / at the cut
    static_assert(kWarpsT <= 32 && kTopkListCap < (1 << 16), "one lane a warp; sums fit 16 bits");
    // Gathered, the warp's entries above the cut are those above the cut bin (counted when the
    // keys were pushed) and its staged cut-bin keys above the cut: fewer to read than its segment.
    int won = 0;
    if (gathered) {
      const uint32_t* staged = reinterpret_cast<const uint32_t*>(my_list + kSegment);
      const int n_in = sh_warp_bin[warp] & 0xffff;
      won = lane == 0 ? sh_warp_bin[warp] >> 16 : 0;
      for (int j = lane; j < n_in; j += 32) {
        const uint32_t key = staged[-1 - j];
        won += key > cut ? 1 : (key == cut ? 0x10000 : 0);
      }
    } else {
      for_my_entries([&](uint2 e) { won += e.x > cut ? 1 : (e.x == cut ? 0x10000 : 0); });
    }
    won = __reduce_add_sync(0xffffffffu, won);
    if (lane == 0) sh_warp_won[warp] = won;
    __syncthreads();
    const int before = __reduce_add_sync(0xffffffffu, lane < warp ? sh_warp_won[lane] : 0);
    // 32-bit counts (all < top_k or N < 2^31) from `dst`: the chunk's first slot less the lower
    // chunks' equal keys taken (in `written` already).
    int32_t* const dst = out + written - min64(eq_seen, take_eq);
    const int take = static_cast<int>(take_eq);
    int gt_before = before & 0xffff, eq_before = static_cast<int>(eq_seen) + (before >> 16);  // eq: the row's
    for (int base = 0; base < seg; base += 32) {
      const int i = base + lane;
      const uint2 e = i < seg ? my_list[i] : make_uint2(0u, 0u);
      const bool gt = i < seg && e.x > cut, eq = i < seg && e.x == cut;
      const unsigned gts = __ballot_sync(0xffffffffu, gt), eqs = __ballot_sync(0xffffffffu, eq);
      const int eq_rank = eq_before + __popc(eqs & lower_lanes);
      if (gt || (eq && eq_rank < take))
        dst[gt_before + __popc(gts & lower_lanes) + min(eq_rank, take)] = static_cast<int32_t>(e.y);
      gt_before += __popc(gts);
      eq_before += __popc(eqs);
    }
  } else {  // re-scan: kItems positions a thread and round, a block scan each
    constexpr int kItems = 4;
    for (int vb = v0; vb < v1; vb += kBlock) {
      const int v = vb + tid;
      const uint4 x = v < v1 ? topk_keys4(row.row0, group, v) : make_uint4(0, 0, 0, 0);
      uint32_t k[kItems];
      int32_t pos[kItems];
      bool ok[kItems];
#pragma unroll
      for (int i = 0; i < kItems; ++i) {
        k[i] = key_at(x, i);
        pos[i] = 4 * v + i;
        ok[i] = v < v1 && pos[i] >= lo && pos[i] < hi;
      }
      topk_write_round<kBlock, kItems, Scan>(tmp.scan, k, pos, ok, cut, take_eq, eq_seen, written, out);
    }
  }
  if (!use_list) {
    __syncthreads();  // every thread's last read of the chunk (the re-scan) is done
    topk_drop_chunk(p, row.row0, rank);
  }
  if (!gathered) cluster_wait();  // the peers are done with this CTA's shared memory
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
