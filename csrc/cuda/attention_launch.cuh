// Instantiation and launch of the attention + merge kernels for one element type; included by one
// .cu file per dtype so the two compile in parallel.
#pragma once

#include <cuda.h>
#include <cudaTypedefs.h>
#include <cuda_runtime.h>

#include <type_traits>

#include "tidal/kernels/cuda_attention.cuh"
#include "tidal/kernels/cuda_sparse.cuh"
#include "tidal/kernels/cuda_launch.h"

namespace tidal::kernels::cuda {

// A launch configuration: `threads` threads and `smem` dynamic shared memory a CTA, clusters of `cs`
// CTAs along x where cs > 1, and where `early` (sm_90 only) programmatic dependent launch: the kernel
// may start before the previous kernel of the stream ends (it waits for its results in-kernel, see
// wait_for_previous_kernel). Not copyable: config points into attrs.
struct Launch {
  cudaLaunchConfig_t config = {};
  cudaLaunchAttribute attrs[2];
  Launch(dim3 grid, int threads, size_t smem, cudaStream_t stream, int cs, bool early) {
    config.gridDim = grid;
    config.blockDim = dim3(static_cast<unsigned>(threads));
    config.dynamicSmemBytes = smem;
    config.stream = stream;
    config.attrs = attrs;
    if (cs > 1) {
      cudaLaunchAttribute& a = attrs[config.numAttrs++];
      a.id = cudaLaunchAttributeClusterDimension;
      a.val.clusterDim.x = static_cast<unsigned>(cs);
      a.val.clusterDim.y = a.val.clusterDim.z = 1;
    }
    if (early) {
      cudaLaunchAttribute& a = attrs[config.numAttrs++];
      a.id = cudaLaunchAttributeProgrammaticStreamSerialization;
      a.val.programmaticStreamSerializationAllowed = 1;
    }
  }
  Launch(const Launch&) = delete;
  Launch& operator=(const Launch&) = delete;
};

// merge_splits_kernel over the B * Hq * S rows of p's partials into `out` (and lse, if given),
// behind the kernel that wrote them or (behind_topk) behind select's top-k.
template <typename T, int D>
cudaError_t launch_merge(const AttnParams& p, void* out, float* lse, cudaStream_t stream, bool behind_topk = false) {
  const Launch l(dim3(static_cast<unsigned>(p.B * p.Hq * p.S)), D, 0, stream, 1, p.sm90);
  const float* done = behind_topk && p.hist != nullptr ? select_done_count(p.hist, p.B, p.Hq) : nullptr;
  return cudaLaunchKernelEx(&l.config, behind_topk ? merge_splits_kernel<T, D, true> : merge_splits_kernel<T, D, false>,
                            static_cast<const float*>(p.part_o), static_cast<const float*>(p.part_ml), p.splits,
                            static_cast<T*>(out), lse, done, static_cast<float>(p.tile_ctas()));
}

// The tile kernel's CTA in the code the device runs (sm90 = p.sm90: sm_90 code): its threads and
// dynamic shared memory, without and with select's digit counters. kTensorCopies: the instance that
// loads its tiles by tensor copies (sm_90 only).
template <typename T, int D, bool kTensorCopies = false>
struct TileCta {
  int threads;
  size_t smem, smem_digits;
  explicit TileCta(bool sm90)
      : threads(tile_threads(D, sm90)),
        smem(sm90 ? AttnSmem<T, D, true, kTensorCopies>::kBytes : AttnSmem<T, D, false>::kBytes),
        smem_digits(smem + AttnSmem<T, D, true>::kDigitBytes) {}
  // Raises the kernel's shared-memory limit on the current device: to smem_digits where the device
  // allows, else to smem.
  cudaError_t allow() const {
    const auto kernel = attention_split_kernel<T, D, kTensorCopies>;
    if (cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem_digits)) ==
        cudaSuccess)
      return cudaSuccess;
    cudaGetLastError();  // a refused limit leaves no sticky error for the next launch check
    return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
  }
};

// cuTensorMapEncodeTiled, from the driver the runtime loaded (no link against libcuda); nullptr where
// the driver lacks it.
inline PFN_cuTensorMapEncodeTiled_v12000 tensor_map_encoder() {
  static const auto encode = [] {
    void* fn = nullptr;
    cudaDriverEntryPointQueryResult found;
    if (cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &fn, 12000, cudaEnableDefault, &found) !=
            cudaSuccess ||
        found != cudaDriverEntryPointSuccess)
      fn = nullptr;
    cudaGetLastError();
    return reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(fn);
  }();
  return encode;
}

// The K and V caches of p as tensor maps for the tile kernel's tensor copies (boxes of 64 dims by
// `rows` positions, 128-byte swizzle, zeros past N). False where the driver refuses the layout (the
// launcher has checked that rows are 16-byte aligned): the kernel then copies row by row.
template <typename T>
bool encode_kv_maps(const AttnParams& p, int64_t D, int rows, KvMaps& maps) {
  const auto encode = tensor_map_encoder();
  if (encode == nullptr) return false;
  const auto one = [&](const void* base, int64_t stride_n, int64_t stride_h, int64_t stride_b, TensorMap& map) {
    // A size-1 dim's stride is never stepped over; torch may report any value for it.
    if (p.Hkv == 1) stride_h = p.N * stride_n;
    if (p.B == 1) stride_b = p.Hkv * stride_h;
    const cuuint64_t dims[4] = {static_cast<cuuint64_t>(D), static_cast<cuuint64_t>(p.N),
                                static_cast<cuuint64_t>(p.Hkv), static_cast<cuuint64_t>(p.B)};
    const cuuint64_t strides[3] = {stride_n * sizeof(T), stride_h * sizeof(T), stride_b * sizeof(T)};
    const cuuint32_t box[4] = {64, static_cast<cuuint32_t>(rows), 1, 1}, steps[4] = {1, 1, 1, 1};
    const auto type = std::is_same_v<T, __half> ? CU_TENSOR_MAP_DATA_TYPE_FLOAT16 : CU_TENSOR_MAP_DATA_TYPE_BFLOAT16;
    return encode(reinterpret_cast<CUtensorMap*>(&map), type, 4, const_cast<void*>(base), dims, strides, box, steps,
                  CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
                  CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE) == CUDA_SUCCESS;
  };
  return one(p.k, p.k_stride_n, p.k_stride_h, p.k_stride_b, maps.k) &&
         one(p.v, p.v_stride_n, p.v_stride_h, p.v_stride_b, maps.v);
}

// The tile kernel's instance kTensorCopies over p's grid.
template <typename T, int D, bool kTensorCopies>
cudaError_t launch_tile(const AttnParams& p, const KvMaps& maps, cudaStream_t stream) {
  const TileCta<T, D, kTensorCopies> cta(p.sm90);
  static const cudaError_t attr = cta.allow();
  if (attr != cudaSuccess) return attr;
  // Row tiles in x (up to 2^31 - 1: a long correct_kv chunk has S * G / 16 tiles per KV head), the
  // splits (<= kMaxSplits) in y, the batch (<= 65535, checked by the torch-side launcher) in z.
  const dim3 grid(static_cast<unsigned>(p.row_groups() * p.m_tiles()), static_cast<unsigned>(p.splits),
                  static_cast<unsigned>(p.B));  // p.tile_ctas() in all
  // select's (head mode) starts early behind its histogram's zero fill (launch_zero_fill).
  const Launch l(grid, cta.threads, p.hist != nullptr ? cta.smem_digits : cta.smem, stream, 1,
                 p.sm90 && p.hist != nullptr);
  return cudaLaunchKernelEx(&l.config, attention_split_kernel<T, D, kTensorCopies>, p, maps);
}

// Dense positions on sm_90 (decode, select, correct_kv) load by tensor copies where the head dim and
// the cache's layout allow: on an H100, a kernel doing only the loads streamed 1x128K at 3.10 TB/s
// that way against 2.97 TB/s row by row (benchmarks/stream_floor.cu).
template <typename T, int D>
const char* launch_attention_typed(const AttnParams& p, void* out, float* lse, cudaStream_t stream) {
  if (p.B * p.Hq * p.S == 0) return nullptr;
  KvMaps maps = {};
  cudaError_t err;
  if constexpr (tile_tensor_copies(D)) {
    if (p.sm90 && p.indices == nullptr && encode_kv_maps<T>(p, D, tile_tokens(D, true), maps))
      err = launch_tile<T, D, true>(p, maps, stream);
    else
      err = launch_tile<T, D, false>(p, maps, stream);
  } else {
    err = launch_tile<T, D, false>(p, maps, stream);
  }
  if (err == cudaSuccess && out != nullptr) err = launch_merge<T, D>(p, out, lse, stream);
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

// f(D) as a std::integral_constant for a head dim of kHeadDims (the tile kernel's instances): one
// switch serves the launch and the occupancy query.
template <typename F>
auto with_tile_instance(int64_t D, F f) {
  switch (D) {
    case 32: return f(std::integral_constant<int, 32>{});
    case 64: return f(std::integral_constant<int, 64>{});
    case 96: return f(std::integral_constant<int, 96>{});
    case 128: return f(std::integral_constant<int, 128>{});
    default: return f(std::integral_constant<int, 256>{});
  }
}

template <typename T>
const char* launch_attention_for(const AttnParams& p, int64_t D, void* out, float* lse, cudaStream_t stream) {
  if (!is_supported_head_dim(D)) return "unsupported head dim";
  return with_tile_instance(D, [&](auto d) { return launch_attention_typed<T, decltype(d)::value>(p, out, lse, stream); });
}

template <typename T>
const char* launch_merge_behind_topk_for(const AttnParams& p, int64_t D, void* out, cudaStream_t stream) {
  if (p.B * p.Hq * p.S == 0) return nullptr;
  const cudaError_t err = with_tile_instance(
      D, [&](auto d) { return launch_merge<T, decltype(d)::value>(p, out, nullptr, stream, true); });
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

// CTAs of the tile kernel an SM holds, in the code the device runs (sm90: sm_90 code), with or
// without select's digit counters (0: none fits).
template <typename T>
int ctas_per_sm(int64_t D, bool sm90, bool digits) {
  return with_tile_instance(D, [&](auto d) {
    // The row-by-row instance: the tensor-copy one needs less shared memory (no row padding), so it
    // holds at least as many CTAs.
    constexpr int kD = decltype(d)::value;
    const TileCta<T, kD> cta(sm90);
    cta.allow();
    int n = 0;
    if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, attention_split_kernel<T, kD, false>, cta.threads,
                                                      digits ? cta.smem_digits : cta.smem) != cudaSuccess)
      n = 0;
    cudaGetLastError();
    return n;
  });
}

// The gather kernel for sparse_attention (p planned by plan_gather), then merge_splits where it
// splits index rows.
template <typename T, int D, int R>
const char* launch_gather_typed(const AttnParams& p, void* out, cudaStream_t stream) {
  if (p.B * p.Hq == 0) return nullptr;
  // Index rows x splits in x (<= Hq x splits), the batch (<= 65535, checked by the launcher) in y.
  // Shared memory is under 48 KB: no attribute needed.
  const Launch l(dim3(static_cast<unsigned>(p.row_groups() * p.splits), static_cast<unsigned>(p.B)), kGatherThreads,
                 GatherSmem<D, R>::kBytes, stream, 1, false);
  cudaError_t err = cudaLaunchKernelEx(&l.config, sparse_gather_kernel<T, D, R>, p, static_cast<T*>(out));
  if (err == cudaSuccess && p.splits > 1) err = launch_merge<T, D>(p, out, nullptr, stream);
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

// f(D, R) as std::integral_constant values for the gather instance of head dim D and R query rows:
// one switch serves the launch and the occupancy query.
template <typename F>
auto with_gather_instance(int64_t D, int R, F f) {
  auto by_rows = [&](auto d) {
    switch (R) {
      case 1: return f(d, std::integral_constant<int, 1>{});
      case 2: return f(d, std::integral_constant<int, 2>{});
      default: return f(d, std::integral_constant<int, 4>{});
    }
  };
  switch (D) {
    case 32: return by_rows(std::integral_constant<int, 32>{});
    case 64: return by_rows(std::integral_constant<int, 64>{});
    case 128: return by_rows(std::integral_constant<int, 128>{});
    default: return by_rows(std::integral_constant<int, 256>{});
  }
}

template <typename T>
const char* launch_gather_for(const AttnParams& p, int64_t D, void* out, cudaStream_t stream) {
  return with_gather_instance(D, gather_rows(p.rows_per_group), [&](auto d, auto r) {
    return launch_gather_typed<T, decltype(d)::value, decltype(r)::value>(p, out, stream);
  });
}

template <typename T>
int gather_ctas_per_sm(int64_t D, int R) {
  return with_gather_instance(D, R, [&](auto d, auto r) {
    constexpr int kD = decltype(d)::value, kR = decltype(r)::value;
    int n = 0;
    cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, sparse_gather_kernel<T, kD, kR>, kGatherThreads,
                                                  GatherSmem<kD, kR>::kBytes);
    return n > 0 ? n : 1;
  });
}

}  // namespace tidal::kernels::cuda
