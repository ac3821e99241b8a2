// The framework-free host entry points of include/tidal/kernels/cuda_launch.h.
#include <cuda_runtime.h>

#include <algorithm>
#include <mutex>

#include "attention_launch.cuh"

namespace tidal::kernels::cuda {

const char* launch_attention_bf16(const AttnParams& p, int64_t D, void* out, float* lse, cudaStream_t stream);
const char* launch_attention_fp16(const AttnParams& p, int64_t D, void* out, float* lse, cudaStream_t stream);
const char* launch_merge_behind_topk_bf16(const AttnParams& p, int64_t D, void* out, cudaStream_t stream);
const char* launch_merge_behind_topk_fp16(const AttnParams& p, int64_t D, void* out, cudaStream_t stream);
int ctas_per_sm_bf16(int64_t D, bool sm90, bool digits);
int ctas_per_sm_fp16(int64_t D, bool sm90, bool digits);
const char* launch_gather_bf16(const AttnParams& p, int64_t D, void* out, cudaStream_t stream);
const char* launch_gather_fp16(const AttnParams& p, int64_t D, void* out, cudaStream_t stream);
int gather_ctas_per_sm_bf16(int64_t D, int R);
int gather_ctas_per_sm_fp16(int64_t D, int R);

namespace {

const char* last_error() {
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

// A small nonzero int per device and slot, computed once by compute() (driver queries). Each call
// site, a distinct lambda type, keeps its own table.
template <int kSlots, typename Compute>
int cached_per_device(int device, int slot, Compute compute) {
  constexpr int kMaxDevices = 64;
  static std::mutex mu;
  static int cache[kMaxDevices][kSlots] = {};
  std::lock_guard<std::mutex> lock(mu);
  if (device < 0 || device >= kMaxDevices) device = 0;
  int& value = cache[device][slot];
  if (value == 0) value = compute();
  return value;
}

int sm_count(int device) {
  int sms = 0;
  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  return sms > 0 ? sms : 1;
}

// Index of a (dtype, head dim of kHeadDims) pair: the cache slot of per-instance queries.
constexpr int kDtypeDimSlots = 2 * 5;
int dtype_dim_slot(DType dtype, int64_t D) {
  return (dtype == DType::Half ? 0 : 5) + (D == 32 ? 0 : D == 64 ? 1 : D == 96 ? 2 : D == 128 ? 3 : 4);
}

// Whether both the device and the code the kernels run (the top-k kernel's PTX target stands for
// all: one build) are sm_90+: clusters, bulk copies, 128-token tiles, early launch. Cached per device.
bool has_sm90(int device) {
  const int sm90 = cached_per_device<1>(device, 0, [&] {
    int major = 0;
    cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device);
    cudaFuncAttributes attrs = {};
    const bool compiled = cudaFuncGetAttributes(&attrs, topk_kernel<kTopkBlock>) == cudaSuccess && attrs.ptxVersion >= 90;
    cudaGetLastError();  // a failed query leaves no sticky error for the next launch check
    return major >= 9 && compiled ? 2 : 1;  // the cache holds nonzero values
  });
  return sm90 == 2;
}

int tile_ctas_per_sm(DType dtype, int64_t D, bool sm90, bool digits) {
  return dtype == DType::Half ? ctas_per_sm_fp16(D, sm90, digits) : ctas_per_sm_bf16(D, sm90, digits);
}

// Resident CTAs the device holds: SMs x CTAs per SM of the tile kernel in the code the device runs
// (cached per device, dtype, D).
int64_t resident_ctas(DType dtype, int64_t D, int device) {
  return cached_per_device<kDtypeDimSlots>(device, dtype_dim_slot(dtype, D), [&] {
    return sm_count(device) * std::max(1, tile_ctas_per_sm(dtype, D, has_sm90(device), false));
  });
}

// Whether the tile kernel's digit counters cost no occupancy (cached per device, dtype, D).
bool digits_keep_occupancy(DType dtype, int64_t D, int device) {
  return cached_per_device<kDtypeDimSlots>(device, dtype_dim_slot(dtype, D), [&] {
    const bool sm90 = has_sm90(device);
    return tile_ctas_per_sm(dtype, D, sm90, true) == tile_ctas_per_sm(dtype, D, sm90, false) ? 2 : 1;
  }) == 2;
}

// The same for the gather kernel with R query rows (1, 2 or 4).
int64_t gather_capacity(DType dtype, int64_t D, int R, int device) {
  const int r = R == 1 ? 0 : R == 2 ? 1 : 2;
  return cached_per_device<kDtypeDimSlots * 3>(device, dtype_dim_slot(dtype, D) * 3 + r, [&] {
    return sm_count(device) * (dtype == DType::Half ? gather_ctas_per_sm_fp16(D, R) : gather_ctas_per_sm_bf16(D, R));
  });
}

// CTAs a portable thread-block cluster may take: kMaxCluster on sm_90, else 1.
int64_t cluster_limit(int device) { return has_sm90(device) ? kMaxCluster : 1; }

// The top-k kernel's dynamic shared memory: padded to one CTA an SM where `spread`.
size_t topk_smem_bytes(bool spread) { return spread ? kTopkSpreadSmemBytes : kTopkSmemBytes; }

// The top-k kernel's shared memory (96 KB dynamic, more than the default allows; on sm_90 up to
// the padded kTopkSpreadSmemBytes) and carveout (all shared memory, so an SM holds as many of a
// cluster's CTAs as its registers allow), set once per device (`device`, the current one): the
// result of the first setting.
cudaError_t topk_set_attributes(int device) {
  const int result = cached_per_device<1>(device, 0, [&] {
    const auto kernel = topk_kernel<kTopkBlock>;
    const size_t smem = topk_smem_bytes(has_sm90(device));
    cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
    if (err == cudaSuccess)
      err = cudaFuncSetAttribute(kernel, cudaFuncAttributePreferredSharedMemoryCarveout, cudaSharedmemCarveoutMaxShared);
    return static_cast<int>(err) + 1;  // the cache holds nonzero values
  });
  return static_cast<cudaError_t>(result - 1);
}

// Clusters of `cs` top-k CTAs the device runs at once, with one CTA an SM where `spread` (cached
// per device, size and spread).
int64_t topk_active_clusters(int device, int cs, bool spread) {
  return cached_per_device<2 * (kMaxCluster + 1)>(device, cs + (spread ? kMaxCluster + 1 : 0), [&] {
    const Launch l(dim3(static_cast<unsigned>(cs)), kTopkBlock, topk_smem_bytes(spread), nullptr, cs, false);
    int n = 0;
    if (topk_set_attributes(device) != cudaSuccess ||
        cudaOccupancyMaxActiveClusters(&n, topk_kernel<kTopkBlock>, &l.config) != cudaSuccess)
      n = 0;
    cudaGetLastError();  // a failed query leaves no sticky error for the next launch check
    return n > 0 ? n : -1;
  });
}

}  // namespace

void plan_splits(AttnParams& p, DType dtype, int64_t D, int64_t positions, int device) {
  p.sm90 = has_sm90(device);
  const int64_t tile = tile_tokens(D, p.sm90);
  const int64_t tiles = positions > 0 ? (positions + tile - 1) / tile : 1;
  const int64_t ctas = p.B * p.row_groups() * p.m_tiles();
  const int64_t target = resident_ctas(dtype, D, device);
  // One wave: a second, partial wave would cost a whole CTA's time for a few CTAs.
  int64_t splits = ctas > 0 ? target / ctas : 1;
  splits = splits < 1 ? 1 : (splits > tiles ? tiles : splits);
  splits = splits > kMaxSplits ? kMaxSplits : splits;
  const int64_t tiles_per_split = (tiles + splits - 1) / splits;
  p.chunk = tiles_per_split * tile;
  p.splits = static_cast<int>((tiles + tiles_per_split - 1) / tiles_per_split);
}

bool digits_fit(const AttnParams& p, DType dtype, int64_t D, int device) {
  return p.rows_per_cta_group() <= kDigitRows && p.chunk <= kDigitMaxCount && p.N <= kExactFloatCount &&
         p.tile_ctas() <= kExactFloatCount && digits_keep_occupancy(dtype, D, device);
}

const char* launch_zero_fill(float* dst, int64_t n, bool early, void* stream) {
  const int64_t vectors = n / 4;
  if (vectors == 0) return nullptr;
  constexpr int kThreads = 256;
  const int64_t ctas = std::min<int64_t>((vectors + kThreads - 1) / kThreads, 1024);
  const Launch l(dim3(static_cast<unsigned>(ctas)), kThreads, 0, static_cast<cudaStream_t>(stream), 1, early);
  const cudaError_t err =
      cudaLaunchKernelEx(&l.config, zero_fill_kernel<float4>, reinterpret_cast<float4*>(dst), vectors);
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

const char* launch_attention(const AttnParams& p, DType dtype, int64_t D, void* out, float* lse, void* stream) {
  auto s = static_cast<cudaStream_t>(stream);
  return dtype == DType::Half ? launch_attention_fp16(p, D, out, lse, s) : launch_attention_bf16(p, D, out, lse, s);
}

const char* launch_merge_behind_topk(const AttnParams& p, DType dtype, int64_t D, void* out, void* stream) {
  auto s = static_cast<cudaStream_t>(stream);
  return dtype == DType::Half ? launch_merge_behind_topk_fp16(p, D, out, s)
                              : launch_merge_behind_topk_bf16(p, D, out, s);
}

bool gather_takes(int64_t D, int64_t rows_per_group) {
  return gather_head_dim(D) && rows_per_group >= 1 && rows_per_group <= kGatherMaxRows;
}

void plan_gather(AttnParams& p, DType dtype, int64_t D, int device) {
  // One wave of CTAs over the index rows, each split at least one batch of every slot, at most
  // kMaxMergedSplits (measured on an H200, 1x128K, top-k 2048, group mode: 16 splits 11.0 us,
  // 32 splits 11.7 us). Split rows write partials for merge_splits.
  constexpr int64_t kMaxMergedSplits = 16;
  const int R = gather_rows(p.rows_per_group);
  const int64_t per_batch = gather_slots(D) * gather_batch(R);
  const int64_t index_rows = p.B * p.row_groups();
  const int64_t most = p.K > 0 ? (p.K + per_batch - 1) / per_batch : 1;
  const int64_t splits = index_rows > 0 ? gather_capacity(dtype, D, R, device) / index_rows : 1;
  p.splits = static_cast<int>(std::max<int64_t>(1, std::min({splits, most, kMaxMergedSplits})));
  p.chunk = (p.K + p.splits - 1) / p.splits;
  p.sm90 = has_sm90(device);
}

const char* launch_gather(const AttnParams& p, DType dtype, int64_t D, void* out, void* stream) {
  auto s = static_cast<cudaStream_t>(stream);
  return dtype == DType::Half ? launch_gather_fp16(p, D, out, s) : launch_gather_bf16(p, D, out, s);
}

void plan_topk(TopkParams& p, int device) {
  // The largest cluster (chunks of at least kTopkMinChunk positions) whose rows all run at once;
  // where none does (many rows), chunks of about kTopkChunk. Measured on an H200 (N = 16K, 128K):
  // one wave of 8-CTA clusters beats smaller ones, a second wave costs more than smaller clusters.
  const int64_t rows = p.B * p.Hsel;
  const int64_t limit = std::min<int64_t>(cluster_limit(device), (p.N + kTopkMinChunk - 1) / kTopkMinChunk);
  int64_t cs = 0;
  for (int64_t c = limit; c > 1 && cs == 0; c /= 2)
    if (rows <= topk_active_clusters(device, static_cast<int>(c), false)) cs = c;
  if (cs == 0) cs = std::min<int64_t>(limit, (p.N + kTopkChunk - 1) / kTopkChunk);
  cs = cs < 1 ? 1 : cs;
  // Where those CTAs would fit the SMs one each, the scheduler still packs a cluster's CTAs two an
  // SM, where they share its issue slots (on an H100 at 1x32K, 88 to 124 of 128 CTAs did, and ended
  // 1.6 us later). There (sm_90), the largest cluster of any size whose rows all run at once with
  // one CTA an SM: at 1x32K, clusters of 3 (32 of 4 do not fit an H100 that way). Select at 1x32K,
  // each pair from one call: 2 a cluster spread 66.0-66.3 us against 4 packed 67.4-68.5; 3 spread
  // 65.9 against 2 spread 66.7-68.5.
  p.spread = false;
  if (has_sm90(device) && rows * cs <= sm_count(device))
    for (int64_t c = cs; c >= 1 && !p.spread; --c)
      if (rows <= topk_active_clusters(device, static_cast<int>(c), true)) {
        cs = c;
        p.spread = true;
      }
  p.cluster = static_cast<int>(cs);
  p.chunk = ((p.N + cs - 1) / cs + 31) / 32 * 32;  // whole L2 lines: a CTA drops its own
  p.sm90 = has_sm90(device);
}

const char* launch_topk(const TopkParams& p, void* stream) {
  const int64_t rows = p.B * p.Hsel;
  if (rows == 0) return nullptr;
  int device = 0;
  cudaGetDevice(&device);
  const cudaError_t attr = topk_set_attributes(device);
  if (attr != cudaSuccess) return cudaGetErrorString(attr);
  // Selection heads x cluster ranks in x (<= 2^31 - 1), the batch in y (<= 65535): both checked by
  // the launcher.
  const Launch l(dim3(static_cast<unsigned>(p.Hsel * p.cluster), static_cast<unsigned>(p.B)), kTopkBlock,
                 topk_smem_bytes(p.spread), static_cast<cudaStream_t>(stream), p.cluster, p.sm90);
  const cudaError_t err = cudaLaunchKernelEx(&l.config, topk_kernel<kTopkBlock>, p);
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

const char* launch_write_kv(const CorrectParams& c, DType dtype, void* stream) {
  if (c.B == 0 || c.S == 0 || c.Hkv == 0) return nullptr;
  const dim3 grid(static_cast<unsigned>(c.S), static_cast<unsigned>(c.Hkv), static_cast<unsigned>(c.B));
  const int threads = c.D < 128 ? static_cast<int>(c.D) : 128;
  auto s = static_cast<cudaStream_t>(stream);
  if (dtype == DType::Half)
    write_kv_kernel<__half><<<grid, threads, 0, s>>>(c);
  else
    write_kv_kernel<__nv_bfloat16><<<grid, threads, 0, s>>>(c);
  return last_error();
}

}  // namespace tidal::kernels::cuda
