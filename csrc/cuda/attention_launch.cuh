// Instantiation and launch of the attention + merge kernels for one element type; included by one
// .cu file per dtype so the two compile in parallel.
#pragma once

#include <cuda_runtime.h>

#include "tidal/kernels/cuda_attention.cuh"
#include "tidal/kernels/cuda_launch.h"

namespace tidal::kernels::cuda {

template <typename T, int D>
const char* launch_attention_typed(const AttnParams& p, void* out, float* lse, cudaStream_t stream) {
  constexpr size_t smem = AttnSmem<T, D>::kBytes;
  static const cudaError_t attr = cudaFuncSetAttribute(
      attention_split_kernel<T, D>, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
  if (attr != cudaSuccess) return cudaGetErrorString(attr);
  const int64_t rows = p.B * p.Hq * p.S;
  if (rows == 0) return nullptr;
  // Row tiles in x (up to 2^31 - 1: a long correct_kv chunk has S * G / 16 tiles per KV head), the
  // splits (<= kMaxSplits) in y, the batch (<= 65535, checked by the torch-side launcher) in z.
  const dim3 grid(static_cast<unsigned>(p.row_groups() * p.m_tiles()), static_cast<unsigned>(p.splits),
                  static_cast<unsigned>(p.B));
  attention_split_kernel<T, D><<<grid, kThreads, smem, stream>>>(p);
  merge_splits_kernel<T, D><<<static_cast<unsigned>(rows), D, 0, stream>>>(p.part_o, p.part_ml, p.splits,
                                                                           static_cast<T*>(out), lse);
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

template <typename T>
const char* launch_attention_for(const AttnParams& p, int64_t D, void* out, float* lse, cudaStream_t stream) {
  switch (D) {
    case 32: return launch_attention_typed<T, 32>(p, out, lse, stream);
    case 64: return launch_attention_typed<T, 64>(p, out, lse, stream);
    case 96: return launch_attention_typed<T, 96>(p, out, lse, stream);
    case 128: return launch_attention_typed<T, 128>(p, out, lse, stream);
    case 256: return launch_attention_typed<T, 256>(p, out, lse, stream);
    default: return "unsupported head dim";
  }
}

template <typename T>
int ctas_per_sm(int64_t D) {
  int n = 0;
  auto query = [&](auto kernel, size_t smem) {
    cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
    cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, kernel, kThreads, smem);
  };
  switch (D) {
    case 32: query(attention_split_kernel<T, 32>, AttnSmem<T, 32>::kBytes); break;
    case 64: query(attention_split_kernel<T, 64>, AttnSmem<T, 64>::kBytes); break;
    case 96: query(attention_split_kernel<T, 96>, AttnSmem<T, 96>::kBytes); break;
    case 128: query(attention_split_kernel<T, 128>, AttnSmem<T, 128>::kBytes); break;
    default: query(attention_split_kernel<T, 256>, AttnSmem<T, 256>::kBytes); break;
  }
  return n > 0 ? n : 1;
}

}  // namespace tidal::kernels::cuda
