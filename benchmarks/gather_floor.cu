// The practical floor of sparse_attention's reads: how fast this card reads the K and V rows an
// index set names, when reading them is all a kernel does (no attention math, every load issued as
// early as the hardware allows). bench_ops.py's floor divides bytes by copy bandwidth; random
// 256-byte rows do not stream like a copy, and this measures by how much.
//
// Shapes as bench_ops.py: bf16, Hkv = 8, D = 128 (256-byte rows), N positions, K indices per row,
// head mode (32 index rows, 4 per KV head) and group mode (8 index rows). Each index row holds K
// distinct random positions, sorted (as select_attention writes them). "head-union": head mode's
// reads with each KV head's repeats read once (the union of its 4 heads' random rows, 9% smaller at
// N = 32K), the floor of a gather that loads each distinct row of a KV head once. Cache/index sets
// rotate so L2 cannot serve a repeat (twice its size is read in between).
//
//   nvcc -O3 -std=c++17 -gencode=arch=compute_90a,code=sm_90a -o /tmp/gather_floor benchmarks/gather_floor.cu
//   /tmp/gather_floor [N=131072] [K=2048] > gather.json   (a one-line summary goes to stderr)
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <vector>

#include "floor_kernels.cuh"

constexpr int kHeadsPerKv = 4;  // head mode: 32 index rows, 4 per KV head

struct Set {
  int4 *k, *v;
  int* idx;
};

template <int U>
float time_us(const std::vector<Set>& sets, int64_t items, int K, int sel_per_kv, int64_t N, int block,
              unsigned* sink) {
  const int grid = gather_rows_grid(items, U, block);
  auto launch = [&](const Set& s) {
    gather_rows<U><<<grid, block>>>(s.k, s.v, s.idx, items, K, sel_per_kv, N, sink);
  };
  for (int i = 0; i < 6; ++i) launch(sets[i % sets.size()]);
  CHECK(cudaGetLastError());
  cudaEvent_t a, b;
  CHECK(cudaEventCreate(&a));
  CHECK(cudaEventCreate(&b));
  std::vector<float> t;
  constexpr int kReps = 10;  // launches queue up faster than they run, so no launch gap is timed
  for (int r = 0; r < 11; ++r) {
    CHECK(cudaEventRecord(a));
    for (int rep = 0; rep < kReps; ++rep)
      for (size_t i = 0; i < sets.size(); ++i) launch(sets[i]);
    CHECK(cudaEventRecord(b));
    CHECK(cudaEventSynchronize(b));
    float ms = 0;
    CHECK(cudaEventElapsedTime(&ms, a, b));
    t.push_back(ms * 1e3f / (kReps * sets.size()));
  }
  CHECK(cudaGetLastError());
  std::sort(t.begin(), t.end());
  return t[t.size() / 2];
}

int main(int argc, char** argv) {
  const int64_t N = argc > 1 ? atoll(argv[1]) : 131072;
  const int K = argc > 2 ? atoi(argv[2]) : 2048;
  const FloorSetup dev;
  unsigned* sink = dev.sink;
  std::mt19937 rng(1234);
  // Cache/index sets rotated through: at least twice L2's size read between two launches on one set
  // (group mode reads the fewest rows, kHkv x K), so L2 cannot serve a repeat.
  const int64_t l2 = dev.prop.l2CacheSize, group_bytes = int64_t(kHkv) * K * 2 * kRowBytes;
  std::vector<Set> sets(std::max<int64_t>(3, (2 * l2 + group_bytes - 1) / group_bytes + 1));
  const size_t cache_bytes = size_t(kHkv) * N * kRowBytes;
  for (auto& s : sets) {
    CHECK(cudaMalloc(&s.k, cache_bytes));
    CHECK(cudaMalloc(&s.v, cache_bytes));
    CHECK(cudaMemset(s.k, 1, cache_bytes));
    CHECK(cudaMemset(s.v, 2, cache_bytes));
  }
  // copy bandwidth as bench_ops.py measures it: (read + write) bytes of a 1 GiB device copy
  float copy_tbps;
  {
    void *x, *y;
    const size_t n = size_t(1) << 30;
    CHECK(cudaMalloc(&x, n));
    CHECK(cudaMalloc(&y, n));
    cudaEvent_t a, b;
    CHECK(cudaEventCreate(&a));
    CHECK(cudaEventCreate(&b));
    std::vector<float> t;
    for (int r = 0; r < 25; ++r) {
      CHECK(cudaEventRecord(a));
      CHECK(cudaMemcpyAsync(y, x, n, cudaMemcpyDeviceToDevice));
      CHECK(cudaEventRecord(b));
      CHECK(cudaEventSynchronize(b));
      float ms;
      CHECK(cudaEventElapsedTime(&ms, a, b));
      if (r >= 5) t.push_back(ms);
    }
    std::sort(t.begin(), t.end());
    copy_tbps = 2.0f * n / (t[t.size() / 2] * 1e-3f) / 1e12f;
    CHECK(cudaFree(x));
    CHECK(cudaFree(y));
  }
  printf("{\"device\": \"%s\", \"date\": \"%s\", \"N\": %lld, \"K\": %d, \"copy_tbps\": %.3f, \"rows\": [\n", dev.prop.name, dev.date, (long long)N, K,
         copy_tbps);
  // The index sets: each a row length and sel rows (sel / kHkv per KV head; -1 pads a row).
  struct Layout {
    const char* pattern;
    const char* mode;
    int sel, len;
    std::vector<int> rows;
  };
  auto random_row = [&](int n) { return sorted_random_positions(rng, N, n); };
  std::vector<Layout> layouts;
  for (int sel : {kHkv * kHeadsPerKv, kHkv}) {  // head mode, group mode
    Layout l{"random", sel > kHkv ? "head" : "group", sel, K, {}};
    for (int r = 0; r < sel; ++r) {
      const std::vector<int> row = random_row(K);
      l.rows.insert(l.rows.end(), row.begin(), row.end());
    }
    layouts.push_back(l);
  }
  {  // head mode's reads with each KV head's repeats read once: the union of its 4 heads' random rows
    std::vector<std::vector<int>> unions;
    size_t len = 0;
    for (int g = 0; g < kHkv; ++g) {
      std::vector<int> u;
      for (int h = 0; h < kHeadsPerKv; ++h) {
        const std::vector<int> row = random_row(K);
        u.insert(u.end(), row.begin(), row.end());
      }
      std::sort(u.begin(), u.end());
      u.erase(std::unique(u.begin(), u.end()), u.end());
      len = std::max(len, u.size());
      unions.push_back(u);
    }
    Layout l{"random", "head-union", kHkv, static_cast<int>(len), {}};
    for (auto& u : unions) {
      u.resize(len, -1);
      l.rows.insert(l.rows.end(), u.begin(), u.end());
    }
    layouts.push_back(l);
  }
  for (int sel : {kHkv * kHeadsPerKv, kHkv}) {
    Layout l{"contiguous", sel > kHkv ? "head" : "group", sel, K, {}};
    for (int r = 0; r < sel; ++r)
      for (int j = 0; j < K; ++j) l.rows.push_back((r % (sel / kHkv)) * K + j);  // distinct rows per head
    layouts.push_back(l);
  }

  bool first = true;
  float best[3] = {1e30f, 1e30f, 1e30f};  // random head, group, head-union: the fastest launch shape
  for (const Layout& l : layouts) {
    for (auto& s : sets) {
      if (s.idx) CHECK(cudaFree(s.idx));
      CHECK(cudaMalloc(&s.idx, l.rows.size() * 4));
      CHECK(cudaMemcpy(s.idx, l.rows.data(), l.rows.size() * 4, cudaMemcpyHostToDevice));
    }
    const int sel_per_kv = l.sel / kHkv;
    const int64_t items = int64_t(l.sel) * l.len;
    const int64_t valid = std::count_if(l.rows.begin(), l.rows.end(), [](int p) { return p >= 0; });  // rows read
    const double bytes = double(valid) * 2 * kRowBytes;
    const int which = !strcmp(l.mode, "head") ? 0 : !strcmp(l.mode, "group") ? 1 : 2;
    for (int block : {128, 256, 512}) {
      const float us[4] = {time_us<1>(sets, items, l.len, sel_per_kv, N, block, sink),
                           time_us<2>(sets, items, l.len, sel_per_kv, N, block, sink),
                           time_us<4>(sets, items, l.len, sel_per_kv, N, block, sink),
                           time_us<8>(sets, items, l.len, sel_per_kv, N, block, sink)};
      const int unroll[4] = {1, 2, 4, 8};
      for (int i = 0; i < 4; ++i) {
        if (l.pattern[0] == 'r') best[which] = std::min(best[which], us[i]);
        printf("%s{\"pattern\": \"%s\", \"mode\": \"%s\", \"rows\": %d, \"block\": %d, \"unroll\": %d, \"us\": %.2f, "
               "\"tbps\": %.3f, \"frac_of_copy\": %.3f}",
               first ? "" : ",\n", l.pattern, l.mode, static_cast<int>(valid), block, unroll[i], us[i],
               bytes / (us[i] * 1e-6) / 1e12, bytes / (us[i] * 1e-6) / 1e12 / copy_tbps);
        first = false;
      }
    }
  }
  printf("\n]}\n");
  fprintf(stderr, "gather floor (random rows, N %lld, K %d): head %.1f us, group %.1f us, head's distinct rows %.1f us\n",
          (long long)N, K, best[0], best[1], best[2]);
  return 0;
}
