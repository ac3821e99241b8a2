// The floor of bench_ops.py's 32-layer attention step at B = 1: the same step with each layer's op
// replaced by a kernel that only reads what the layer must read, timed as one CUDA graph. Layers 0,
// 1, 2 and 13 (decode and select) stream their whole K/V cache (floor_kernels.cuh's stream_ldg,
// 4 CTAs an SM, stream_floor.cu's fastest read at 1x32K); the other 28 read the rows the last
// select layer listed (gather_rows, one item a lane, 256 threads: gather_floor.cu's fastest). No
// softmax, no top-k, no split merge: the fastest reads we have of what the step must read, and
// bench_ops.py divides 32 x cuDNN's step by it (step_floor_bound).
//
// Each layer reads a cache of its own, as in a model (so no layer finds the rows it reads in L2).
// Variants: launches are plain (a layer starts when the one before ends) or early (each kernel is
// resident behind the one before and starts reading the moment it ends, as the ops' kernels within
// one op do). Rows with "layers": "sparse" time the 28 sparse layers' reads alone (the step without
// its dense layers). Rows with "merge": true put floor_kernels.cuh's merge_partials behind every
// layer whose rows are split over CTAs (32 rows of kMergeSplits partial states each): the floor of
// a step whose layers merge their splits in a kernel of their own, as the ops do (still no softmax,
// no top-k). Rows with "sparse": "row" (head mode) read each sparse layer's rows the one way that
// needs no combine: one 1024-thread CTA an index row (split_floor.cu's fastest such design), so
// with "merge": true only the dense layers get a merge. Index rows: head mode 32 rows (4 per KV
// head), group mode 8, each top_k distinct random positions, sorted, one set per select layer.
//
//   nvcc -O3 -std=c++17 -gencode=arch=compute_90a,code=sm_90a -o /tmp/step_floor benchmarks/step_floor.cu
//   /tmp/step_floor [N=32768] [top_k=2048] > step_floor.json   (a one-line summary goes to stderr)
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <vector>

#include "floor_kernels.cuh"

constexpr int kLayers = 32, kHq = 32;
constexpr int kMergeSplits = 8;  // sparse_attention's splits at 1x32K, head mode
constexpr int kSelectLayers[] = {2, 13};  // bench_ops.py's TidalConfig(select_layers=(2, 13))

bool dense_layer(int l) { return l < 2 || l == kSelectLayers[0] || l == kSelectLayers[1]; }

int main(int argc, char** argv) {
  const int64_t N = argc > 1 ? atoll(argv[1]) : 32768;
  const int K = argc > 2 ? atoi(argv[2]) : 2048;
  const FloorSetup dev;

  const size_t cache_bytes = size_t(kHkv) * N * kRowBytes;  // one K (or V) cache, B = 1
  const LayerCaches caches(kLayers, cache_bytes);
  constexpr auto row_reads = split_rows<4, Combine::kPartials>;  // "sparse": "row": a CTA an index row
  const int row_smem = smem_for_ctas_per_sm(1);  // one such CTA an SM
  CHECK(cudaFuncSetAttribute(row_reads, cudaFuncAttributeMaxDynamicSharedMemorySize, row_smem));
  const std::vector<int4*>&k = caches.k, &v = caches.v;
  // idx[mode][s]: select layer s's index rows (mode 0 head: kHq rows, 1 group: kHkv rows).
  std::mt19937 rng(1234);
  int* idx[2][2];
  for (int mode = 0; mode < 2; ++mode)
    for (int s = 0; s < 2; ++s) idx[mode][s] = device_index_rows(rng, mode == 0 ? kHq : kHkv, N, K);

  float *part, *merged;  // merge_partials' input (zeros, in L2 as partials just written are) and output
  const size_t part_bytes = size_t(kHq) * kMergeSplits * (kD + 2) * sizeof(float);
  CHECK(cudaMalloc(&part, part_bytes));
  CHECK(cudaMemset(part, 0, part_bytes));
  CHECK(cudaMalloc(&merged, size_t(kHq) * kD * sizeof(float)));

  printf("{\"device\": \"%s\", \"date\": \"%s\", \"B\": 1, \"N\": %lld, \"top_k\": %d, \"layers\": %d, \"rows\": [\n",
         dev.prop.name, dev.date, (long long)N, K, kLayers);
  const int64_t vecs = cache_bytes / 16;
  bool first = true;
  float best[2][2] = {{1e30f, 1e30f}, {1e30f, 1e30f}};  // [merge][mode]
  for (int variant = 0; variant < 24; ++variant) {
    // bits: 0 sparse layers only, 1 early, 2 mode (0-15) or merge (16-23: head mode, a CTA a row)
    const bool row_design = variant >= 16;
    const int mode = row_design ? 0 : (variant >> 2) & 1;
    const int merge = row_design ? (variant >> 2) & 1 : (variant >> 3) & 1;
    const int early = (variant >> 1) & 1, only_sparse = variant & 1;
    const int sel = mode == 0 ? kHq : kHkv;
    const int64_t items = int64_t(sel) * K;
    const int gather_grid = gather_rows_grid(items, 1, 256);
    auto step = [&](int, cudaStream_t st) {
      for (int l = 0; l < kLayers; ++l) {
        const int* rows = idx[mode][l > kSelectLayers[1]];
        if (dense_layer(l) && only_sparse) continue;
        if (dense_layer(l))
          launch(stream_ldg, {4 * dev.sms, 256}, st, early, (const int4*)k[l], (const int4*)v[l], vecs, dev.sink);
        else if (row_design)
          launch(row_reads, {sel, 1024, row_smem}, st, early, (const int4*)k[l], (const int4*)v[l], rows, K, 1,
                 sel / kHkv, N, part, merged, nullptr, dev.sink);
        else
          launch(gather_rows<1>, {gather_grid, 256}, st, early, (const int4*)k[l], (const int4*)v[l], rows, items,
                 K, sel / kHkv, N, dev.sink);
        if (merge && (dense_layer(l) || !row_design))
          launch(merge_partials, {kHq, kD}, st, early, (const float*)part, kMergeSplits, merged);
      }
    };
    const float us = median_us(step, 1);
    if (!only_sparse) best[merge][mode] = std::min(best[merge][mode], us);
    printf("%s{\"mode\": \"%s\", \"sparse\": \"%s\", \"launch\": \"%s\", \"layers\": \"%s\", "
           "\"merge\": %s, \"us\": %.2f}",
           first ? "" : ",\n", mode == 0 ? "head" : "group", row_design ? "row" : "gather", early ? "early" : "plain",
           only_sparse ? "sparse" : "all", merge ? "true" : "false", us);
    first = false;
  }
  printf("\n]}\n");
  fprintf(stderr,
          "step floor (B 1, N %lld, top-k %d, 32 layers of pure reads): head %.1f us, group %.1f us; "
          "with the merges each design needs: head %.1f us, group %.1f us\n",
          (long long)N, K, best[0][0], best[0][1], best[1][0], best[1][1]);
  return 0;
}
