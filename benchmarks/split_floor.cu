// What combining a sparse layer's split rows costs on this card, beyond reading them: read-only
// kernels shaped as each design a sparse_attention kernel could take, timed as bench_ops.py's step
// sees its 28 sparse layers (one CUDA graph of 28 layers, each from a cache of its own, every kernel
// launched early behind the one before). Head mode at B = 1: 32 index rows (4 per KV head) of top_k
// random positions, bf16, Hkv = 8, D = 128. Designs (rows of the JSON):
//   gather        step_floor.cu's read: every index entry a 16-lane group, no structure at all
//   split         a CTA of 256 threads per index row and split, 8 splits, two CTAs an SM (the
//                 gather kernel's shape); each CTA stores a softmax-state-sized partial
//   split+merge   the same, then floor_kernels.cuh's merge_partials kernel (as the ops do)
//   split+last    the same, the last CTA of a row to arrive (an atomic count) merging it
//   cluster       a row's splits as one thread-block cluster: each CTA puts its state in the leader
//                 CTA's shared memory, one cluster barrier, the leader writes the row (no merge
//                 kernel); 2 to 16 splits of 256 to 1024 threads, 1 to 4 CTAs an SM (set by shared
//                 memory)
//   row           one 1024-thread CTA per index row: no split, so nothing to combine; the rows
//                 loaded into registers (16 bytes a lane, 4 rows a 16-lane group in flight)
//   row-staged    the same CTAs with the rows landing in shared memory instead (cp.async, 16 bytes
//                 a lane, a ring of 4 stages of 64 K and V rows), as a kernel feeding tensor-core
//                 MMAs from shared memory would load them
// No design computes anything: each bounds from below the kernels of its shape.
//
//   nvcc -O3 -std=c++17 -Iinclude -gencode=arch=compute_90a,code=sm_90a -o /tmp/split_floor benchmarks/split_floor.cu
//   /tmp/split_floor [N=32768] [top_k=2048] > split_floor.json   (a one-line summary goes to stderr)
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <vector>

#include "floor_kernels.cuh"
#include "tidal/kernels/cuda_attention.cuh"

// The tile kernel's own cp.async helpers (its sm_80 loads).
using tidal::kernels::cuda::cp_async_16;
using tidal::kernels::cuda::cp_async_commit;
using tidal::kernels::cuda::cp_async_wait;

constexpr int kLayers = 28, kHq = 32, kHeadsPerKv = kHq / kHkv;
constexpr int kStages = 4;  // row-staged's ring

// row-staged: CTA `row` copies its index row's positions into shared memory, then each 16-lane group
// moves its rows' K and V pieces (16 bytes a lane) into its slots of a kStages-deep ring by cp.async,
// one commit group a stage, and reads each piece back once its group has landed. A lane reads only
// the pieces it copied itself, so no barrier is needed between stages.
__global__ void __launch_bounds__(1024) staged_rows(const int4* __restrict__ k, const int4* __restrict__ v,
                                                    const int* __restrict__ idx, int K, int64_t N,
                                                    unsigned* __restrict__ sink) {
  start_behind_previous_kernel();
  extern __shared__ int4 ring[];  // [kStages][blockDim.x][K piece, V piece], then the K positions
  int* positions = reinterpret_cast<int*>(ring + kStages * blockDim.x * 2);
  const int row = blockIdx.x;
  for (int i = threadIdx.x; i < K; i += blockDim.x) positions[i] = idx[int64_t(row) * K + i];
  __syncthreads();
  const int64_t base = int64_t(row / kHeadsPerKv) * N * kLanesPerRow;
  const int groups = blockDim.x / kLanesPerRow, g = threadIdx.x / kLanesPerRow, lane = threadIdx.x % kLanesPerRow;
  const int stages = (K + groups - 1) / groups;
  auto issue = [&](int s) {  // stage s: entry s * groups + g of the row, into ring slot s % kStages
    const int e = s * groups + g;
    int4* slot = ring + ((s % kStages) * blockDim.x + threadIdx.x) * 2;
    if (s < stages && e < K) {
      const int64_t at = base + int64_t(positions[e]) * kLanesPerRow + lane;
      cp_async_16(slot, k + at, true);
      cp_async_16(slot + 1, v + at, true);
    }
    cp_async_commit();
  };
  for (int s = 0; s < kStages - 1; ++s) issue(s);
  unsigned acc = 0;
  for (int s = 0; s < stages; ++s) {
    cp_async_wait<kStages - 2>();
    const int4* slot = ring + ((s % kStages) * blockDim.x + threadIdx.x) * 2;
    acc ^= slot[0].x ^ slot[1].w;
    issue(s + kStages - 1);
  }
  if (acc == 0x9e3779b9u) sink[0] = acc;
}

int main(int argc, char** argv) {
  const int64_t N = argc > 1 ? atoll(argv[1]) : 32768;
  const int K = argc > 2 ? atoi(argv[2]) : 2048;
  const FloorSetup dev;
  const size_t cache_bytes = size_t(kHkv) * N * kRowBytes;
  const LayerCaches caches(kLayers, cache_bytes);
  const std::vector<int4*>&k = caches.k, &v = caches.v;
  // Two index sets, one per select layer (bench_ops' step: layers 3-12 use layer 2's, the rest 13's).
  std::mt19937 rng(1234);
  int* idx[2] = {device_index_rows(rng, kHq, N, K), device_index_rows(rng, kHq, N, K)};
  constexpr int kMaxSplits = 16;
  float *part, *out;
  CHECK(cudaMalloc(&part, size_t(kHq) * kMaxSplits * kState * sizeof(float)));
  CHECK(cudaMemset(part, 0, size_t(kHq) * kMaxSplits * kState * sizeof(float)));
  CHECK(cudaMalloc(&out, size_t(kHq) * kD * sizeof(float)));
  const int max_smem = 200 * 1024;  // the most smem_for_ctas_per_sm() asks, with room for static smem
  constexpr auto partials = split_rows<4, Combine::kPartials>, clustered = split_rows<4, Combine::kCluster>,
                 last_cta = split_rows<4, Combine::kLastCta>;
  for (auto kernel : {partials, clustered, last_cta})
    CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, max_smem));
  CHECK(cudaFuncSetAttribute(clustered, cudaFuncAttributeNonPortableClusterSizeAllowed, 1));
  unsigned* arrivals;  // split+last's count a row: zero between calls (the last CTA of a row resets it)
  CHECK(cudaMalloc(&arrivals, kHq * sizeof(unsigned)));
  CHECK(cudaMemset(arrivals, 0, kHq * sizeof(unsigned)));

  // us a layer: the fastest of three graphs' medians, over 28 layers.
  auto layer_us = [&](auto one_layer) {
    float best = 1e30f;
    for (int r = 0; r < 3; ++r)
      best = std::min(best, median_us([&](int, cudaStream_t st) {
               for (int l = 0; l < kLayers; ++l) one_layer(l, st);
             }, 1));
    return best / kLayers;
  };
  auto set = [&](int l) -> const int* { return idx[l >= 10]; };
  printf("{\"device\": \"%s\", \"date\": \"%s\", \"B\": 1, \"N\": %lld, \"top_k\": %d, \"mode\": \"head\", "
         "\"layers\": %d, \"rows\": [\n", dev.prop.name, dev.date, (long long)N, K, kLayers);
  bool first = true;
  auto row = [&](const char* design, int splits, int threads, int per_sm, int cluster, int active, float us) {
    printf("%s{\"design\": \"%s\", \"splits\": %d, \"threads\": %d, \"ctas_per_sm\": %d, \"cluster\": %d, "
           "\"clusters_at_once\": %d, \"us\": %.2f}",
           first ? "" : ",\n", design, splits, threads, per_sm, cluster, active, us);
    first = false;
  };

  const int64_t items = int64_t(kHq) * K;
  const int gather_grid = gather_rows_grid(items, 1, 256);
  const float gather = layer_us([&](int l, cudaStream_t st) {
    launch(gather_rows<1>, {gather_grid, 256}, st, true, (const int4*)k[l], (const int4*)v[l], set(l), items, K,
           kHeadsPerKv, N, dev.sink);
  });
  row("gather", 0, 256, 0, 0, 0, gather);

  auto split = [&](int splits, int threads, int per_sm, bool last, bool merge) {
    return layer_us([&](int l, cudaStream_t st) {
      launch(last ? last_cta : partials, {kHq * splits, threads, smem_for_ctas_per_sm(per_sm)}, st, true,
             (const int4*)k[l], (const int4*)v[l], set(l), K, splits, kHeadsPerKv, N, part, out, arrivals, dev.sink);
      if (merge) launch(merge_partials, {kHq, kD}, st, true, (const float*)part, splits, out);
    });
  };
  const float split_only = split(8, 256, 2, false, false), split_merge = split(8, 256, 2, false, true);
  const float split_last = split(8, 256, 2, true, false);
  row("split", 8, 256, 2, 0, 0, split_only);
  row("split+merge", 8, 256, 2, 0, 0, split_merge);
  row("split+last", 8, 256, 2, 0, 0, split_last);

  float best_cluster = 1e30f;
  const int cluster_shapes[][3] = {  // {splits, threads, CTAs an SM}
      {8, 256, 2}, {6, 256, 2}, {8, 256, 3}, {16, 256, 4}, {2, 1024, 1}, {3, 1024, 1}, {4, 1024, 1}, {4, 512, 2}};
  for (const auto& c : cluster_shapes) {
    const int splits = c[0], threads = c[1], per_sm = c[2];
    const LaunchShape shape = {kHq * splits, threads, smem_for_ctas_per_sm(per_sm), splits};
    const LaunchConfig config(shape, nullptr, false);
    int active = 0;  // clusters of this shape the card runs at once (under 32: the rows take two waves)
    CHECK(cudaOccupancyMaxActiveClusters(&active, clustered, &config.cfg));
    const float us = layer_us([&](int l, cudaStream_t st) {
      launch(clustered, shape, st, true, (const int4*)k[l], (const int4*)v[l], set(l), K, splits, kHeadsPerKv, N,
             part, out, arrivals, dev.sink);
    });
    best_cluster = std::min(best_cluster, us);
    row("cluster", splits, threads, per_sm, splits, active, us);
  }

  // One CTA a row (one an SM: 32 CTAs on 32 SMs).
  const float one_cta = split(1, 1024, 1, false, false);
  row("row", 1, 1024, 1, 0, 0, one_cta);
  const int staged_smem = kStages * 1024 * 2 * 16 + K * 4;
  CHECK(cudaFuncSetAttribute(staged_rows, cudaFuncAttributeMaxDynamicSharedMemorySize, staged_smem));
  const float staged = layer_us([&](int l, cudaStream_t st) {
    launch(staged_rows, {kHq, 1024, staged_smem}, st, true, (const int4*)k[l], (const int4*)v[l], set(l), K, N,
           dev.sink);
  });
  row("row-staged", 1, 1024, 1, 0, 0, staged);
  printf("\n]}\n");
  fprintf(stderr,
          "split floor (B 1, N %lld, top-k %d, head mode, us a sparse layer): reads %.2f, split %.2f, "
          "split+merge %.2f, split+last %.2f, best cluster %.2f, a CTA a row %.2f (rows staged in shared "
          "memory %.2f)\n",
          (long long)N, K, gather, split_only, split_merge, split_last, best_cluster, one_cta, staged);
  return 0;
}
