// What the floor benchmarks share (gather_floor.cu, stream_floor.cu, step_floor.cu, split_floor.cu):
// their caches and index rows, the read-only kernels, a stand-in split merge, the launch and the
// graph timer. Each read kernel only loads (an XOR of the data keeps the loads; it practically never
// stores). Every kernel may be launched early behind the kernel before it (programmatic dependent
// launch): it lets the next kernel start at once and waits for the one before ahead of any load, as
// the ops' kernels do; without the launch attribute, and below sm_90, both steps are no-ops.
#pragma once

#include <cooperative_groups.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <ctime>
#include <random>
#include <vector>

#include "cuda_check.h"

// The shapes of bench_ops.py: bf16, Hkv = 8, D = 128 (256-byte rows, 16 lanes of 16 bytes each).
constexpr int kHkv = 8, kD = 128, kRowBytes = kD * 2, kLanesPerRow = kRowBytes / 16;

// What each floor program starts with: device 0's properties and SM count, a word for the kernels'
// never-taken stores, and today's date (UTC) for its JSON.
struct FloorSetup {
  cudaDeviceProp prop{};
  int sms = 0;
  unsigned* sink = nullptr;
  char date[16] = {};
  FloorSetup() {
    CHECK(cudaGetDeviceProperties(&prop, 0));
    sms = prop.multiProcessorCount;
    CHECK(cudaMalloc(&sink, 4));
    const time_t now = time(nullptr);
    strftime(date, sizeof date, "%Y-%m-%d", gmtime(&now));
  }
};

// n distinct random positions below N, sorted (as select_attention writes an index row).
inline std::vector<int> sorted_random_positions(std::mt19937& rng, int64_t N, int n) {
  std::vector<int> row;
  std::vector<char> taken(N, 0);
  while (row.size() < size_t(n)) {
    const int p = static_cast<int>(rng() % N);
    if (!taken[p]) taken[p] = 1, row.push_back(p);
  }
  std::sort(row.begin(), row.end());
  return row;
}

// A cache a layer for `layers` layers: K and V, each `bytes` of constant (nonzero) fill.
struct LayerCaches {
  std::vector<int4*> k, v;
  LayerCaches(int layers, size_t bytes) : k(layers), v(layers) {
    for (int l = 0; l < layers; ++l) {
      CHECK(cudaMalloc(&k[l], bytes));
      CHECK(cudaMalloc(&v[l], bytes));
      CHECK(cudaMemset(k[l], 1, bytes));
      CHECK(cudaMemset(v[l], 2, bytes));
    }
  }
};

// `rows` index rows of n sorted random positions below N each, on the device.
inline int* device_index_rows(std::mt19937& rng, int rows, int64_t N, int n) {
  std::vector<int> all;
  for (int r = 0; r < rows; ++r) {
    const std::vector<int> row = sorted_random_positions(rng, N, n);
    all.insert(all.end(), row.begin(), row.end());
  }
  int* d = nullptr;
  CHECK(cudaMalloc(&d, all.size() * sizeof(int)));
  CHECK(cudaMemcpy(d, all.data(), all.size() * sizeof(int), cudaMemcpyHostToDevice));
  return d;
}

__device__ __forceinline__ void start_behind_previous_kernel() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;\n griddepcontrol.wait;\n" ::: "memory");
#endif
}

// Each group of 16 lanes reads U items (an item: the K row and the V row of one index entry) with
// all of its index loads first, then all 2U row loads, so every load of a lane is in flight at once.
// Index row r (K entries) reads KV head r / sel_per_kv of a B = 1 cache of N rows a head.
template <int U>
__global__ void gather_rows(const int4* __restrict__ k, const int4* __restrict__ v, const int* __restrict__ idx,
                            int64_t items, int K, int sel_per_kv, int64_t N, unsigned* __restrict__ sink) {
  start_behind_previous_kernel();
  const int64_t tid = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t group = tid / kLanesPerRow, groups = int64_t(gridDim.x) * blockDim.x / kLanesPerRow;
  const int lane = threadIdx.x % kLanesPerRow;
  int pos[U];
  int64_t base[U];
#pragma unroll
  for (int u = 0; u < U; ++u) {
    const int64_t item = group + u * groups;
    pos[u] = item < items ? __ldg(idx + item) : -1;
    base[u] = (item / K) / sel_per_kv * N;  // the KV head's first row
  }
  unsigned acc = 0;
  int4 kr[U], vr[U];
#pragma unroll
  for (int u = 0; u < U; ++u)
    if (pos[u] >= 0) {
      kr[u] = __ldcs(k + (base[u] + pos[u]) * kLanesPerRow + lane);
      vr[u] = __ldcs(v + (base[u] + pos[u]) * kLanesPerRow + lane);
    }
#pragma unroll
  for (int u = 0; u < U; ++u)
    if (pos[u] >= 0) acc ^= kr[u].x ^ kr[u].w ^ vr[u].y ^ vr[u].z;
  if (acc == 0x9e3779b9u) sink[0] = acc;
}

// CTAs of `block` threads that give gather_rows<U> a group of 16 lanes for every U of `items`.
inline int gather_rows_grid(int64_t items, int U, int block) {
  const int64_t threads = (items + U - 1) / U * kLanesPerRow;
  return static_cast<int>((threads + block - 1) / block);
}

// Plain 16-byte streaming loads of two arrays of `vecs` 16-byte vectors (a K and a V cache).
__global__ void stream_ldg(const int4* k, const int4* v, int64_t vecs, unsigned* sink) {
  start_behind_previous_kernel();
  unsigned acc = 0;
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < vecs; i += 4 * stride) {
    int4 a[4], b[4];
#pragma unroll
    for (int u = 0; u < 4; ++u)
      if (i + u * stride < vecs) a[u] = __ldcs(k + i + u * stride), b[u] = __ldcs(v + i + u * stride);
#pragma unroll
    for (int u = 0; u < 4; ++u)
      if (i + u * stride < vecs) acc ^= a[u].x ^ b[u].w;
  }
  if (acc == 0x12345678u) sink[0] = acc;
}

// Element d of the merge of `splits` states [O (D floats), m, l], state s at states + s * (D + 2).
__device__ __forceinline__ float merge_element(const float* states, int splits, int D, int d) {
  const int stride = D + 2;
  float m = -1e30f, l = 0.f, o = 0.f;
  for (int s = 0; s < splits; ++s) m = fmaxf(m, states[s * stride + D]);
  for (int s = 0; s < splits; ++s) {
    const float w = __expf(states[s * stride + D] - m);
    l += w * states[s * stride + D + 1];
    o += w * states[s * stride + d];
  }
  return o / l;
}

constexpr int kState = kD + 2;  // a partial softmax state: [O (D floats), m, l]

// A sparse layer's reads shaped as a kernel that splits each index row over `splits` CTAs: CTA (row,
// split) reads its row's entries [split * per, (split + 1) * per), per = K / splits, in groups of 16
// lanes, U entries a group in flight, the next entries' positions loaded before the rows are
// consumed (splits = 1: one CTA a row, nothing to combine). Index row r reads KV head r / sel_per_kv.
// Then the CTA's stand-in state is combined as `combine` says:
//   kPartials  stored to `part`, for merge_partials (a kernel of its own) to combine
//   kCluster   put in the shared memory of the cluster's leader CTA (the cluster is the row's
//              splits), which after one cluster barrier writes the row of `out`
//   kLastCta   stored to `part`, then (a fence, one atomic add on the row's `arrivals` word) the last
//              CTA of the row to arrive reads the row's partials back, writes its row of `out` and
//              zeroes the word for the next call
enum class Combine { kPartials, kCluster, kLastCta };
template <int U, Combine combine>
__global__ void split_rows(const int4* __restrict__ k, const int4* __restrict__ v, const int* __restrict__ idx,
                           int K, int splits, int sel_per_kv, int64_t N, float* __restrict__ part,
                           float* __restrict__ out, unsigned* __restrict__ arrivals, unsigned* __restrict__ sink) {
  start_behind_previous_kernel();
  extern __shared__ float leader_states[];  // [splits][kState] (kCluster: used in the leader only)
  __shared__ bool last;  // kLastCta: this CTA is the last of its row to arrive
  const int per = K / splits, row = blockIdx.x / splits, split = blockIdx.x % splits;
  const int* ix = idx + int64_t(row) * K + split * per;
  const int64_t base = int64_t(row / sel_per_kv) * N * kLanesPerRow;
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
  if constexpr (combine == Combine::kCluster) {
    namespace cg = cooperative_groups;
    const cg::cluster_group cluster = cg::this_cluster();
    float* leader = cluster.map_shared_rank(leader_states, 0);
    if (threadIdx.x < kState) leader[cluster.block_rank() * kState + threadIdx.x] = x + threadIdx.x;
    cluster.sync();
    if (cluster.block_rank() == 0 && threadIdx.x < kD)
      out[int64_t(row) * kD + threadIdx.x] = merge_element(leader_states, splits, kD, threadIdx.x);
  } else {
    if (threadIdx.x < kState) part[int64_t(blockIdx.x) * kState + threadIdx.x] = x;
    if constexpr (combine == Combine::kLastCta) {
      __threadfence();  // this CTA's partial is visible before its arrival counts
      __syncthreads();
      if (threadIdx.x == 0) last = atomicAdd(arrivals + row, 1u) == unsigned(splits - 1);
      __syncthreads();
      if (last) {
        __threadfence();  // the other CTAs' partials, counted before this arrival, are read after it
        if (threadIdx.x < kD)
          out[int64_t(row) * kD + threadIdx.x] =
              merge_element(part + int64_t(row) * splits * kState, splits, kD, threadIdx.x);
        if (threadIdx.x == 0) arrivals[row] = 0;
      }
    }
  }
  if (acc == 0x9e3779b9u) sink[0] = acc;
}

// The least a split layer's combine costs as a kernel of its own (as merge_splits follows the
// attention and gather kernels): each CTA (an output row) weighs `splits` partial softmax states
// [O (blockDim.x floats), m, l] from `part` and writes its row. The kernel before it writes no
// partials (fewer stores than any real split layer makes), so a step with these merges still bounds
// from below every design that splits rows over CTAs and merges them in a kernel after.
__global__ void merge_partials(const float* __restrict__ part, int splits, float* __restrict__ out) {
  start_behind_previous_kernel();
  const int D = blockDim.x;
  out[int64_t(blockIdx.x) * D + threadIdx.x] =
      merge_element(part + int64_t(blockIdx.x) * splits * (D + 2), splits, D, threadIdx.x);
}

// Dynamic shared memory that lets `per_sm` (1 to 4) CTAs share an SM and no more.
inline int smem_for_ctas_per_sm(int per_sm) {
  return (per_sm == 1 ? 120 : per_sm == 2 ? 100 : per_sm == 3 ? 70 : 52) * 1024;
}

// A launch's shape: grid and block, dynamic shared memory, CTAs a thread-block cluster.
struct LaunchShape {
  int grid, block, smem = 0, cluster = 1;
};

// The launch configuration of that shape on st, programmatically behind the kernel before it where
// `early` (for cudaLaunchKernelEx and the cluster occupancy query).
struct LaunchConfig {
  cudaLaunchConfig_t cfg = {};
  cudaLaunchAttribute attrs[2];
  LaunchConfig(LaunchShape shape, cudaStream_t st, bool early) {
    cfg.gridDim = dim3(shape.grid);
    cfg.blockDim = dim3(shape.block);
    cfg.dynamicSmemBytes = shape.smem;
    cfg.stream = st;
    cfg.attrs = attrs;
    if (early) {
      attrs[cfg.numAttrs].id = cudaLaunchAttributeProgrammaticStreamSerialization;
      attrs[cfg.numAttrs++].val.programmaticStreamSerializationAllowed = 1;
    }
    if (shape.cluster > 1) {
      attrs[cfg.numAttrs].id = cudaLaunchAttributeClusterDimension;
      attrs[cfg.numAttrs++].val.clusterDim = {static_cast<unsigned>(shape.cluster), 1, 1};
    }
  }
  LaunchConfig(const LaunchConfig&) = delete;  // cfg.attrs points into this object
  LaunchConfig& operator=(const LaunchConfig&) = delete;
};

// Launches kernel(args...) on st in that shape, programmatically behind the kernel before it where
// `early`.
template <typename... Params, typename... Args>
void launch(void (*kernel)(Params...), LaunchShape shape, cudaStream_t st, bool early, Args... args) {
  const LaunchConfig config(shape, st, early);
  CHECK(cudaLaunchKernelEx(&config.cfg, kernel, args...));
}

// Median time in us of one launch(i, stream) call, from 20 replays of a CUDA graph of `rot` calls
// (i = 0 .. rot - 1, one per buffer set), as bench_ops.py times the ops.
template <typename Launch>
float median_us(Launch launch, int rot) {
  cudaStream_t st;
  CHECK(cudaStreamCreateWithFlags(&st, cudaStreamNonBlocking));
  cudaGraph_t graph;
  cudaGraphExec_t exec;
  CHECK(cudaStreamBeginCapture(st, cudaStreamCaptureModeGlobal));
  for (int i = 0; i < rot; ++i) launch(i, st);
  CHECK(cudaStreamEndCapture(st, &graph));
  CHECK(cudaGraphInstantiate(&exec, graph, 0));
  cudaEvent_t e0, e1;
  CHECK(cudaEventCreate(&e0));
  CHECK(cudaEventCreate(&e1));
  for (int i = 0; i < 3; ++i) CHECK(cudaGraphLaunch(exec, st));
  std::vector<float> t;
  for (int i = 0; i < 20; ++i) {
    CHECK(cudaEventRecord(e0, st));
    CHECK(cudaGraphLaunch(exec, st));
    CHECK(cudaEventRecord(e1, st));
    CHECK(cudaEventSynchronize(e1));
    float ms;
    CHECK(cudaEventElapsedTime(&ms, e0, e1));
    t.push_back(ms * 1e3f / rot);
  }
  CHECK(cudaGetLastError());
  CHECK(cudaEventDestroy(e0));
  CHECK(cudaEventDestroy(e1));
  CHECK(cudaGraphExecDestroy(exec));
  CHECK(cudaGraphDestroy(graph));
  CHECK(cudaStreamDestroy(st));
  std::sort(t.begin(), t.end());
  return t[t.size() / 2];
}
