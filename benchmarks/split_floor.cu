// What combining a sparse layer's split rows costs on this card, beyond reading them: read-only
// kernels shaped as each design a sparse_attention kernel could take, timed as bench_ops.py's step
// sees its 28 sparse layers (one CUDA graph of 28 layers, each from a cache of its own, every kernel
// launched early behind the one before). Head mode at B = 1: 32 index rows (4 per KV head) of top_k
// random positions, bf16, Hkv = 8, D = 128. Designs (rows of the JSON):
//   gather        step_floor.cu's read: every index entry a 16-lane group, no structure at all
//   split         a CTA of 256 threads per index row and split, 8 splits, two CTAs an SM (the
//                 gather kernel's shape); each CTA stores a softmax-state-sized partial
//   split+merge   the same, then floor_kernels.cuh's merge_partials kernel (as the ops do)
//   cluster       a row's splits as one thread-block cluster: each CTA puts its state in the leader
//                 CTA's shared memory, one cluster barrier, the leader writes the row (no merge
//                 kernel); at 2, 3 or 4 CTAs an SM (set by shared memory) and 6 to 16 splits
//   row           one 1024-thread CTA per index row: no split, so nothing to combine
// No design computes anything: each bounds from below the kernels of its shape.
//
//   nvcc -O3 -std=c++17 -gencode=arch=compute_90a,code=sm_90a -o /tmp/split_floor benchmarks/split_floor.cu
//   /tmp/split_floor [N=32768] [top_k=2048] > split_floor.json   (a one-line summary goes to stderr)
#include <cooperative_groups.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <vector>

#include "floor_kernels.cuh"

constexpr int kLayers = 28, kHq = 32, kHeadsPerKv = kHq / kHkv;
constexpr int kState = kD + 2;  // a partial softmax state: [O (D floats), m, l]

// CTA (row, split) reads its row's entries [split * per, (split + 1) * per), per = K / splits: groups
// of 16 lanes, U entries a group in flight, the next entries' positions loaded before the rows are
// consumed. Then the CTA's state goes to `part` (kCluster false) or, through the cluster's leader
// CTA, into its output row of `out` (kCluster: the cluster is the row's splits).
template <int U, bool kCluster>
__global__ void split_rows(const int4* __restrict__ k, const int4* __restrict__ v, const int* __restrict__ idx,
                           int K, int splits, int64_t N, float* __restrict__ part, float* __restrict__ out,
                           unsigned* __restrict__ sink) {
  start_behind_previous_kernel();
  extern __shared__ float leader_states[];  // [splits][kState] (kCluster: used in the leader only)
  const int per = K / splits, row = blockIdx.x / splits, split = blockIdx.x % splits;
  const int* ix = idx + int64_t(row) * K + split * per;
  const int64_t base = int64_t(row / kHeadsPerKv) * N * kLanesPerRow;
  const int groups = blockDim.x / kLanesPerRow, g = threadIdx.x / kLanesPerRow, lane = threadIdx.x % kLanesPerRow;
  int pos[U];
#pragma unroll
  for (int u = 0; u < U; ++u) pos[u] = g + u * groups < per ? ix[g + u * groups] : -1;
  unsigned acc = 0;
  for (int e = 0; e < per; e += groups * U) {
    int4 kr[U], vr[U];
#pragma unroll
    for (int u = 0; u < U; ++u)
      if (pos[u] >= 0) {
        kr[u] = __ldcs(k + base + int64_t(pos[u]) * kLanesPerRow + lane);
        vr[u] = __ldcs(v + base + int64_t(pos[u]) * kLanesPerRow + lane);
      }
#pragma unroll
    for (int u = 0; u < U; ++u) {  // the next position's load goes out before this row is waited for
      const int next = e + groups * U + g + u * groups, cur = pos[u];
      pos[u] = next < per ? ix[next] : -1;
      if (cur >= 0) acc ^= kr[u].x ^ vr[u].w;
    }
  }
  const float x = float(acc & 7u);  // a stand-in for the CTA's state, kept alive by the loads
  if constexpr (kCluster) {
    namespace cg = cooperative_groups;
    const cg::cluster_group cluster = cg::this_cluster();
    float* leader = cluster.map_shared_rank(leader_states, 0);
    if (threadIdx.x < kState) leader[cluster.block_rank() * kState + threadIdx.x] = x + threadIdx.x;
    cluster.sync();
    if (cluster.block_rank() == 0 && threadIdx.x < kD)
      out[int64_t(row) * kD + threadIdx.x] = merge_element(leader_states, splits, kD, threadIdx.x);
  } else if (threadIdx.x < kState) {
    part[int64_t(blockIdx.x) * kState + threadIdx.x] = x;
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
  const int max_smem = 227 * 1024;
  CHECK(cudaFuncSetAttribute(split_rows<4, false>, cudaFuncAttributeMaxDynamicSharedMemorySize, max_smem));
  CHECK(cudaFuncSetAttribute(split_rows<4, true>, cudaFuncAttributeMaxDynamicSharedMemorySize, max_smem));
  CHECK(cudaFuncSetAttribute(split_rows<4, true>, cudaFuncAttributeNonPortableClusterSizeAllowed, 1));

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
  auto row = [&](const char* design, int splits, int per_sm, int cluster, int active, float us) {
    printf("%s{\"design\": \"%s\", \"splits\": %d, \"ctas_per_sm\": %d, \"cluster\": %d, "
           "\"clusters_at_once\": %d, \"us\": %.2f}", first ? "" : ",\n", design, splits, per_sm, cluster, active, us);
    first = false;
  };

  const int64_t items = int64_t(kHq) * K;
  const int gather_grid = gather_rows_grid(items, 1, 256);
  const float gather = layer_us([&](int l, cudaStream_t st) {
    launch(gather_rows<1>, {gather_grid, 256}, st, true, (const int4*)k[l], (const int4*)v[l], set(l), items, K,
           kHeadsPerKv, N, dev.sink);
  });
  row("gather", 0, 0, 0, 0, gather);

  // Shared memory that holds `per_sm` 256-thread CTAs an SM (and no more).
  auto smem_for = [](int per_sm) { return per_sm == 2 ? 100 * 1024 : per_sm == 3 ? 70 * 1024 : 52 * 1024; };
  auto split = [&](int splits, int per_sm, bool merge) {
    return layer_us([&](int l, cudaStream_t st) {
      launch(split_rows<4, false>, {kHq * splits, 256, smem_for(per_sm)}, st, true, (const int4*)k[l],
             (const int4*)v[l], set(l), K, splits, N, part, out, dev.sink);
      if (merge) launch(merge_partials, {kHq, kD}, st, true, (const float*)part, splits, out);
    });
  };
  const float split_only = split(8, 2, false), split_merge = split(8, 2, true);
  row("split", 8, 2, 0, 0, split_only);
  row("split+merge", 8, 2, 0, 0, split_merge);

  float best_cluster = 1e30f;
  const int cluster_shapes[][2] = {{8, 2}, {6, 2}, {8, 3}, {16, 4}};  // {splits, CTAs an SM}
  for (const auto& c : cluster_shapes) {
    const int splits = c[0], per_sm = c[1];
    const LaunchShape shape = {kHq * splits, 256, smem_for(per_sm), splits};
    const LaunchConfig config(shape, nullptr, false);
    int active = 0;  // clusters of this shape the card runs at once (under 32: the rows take two waves)
    CHECK(cudaOccupancyMaxActiveClusters(&active, split_rows<4, true>, &config.cfg));
    const float us = layer_us([&](int l, cudaStream_t st) {
      launch(split_rows<4, true>, shape, st, true, (const int4*)k[l], (const int4*)v[l], set(l), K, splits, N,
             part, out, dev.sink);
    });
    best_cluster = std::min(best_cluster, us);
    row("cluster", splits, per_sm, splits, active, us);
  }

  // One CTA an SM: its shared memory leaves room for no second one.
  const float one_cta = layer_us([&](int l, cudaStream_t st) {
    launch(split_rows<4, false>, {kHq, 1024, 120 * 1024}, st, true, (const int4*)k[l], (const int4*)v[l],
           set(l), K, 1, N, part, out, dev.sink);
  });
  row("row", 1, 1, 0, 0, one_cta);
  printf("\n]}\n");
  fprintf(stderr,
          "split floor (B 1, N %lld, top-k %d, head mode, us a sparse layer): reads %.2f, split %.2f, "
          "split+merge %.2f, best cluster %.2f, a CTA a row %.2f\n",
          (long long)N, K, gather, split_only, split_merge, best_cluster, one_cta);
  return 0;
}
