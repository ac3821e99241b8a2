// The framework-free host entry points of include/tidal/kernels/cuda_launch.h.
#include <cuda_runtime.h>

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

const char* launch_topk(const TopkParams& p, void* stream) {
  const int64_t rows = p.B * p.Hsel;
  if (rows == 0) return nullptr;
  auto s = static_cast<cudaStream_t>(stream);
  // Selection rows in x (any count), chunks of a row in y (<= 65535, checked by the launcher).
  const dim3 grid(static_cast<unsigned>(rows), static_cast<unsigned>(p.chunks));
  for (int pass = 0; pass < 3; ++pass) topk_hist_kernel<kTopkBlock><<<grid, kTopkBlock, 0, s>>>(p, pass);
  topk_count_kernel<kTopkBlock><<<grid, kTopkBlock, 0, s>>>(p);
  topk_write_kernel<kTopkBlock><<<grid, kTopkBlock, 0, s>>>(p);
  return last_error();
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
