// How fast this card streams a K/V cache into shared memory the way decode_attention's tile kernel
// does, with no attention math: the ceiling of that kernel's loads, against other ways to load.
// bench_ops.py's floor divides bytes by copy bandwidth; cuDNN's decode reads faster than a copy.
//
// Shapes as bench_ops.py: bf16, Hkv = 8, D = 128 (256-byte rows), B x N. Variants:
//   rows   a thread per K or V row of a tile, one 256-byte bulk copy each into padded rows (the
//          tile kernel's loads), 3 stages, tiles of 128 (or 64) rows
//   tile   one bulk copy per K tile and per V tile (unpadded rows), 3 stages
//   ldg    plain 16-byte loads from many CTAs (a read-only stream, no shared memory)
// CTAs: "plan" = the tile kernel's split plan (a whole number of splits per KV head, one wave);
// "bal" = one wave with the tiles spread evenly (ranges may cross KV heads).
//
//   nvcc -O3 -std=c++17 -Iinclude -gencode=arch=compute_90a,code=sm_90a -o /tmp/stream_floor benchmarks/stream_floor.cu
//   /tmp/stream_floor > stream.json   (a table goes to stderr)
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include "floor_kernels.cuh"
#include "tidal/kernels/cuda_attention.cuh"

constexpr int kStages = 3;

// The tile kernel's own copy and barrier helpers, so the loads measured are the kernel's.
using tidal::kernels::cuda::bulk_copy;
using tidal::kernels::cuda::l2_policy;
using tidal::kernels::cuda::mbar_arrive_expect_tx;
using tidal::kernels::cuda::mbar_init;
using tidal::kernels::cuda::mbar_wait;

// CTA i streams tiles [range[i].x, range[i].y) of kTile rows (K and V) through kStages stages.
// kWhole: one copy per K/V tile; else a thread per row (2 * kTile threads).
template <int kTile, bool kWhole>
__global__ void __launch_bounds__(2 * kTile) stream_tiles(const char* k, const char* v, const int2* range,
                                                          unsigned* sink) {
  constexpr int kPitch = kWhole ? kRowBytes : kRowBytes + 16;
  extern __shared__ __align__(128) unsigned char smem[];
  __shared__ __align__(8) uint64_t bar[kStages];
  const int tid = threadIdx.x, lane = tid & 31, warps = blockDim.x / 32;
  const int t0 = range[blockIdx.x].x, t1 = range[blockIdx.x].y;
  const uint64_t pol = l2_policy<false>();  // evict first, as the tile kernel's K/V loads
  if (tid == 0)
    for (int s = 0; s < kStages; ++s) mbar_init(&bar[s], kWhole ? 1 : warps);
  __syncthreads();
  auto load = [&](int tile, int stage) {
    unsigned char* sk = smem + size_t(stage) * 2 * kTile * kPitch;
    const size_t off = size_t(tile) * kTile * kRowBytes;
    if (kWhole) {
      if (tid == 0) {
        mbar_arrive_expect_tx(&bar[stage], 2 * kTile * kRowBytes);
        bulk_copy(sk, k + off, kTile * kRowBytes, &bar[stage], pol);
        bulk_copy(sk + kTile * kPitch, v + off, kTile * kRowBytes, &bar[stage], pol);
      }
    } else {
      const int r = tid % kTile;
      const bool is_v = tid >= kTile;
      if (lane == 0) mbar_arrive_expect_tx(&bar[stage], 32 * kRowBytes);
      __syncwarp();
      bulk_copy(sk + (is_v ? kTile * kPitch : 0) + r * kPitch, (is_v ? v : k) + off + size_t(r) * kRowBytes,
                kRowBytes, &bar[stage], pol);
    }
  };
  const int n = t1 - t0;
  for (int s = 0; s < kStages - 1; ++s)
    if (s < n) load(t0 + s, s);
  unsigned acc = 0;
  for (int t = 0; t < n; ++t) {
    const int stage = t % kStages;
    mbar_wait(&bar[stage], (t / kStages) & 1);
    acc ^= reinterpret_cast<const unsigned*>(smem + size_t(stage) * 2 * kTile * kPitch)[tid];
    __syncthreads();
    if (t + kStages - 1 < n) load(t0 + t + kStages - 1, (t + kStages - 1) % kStages);
  }
  if (acc == 0x12345678u) sink[0] = acc;
}

int main() {
  const FloorSetup dev;
  const int sms = dev.sms;
  unsigned* sink = dev.sink;
  const int shapes[][2] = {{1, 32768}, {1, 131072}, {8, 32768}, {4, 131072}};
  constexpr int kRot = 3;
  printf("{\"device\": \"%s\", \"date\": \"%s\", \"sms\": %d, \"rows\": [\n", dev.prop.name, dev.date, sms);
  std::string summary = "stream floor (TB/s, 128-row tiles, plan: rows / tile / ldg):";
  bool first = true;
  for (auto& sh : shapes) {
    const int B = sh[0], N = sh[1];
    const size_t rows = size_t(B) * kHkv * N, bytes = rows * kRowBytes;
    char *k[kRot], *v[kRot];
    for (int r = 0; r < kRot; ++r) {
      CHECK(cudaMalloc(&k[r], bytes));
      CHECK(cudaMalloc(&v[r], bytes));
      CHECK(cudaMemset(k[r], 1, bytes));
      CHECK(cudaMemset(v[r], 2, bytes));
    }
    summary += " " + std::to_string(B) + "x" + std::to_string(N / 1024) + "K";
    auto report = [&](const char* variant, const char* ctas_kind, int tile, int ctas, float us) {
      const double tbps = 2.0 * bytes / (us * 1e-6) / 1e12;
      if ((tile == 128 && ctas_kind[0] == 'p') || (tile == 0 && ctas == 4 * sms)) {
        char part[16];
        snprintf(part, sizeof part, "%s%.2f", tile == 0 || variant[0] == 't' ? "/" : " ", tbps);
        summary += part;
      }
      printf("%s{\"B\": %d, \"N\": %d, \"variant\": \"%s\", \"ctas\": \"%s\", \"tile\": %d, \"grid\": %d, \"us\": %.2f, "
             "\"read_tbps\": %.3f}",
             first ? "" : ",\n", B, N, variant, ctas_kind, tile, ctas, us, tbps);
      first = false;
      fprintf(stderr, "%dx%dK %-5s %-4s tile %3d grid %4d: %8.2f us  %.3f TB/s\n", B, N / 1024, variant, ctas_kind, tile,
              ctas, us, tbps);
    };
    auto run_tiles = [&](auto kernel, int tile, bool whole, const char* name) {
      const int pitch = whole ? kRowBytes : kRowBytes + 16;
      const int smem_bytes = kStages * 2 * tile * pitch;
      CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem_bytes));
      int per_sm;
      CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, 2 * tile, smem_bytes));
      const int wave = per_sm * sms;
      const int tiles_per_head = N / tile, heads = B * kHkv, total = heads * tiles_per_head;
      for (int bal = 0; bal < 2; ++bal) {
        std::vector<int2> ranges;
        if (bal) {
          for (int i = 0; i < wave; ++i)
            ranges.push_back(make_int2(int(int64_t(total) * i / wave), int(int64_t(total) * (i + 1) / wave)));
        } else {  // plan_splits: whole splits per KV head, one wave
          int splits = std::max(1, std::min(tiles_per_head, wave / heads));
          const int per = (tiles_per_head + splits - 1) / splits;
          splits = (tiles_per_head + per - 1) / per;
          for (int h = 0; h < heads; ++h)
            for (int s = 0; s < splits; ++s)
              ranges.push_back(make_int2(h * tiles_per_head + s * per,
                                         h * tiles_per_head + std::min(tiles_per_head, (s + 1) * per)));
        }
        int2* d_ranges;
        CHECK(cudaMalloc(&d_ranges, ranges.size() * sizeof(int2)));
        CHECK(cudaMemcpy(d_ranges, ranges.data(), ranges.size() * sizeof(int2), cudaMemcpyHostToDevice));
        const int grid = int(ranges.size());
        const float us = median_us(
            [&](int r, cudaStream_t st) { kernel<<<grid, 2 * tile, smem_bytes, st>>>(k[r], v[r], d_ranges, sink); }, kRot);
        report(name, bal ? "bal" : "plan", tile, grid, us);
        CHECK(cudaFree(d_ranges));
      }
    };
    run_tiles(stream_tiles<128, false>, 128, false, "rows");
    run_tiles(stream_tiles<64, false>, 64, false, "rows");
    run_tiles(stream_tiles<128, true>, 128, true, "tile");
    run_tiles(stream_tiles<64, true>, 64, true, "tile");
    for (int per_sm : {4, 8}) {
      const int grid = per_sm * sms;
      const float us = median_us(
          [&](int r, cudaStream_t st) {
            stream_ldg<<<grid, 256, 0, st>>>(reinterpret_cast<const int4*>(k[r]), reinterpret_cast<const int4*>(v[r]),
                                      int64_t(bytes / 16), sink);
          },
          kRot);
      report("ldg", "bal", 0, grid, us);
    }
    for (int r = 0; r < kRot; ++r) {
      CHECK(cudaFree(k[r]));
      CHECK(cudaFree(v[r]));
    }
  }
  printf("\n]}\n");
  fprintf(stderr, "%s\n", summary.c_str());
  return 0;
}
