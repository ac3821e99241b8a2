// Host entry points of the CUDA kernels, framework-free and CUDA-header-free, so the torch-side
// launcher (csrc/cuda/attention_cuda.cpp) is plain C++ and every .cu file compiles without torch.
// Each launch goes on `stream` (a cudaStream_t) and returns nullptr on success or the CUDA error
// string of the launch.
#pragma once

#include <cstdint>

#include "tidal/kernels/params.h"

namespace tidal::kernels::cuda {

enum class DType { Half, BFloat16 };

// Splits of the position space for p (everything but chunk/splits/workspace set): enough CTAs to
// fill the device `device`. Sets p.chunk and p.splits.
void plan_splits(AttnParams& p, DType dtype, int64_t D, int64_t positions, int device);

// Whether select's tile kernel can count the top-k's first digits for p (planned, head mode; p.hist
// then a zeroed select_workspace_floats): a CTA's rows fit the counters, its chunk the 16-bit counts,
// a row and the grid the float counts, and the counters' shared memory costs no occupancy.
bool digits_fit(const AttnParams& p, DType dtype, int64_t D, int device);

// Zeroes `n` floats at `dst` (a multiple of 4, 16-byte aligned): select's workspace (histograms, done count),
// right before launch_attention, which then starts early and waits for the fill only where it adds
// its counts. `early` (the planned p.sm90): the fill itself starts early behind the previous kernel.
const char* launch_zero_fill(float* dst, int64_t n, bool early, void* stream);

// Attention (with p.part_o / p.part_ml allocated for p.splits) then the merge into `out`
// (contiguous [B, Hq, S, D] of dtype); lse (optional, [B * Hq * S] fp32) receives each row's logsumexp.
// out == nullptr: no merge (select's head mode merges behind its top-k).
const char* launch_attention(const AttnParams& p, DType dtype, int64_t D, void* out, float* lse, void* stream);
// Select, head mode: the merge of launch_attention's partials into `out`, launched right after the
// top-k, with which it overlaps.
const char* launch_merge_behind_topk(const AttnParams& p, DType dtype, int64_t D, void* out, void* stream);

// sparse_attention's gather kernel takes head dims 32, 64, 128, 256 and up to 4 query rows per index
// row (head mode, or group mode with G <= 4); launch_attention's tile kernel takes the rest.
bool gather_takes(int64_t D, int64_t rows_per_group);
// Splits of each index row (p.splits, p.chunk): enough CTAs to fill device `device`.
void plan_gather(AttnParams& p, DType dtype, int64_t D, int device);
// The gather kernel into `out`; p.part_o / p.part_ml must hold p.splits partials a row where
// p.splits > 1 (merged by merge_splits afterwards).
const char* launch_gather(const AttnParams& p, DType dtype, int64_t D, void* out, void* stream);

// CTAs per selection row (p.cluster) and the positions each takes (p.chunk), for device `device`.
void plan_topk(TopkParams& p, int device);

// Sorted top-k index rows from the scores select's attention wrote (p planned by plan_topk).
const char* launch_topk(const TopkParams& p, void* stream);

// correct_kv_attention's cache write.
const char* launch_write_kv(const CorrectParams& c, DType dtype, void* stream);

}  // namespace tidal::kernels::cuda
