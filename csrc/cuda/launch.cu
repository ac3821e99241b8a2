// The framework-free host entry points of include/tidal/kernels/cuda_launch.h.
#include <cuda_runtime.h>

#include <algorithm>
#include <mutex>

#include "tidal/kernels/cuda_attention.cuh"
#include "tidal/kernels/cuda_launch.h"

namespace tidal::kernels::cuda {

const char* launch_attention_bf16(const AttnParams& p, int64_t D, void* out, float* lse, cudaStream_t stream);
const char* launch_attention_fp16(const AttnParams& p, int64_t D, void* out, float* lse, cudaStream_t stream);
int ctas_per_sm_bf16(int64_t D);
int ctas_per_sm_fp16(int64_t D);

namespace {

const char* last_error() {
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

// Resident CTAs the device holds: SMs x CTAs per SM of this kernel (cached per device, dtype, D).
int64_t resident_ctas(DType dtype, int64_t D, int device) {
  constexpr int kMaxDevices = 64, kDims = 5;
  static std::mutex mu;
  static int cache[kMaxDevices][2][kDims] = {};
  const int d = D == 32 ? 0 : D == 64 ? 1 : D == 96 ? 2 : D == 128 ? 3 : 4;
  const int t = dtype == DType::Half ? 0 : 1;
  std::lock_guard<std::mutex> lock(mu);
  if (device < 0 || device >= kMaxDevices) device = 0;
  int& slot = cache[device][t][d];
  if (slot == 0) {
    int sms = 0;
    cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
    slot = (sms > 0 ? sms : 1) * (dtype == DType::Half ? ctas_per_sm_fp16(D) : ctas_per_sm_bf16(D));
  }
  return slot;
}

// CTAs a selection row may take: a portable cluster where both the device (sm_90+) and the code the
// top-k kernel runs (its PTX target) have clusters, else 1. Cached per device.
int64_t topk_cluster_limit(int device) {
  constexpr int kMaxDevices = 64;
  static std::mutex mu;
  static int cache[kMaxDevices] = {};
  std::lock_guard<std::mutex> lock(mu);
  if (device < 0 || device >= kMaxDevices) device = 0;
  if (cache[device] == 0) {
    int major = 0;
    cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device);
    cudaFuncAttributes attrs = {};
    const bool compiled = cudaFuncGetAttributes(&attrs, topk_kernel<kTopkBlock>) == cudaSuccess && attrs.ptxVersion >= 90;
    cudaGetLastError();  // a failed query leaves no sticky error for the next launch check
    cache[device] = major >= 9 && compiled ? kTopkMaxCluster : 1;
  }
  return cache[device];
}

// Clusters of `cs` top-k CTAs the device runs at once (cached per device and size).
int64_t topk_active_clusters(int device, int cs) {
  constexpr int kMaxDevices = 64;
  static std::mutex mu;
  static int cache[kMaxDevices][kTopkMaxCluster + 1] = {};
  std::lock_guard<std::mutex> lock(mu);
  if (device < 0 || device >= kMaxDevices) device = 0;
  int& slot = cache[device][cs];
  if (slot == 0) {
    const auto kernel = topk_kernel<kTopkBlock>;
    cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(kTopkSmemBytes));
    cudaFuncSetAttribute(kernel, cudaFuncAttributePreferredSharedMemoryCarveout, cudaSharedmemCarveoutMaxShared);
    cudaLaunchConfig_t config = {};
    config.gridDim = dim3(static_cast<unsigned>(cs));
    config.blockDim = dim3(kTopkBlock);
    config.dynamicSmemBytes = kTopkSmemBytes;
    cudaLaunchAttribute cluster[1];
    cluster[0].id = cudaLaunchAttributeClusterDimension;
    cluster[0].val.clusterDim.x = static_cast<unsigned>(cs);
    cluster[0].val.clusterDim.y = cluster[0].val.clusterDim.z = 1;
    config.attrs = cluster;
    config.numAttrs = 1;
    int n = 0;
    if (cudaOccupancyMaxActiveClusters(&n, kernel, &config) != cudaSuccess) n = 0;
    cudaGetLastError();  // a failed query leaves no sticky error for the next launch check
    slot = n > 0 ? n : -1;
  }
  return slot;
}

}  // namespace

void plan_splits(AttnParams& p, DType dtype, int64_t D, int64_t positions, int device) {
  const int64_t tiles = positions > 0 ? (positions + kTileTokens - 1) / kTileTokens : 1;
  const int64_t ctas = p.B * p.row_groups() * p.m_tiles();
  const int64_t target = resident_ctas(dtype, D, device);
  // One wave: a second, partial wave would cost a whole CTA's time for a few CTAs.
  int64_t splits = ctas > 0 ? target / ctas : 1;
  splits = splits < 1 ? 1 : (splits > tiles ? tiles : splits);
  splits = splits > kMaxSplits ? kMaxSplits : splits;
  const int64_t tiles_per_split = (tiles + splits - 1) / splits;
  p.chunk = tiles_per_split * kTileTokens;
  p.splits = static_cast<int>((tiles + tiles_per_split - 1) / tiles_per_split);
}

const char* launch_attention(const AttnParams& p, DType dtype, int64_t D, void* out, float* lse, void* stream) {
  auto s = static_cast<cudaStream_t>(stream);
  return dtype == DType::Half ? launch_attention_fp16(p, D, out, lse, s) : launch_attention_bf16(p, D, out, lse, s);
}

void plan_topk(TopkParams& p, int device) {
  // The largest cluster (chunks of at least kTopkMinChunk positions) whose rows all run at once;
  // where none does (many rows), chunks of about kTopkChunk. Measured on an H200 (N = 16K, 128K):
  // one wave of 8-CTA clusters beats smaller ones, a second wave costs more than smaller clusters.
  const int64_t rows = p.B * p.Hsel;
  const int64_t limit = std::min<int64_t>(topk_cluster_limit(device), (p.N + kTopkMinChunk - 1) / kTopkMinChunk);
  int64_t cs = 0;
  for (int64_t c = limit; c > 1 && cs == 0; c /= 2)
    if (rows <= topk_active_clusters(device, static_cast<int>(c))) cs = c;
  if (cs == 0) cs = std::min<int64_t>(limit, (p.N + kTopkChunk - 1) / kTopkChunk);
  cs = cs < 1 ? 1 : cs;
  p.cluster = static_cast<int>(cs);
  p.chunk = ((p.N + cs - 1) / cs + 3) / 4 * 4;
}

const char* launch_topk(const TopkParams& p, void* stream) {
  const int64_t rows = p.B * p.Hsel;
  if (rows == 0) return nullptr;
  const auto kernel = topk_kernel<kTopkBlock>;
  cudaError_t attr =
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(kTopkSmemBytes));
  if (attr == cudaSuccess)  // all shared memory: four CTAs an SM, so a cluster of 8 spans few SMs
    attr = cudaFuncSetAttribute(kernel, cudaFuncAttributePreferredSharedMemoryCarveout, cudaSharedmemCarveoutMaxShared);
  if (attr != cudaSuccess) return cudaGetErrorString(attr);
  cudaLaunchConfig_t config = {};
  // Selection heads x cluster ranks in x (<= 2^31 - 1), the batch in y (<= 65535): both checked by the launcher.
  config.gridDim = dim3(static_cast<unsigned>(p.Hsel * p.cluster), static_cast<unsigned>(p.B));
  config.blockDim = dim3(kTopkBlock);
  config.dynamicSmemBytes = kTopkSmemBytes;
  config.stream = static_cast<cudaStream_t>(stream);
  cudaLaunchAttribute cluster[1];
  cluster[0].id = cudaLaunchAttributeClusterDimension;
  cluster[0].val.clusterDim.x = static_cast<unsigned>(p.cluster);
  cluster[0].val.clusterDim.y = 1;
  cluster[0].val.clusterDim.z = 1;
  config.attrs = cluster;
  config.numAttrs = p.cluster > 1 ? 1 : 0;
  const cudaError_t err = cudaLaunchKernelEx(&config, kernel, p);
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
