// CUDA launchers: validate (csrc/checks.h), allocate outputs and workspaces with the caching
// allocator, and launch the framework-free kernels (include/tidal/kernels/cuda_launch.h) on the
// current stream. No host synchronization and no data-dependent host logic, so every op can be
// captured in a CUDA graph. Plain C++: the CUDA specifics live in the .cu files.
#include <c10/core/DeviceGuard.h>
#include <c10/core/impl/VirtualGuardImpl.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>

#include "../backends.h"
#include "../checks.h"
#include "tidal/kernels/cuda_launch.h"

namespace tidal::cuda {
namespace {

namespace kc = tidal::kernels::cuda;

kc::DType cuda_dtype(const char* op, const at::Tensor& q) {
  const auto t = q.scalar_type();
  TIDAL_CHECK_ARG(t == at::kHalf || t == at::kBFloat16, op, "q", "dtype Half or BFloat16 on CUDA", t);
  return t == at::kHalf ? kc::DType::Half : kc::DType::BFloat16;
}

// The kernels copy K/V rows with 16-byte cp.async: each row must start 16-byte aligned.
void check_rows_aligned(const char* op, const char* arg, const at::Tensor& cache) {
  const bool ok = reinterpret_cast<uintptr_t>(cache.data_ptr()) % 16 == 0 && cache.stride(0) % 8 == 0 &&
                  cache.stride(1) % 8 == 0 && cache.stride(2) % 8 == 0;
  TIDAL_CHECK_ARG(ok, op, arg, "16-byte aligned rows on CUDA (data pointer and strides multiples of 8 elements)",
                  c10::str("strides ", cache.strides(), ", storage offset ", cache.storage_offset()));
}

// Grid limits that remain (CUDA caps grid y and z at 65535): the batch is grid z of the attention
// kernel, of the top-k kernel and of correct_kv's cache write (whose grid y is the KV heads). Row
// tiles, merge rows and top-k CTAs use grid x (2^31 - 1; a B * Hq * S * D output reaches memory
// limits first).
void check_batch_limit(const char* op, int64_t B) {
  TIDAL_CHECK_ARG(B <= 65535, op, "q", "batch B <= 65535 on CUDA (a grid dimension)", B);
}

void check_launch(const char* op, const char* err) {
  TORCH_CHECK(err == nullptr, "tidal.", op, ": CUDA kernel launch failed: ", err);
}

void* current_stream(const at::Tensor& t) {
  return c10::impl::VirtualGuardImpl(c10::DeviceType::CUDA).getStream(t.device()).native_handle();
}

// The fields DecodeParams and CorrectParams share (q, caches, shapes, scale).
template <typename Src>
kernels::AttnParams attn_params(const Src& d) {
  kernels::AttnParams p;
  p.q = d.q;
  p.q_stride_b = d.q_stride_b;
  p.q_stride_h = d.q_stride_h;
  p.k = d.k;
  p.k_stride_b = d.k_stride_b;
  p.k_stride_h = d.k_stride_h;
  p.k_stride_n = d.k_stride_n;
  p.v = d.v;
  p.v_stride_b = d.v_stride_b;
  p.v_stride_h = d.v_stride_h;
  p.v_stride_n = d.v_stride_n;
  p.B = d.B;
  p.Hq = d.Hq;
  p.Hkv = d.Hkv;
  p.N = d.N;
  p.rows_per_group = d.Hq / d.Hkv;
  p.scale = d.scale;
  return p;
}

// The split workspace: `slots` partial softmax states of D floats plus (m, l), pointed to by p. The
// tensors keep it alive until the launch is queued (the caching allocator orders reuse by stream).
struct Partials {
  at::Tensor o, ml;
};
Partials allocate_partials(kernels::AttnParams& p, int64_t slots, int64_t D, const at::Tensor& q) {
  const auto f32 = q.options().dtype(at::kFloat);
  Partials w{at::empty({slots * D}, f32), at::empty({slots * 2}, f32)};
  p.part_o = w.o.data_ptr<float>();
  p.part_ml = w.ml.data_ptr<float>();
  return w;
}

// Allocates the split workspace of p (planned) and runs attention, then the merge into `out` where
// given (else the caller queues the merge before it drops the returned workspace).
Partials run_planned_attention(const char* op, kernels::AttnParams& p, kc::DType dtype, int64_t D,
                               const at::Tensor& q, void* out, float* lse) {
  Partials partials = allocate_partials(p, p.B * p.Hq * p.S * p.splits, D, q);
  check_launch(op, kc::launch_attention(p, dtype, D, out, lse, current_stream(q)));
  return partials;
}

// Plans the splits, then runs attention + merge into `out`.
void run_attention(const char* op, kernels::AttnParams& p, kc::DType dtype, int64_t D, int64_t positions,
                   const at::Tensor& q, at::Tensor& out, float* lse) {
  kc::plan_splits(p, dtype, D, positions, q.get_device());
  run_planned_attention(op, p, dtype, D, q, out.data_ptr(), lse);
}

// Shared start of decode/select/sparse: checks, device guard, params.
struct CudaDecode {
  DecodeLaunch launch;
  kc::DType dtype;
  kernels::AttnParams params;
};

CudaDecode prepare(const char* op, const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                   const std::optional<at::Tensor>& seq_lens, std::optional<double> scale) {
  CudaDecode c{prepare_decode(op, q, k_cache, v_cache, seq_lens, scale), cuda_dtype(op, q), {}};
  check_rows_aligned(op, "k_cache", k_cache);
  check_rows_aligned(op, "v_cache", v_cache);
  check_batch_limit(op, c.launch.params.B);
  c.params = attn_params(c.launch.params);
  c.params.seq_lens = c.launch.params.seq_lens;
  return c;
}

}  // namespace

at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                            const std::optional<at::Tensor>& seq_lens, std::optional<double> scale) {
  constexpr const char* op = "decode_attention";
  const c10::DeviceGuard guard(q.device());
  CudaDecode c = prepare(op, q, k_cache, v_cache, seq_lens, scale);
  run_attention(op, c.params, c.dtype, c.launch.params.D, c.params.N, q, c.launch.out, nullptr);
  return c.launch.out;
}

std::tuple<at::Tensor, at::Tensor> select_attention(const at::Tensor& q, const at::Tensor& k_cache,
                                                    const at::Tensor& v_cache,
                                                    const std::optional<at::Tensor>& seq_lens, int64_t top_k,
                                                    c10::string_view mode, int64_t sink, int64_t recent,
                                                    std::optional<double> scale) {
  constexpr const char* op = "select_attention";
  const bool group = check_select_args(op, top_k, mode, sink, recent);
  const c10::DeviceGuard guard(q.device());
  CudaDecode c = prepare(op, q, k_cache, v_cache, seq_lens, scale);
  kernels::AttnParams& p = c.params;
  const int64_t hsel = group ? p.Hkv : p.Hq;
  kernels::TopkParams t;
  t.B = p.B;
  t.Hq = p.Hq;
  t.Hsel = hsel;
  t.N = p.N;
  kc::plan_topk(t, q.get_device());
  TIDAL_CHECK_ARG(hsel * t.cluster <= INT32_MAX, op, "q",
                  c10::str(hsel == p.Hq ? "Hq" : "Hkv", " <= ", INT32_MAX / t.cluster,
                           " selection heads on CUDA (top-k CTAs are a grid dimension)"),
                  hsel);
  const auto f32 = q.options().dtype(at::kFloat);
  p.scores_ld = (p.N + 31) / 32 * 32;  // whole 128-byte L2 lines (the top-k kernel drops them)
  at::Tensor scores = at::empty({p.B, p.Hq, p.scores_ld}, f32);
  at::Tensor lse = group ? at::empty({p.B, p.Hq}, f32) : at::Tensor();
  at::Tensor indices = at::empty({p.B, hsel, top_k}, q.options().dtype(at::kInt));
  p.scores = scores.data_ptr<float>();
  const int64_t D = c.launch.params.D;
  kc::plan_splits(p, c.dtype, D, p.N, q.get_device());
  // Head mode: the attention pass counts the top-k's first digits where it can (group mode's keys
  // need the lse), and the top-k skips its first read of the scores.
  at::Tensor hist;
  if (!group && kc::digits_fit(p, c.dtype, D, q.get_device())) {
    hist = at::empty({kernels::select_workspace_floats(p.B, p.Hq)}, f32);
    p.hist = hist.data_ptr<float>();
    check_launch(op, kc::launch_zero_fill(p.hist, hist.numel(), p.sm90, current_stream(q)));
    p.sink = sink;
    p.tail = kernels::forced_tail(recent);
  }
  // Group mode merges before the top-k (its keys need the lse); head mode's merge runs beside it.
  const Partials partials = run_planned_attention(op, p, c.dtype, D, q, group ? c.launch.out.data_ptr() : nullptr,
                                                  group ? lse.data_ptr<float>() : nullptr);

  t.scores = scores.data_ptr<float>();
  t.lse = group ? lse.data_ptr<float>() : nullptr;
  t.hist = p.hist;
  t.done_target = p.hist != nullptr ? static_cast<int>(p.tile_ctas()) : 0;
  t.seq_lens = p.seq_lens;
  t.indices = indices.data_ptr<int32_t>();
  t.ld = p.scores_ld;
  t.top_k = top_k;
  t.sink = sink;
  t.recent = recent;
  check_launch(op, kc::launch_topk(t, current_stream(q)));
  if (!group)
    check_launch(op, kc::launch_merge_behind_topk(p, c.dtype, D, c.launch.out.data_ptr(), current_stream(q)));
  return {c.launch.out, indices};
}

at::Tensor sparse_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                            const at::Tensor& indices, const std::optional<at::Tensor>& seq_lens,
                            std::optional<double> scale) {
  constexpr const char* op = "sparse_attention";
  const c10::DeviceGuard guard(q.device());
  CudaDecode c = prepare(op, q, k_cache, v_cache, seq_lens, scale);
  check_indices(op, indices, c.launch.params, q);
  const at::Tensor idx = indices.contiguous();
  kernels::AttnParams& p = c.params;
  p.indices = idx.data_ptr<int32_t>();
  p.K = idx.size(2);
  p.rows_per_group = idx.size(1) == p.Hq ? 1 : p.Hq / p.Hkv;  // a row per query head or per KV head
  const int64_t D = c.launch.params.D;
  if (!kc::gather_takes(D, p.rows_per_group)) {
    run_attention(op, p, c.dtype, D, p.K, q, c.launch.out, nullptr);
    return c.launch.out;
  }
  kc::plan_gather(p, c.dtype, D, q.get_device());
  const Partials partials = allocate_partials(p, p.splits == 1 ? 0 : p.B * p.Hq * p.splits, D, q);
  check_launch(op, kc::launch_gather(p, c.dtype, D, c.launch.out.data_ptr(), current_stream(q)));
  return c.launch.out;
}

at::Tensor correct_kv_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, at::Tensor& k_cache,
                                at::Tensor& v_cache, const at::Tensor& start, std::optional<double> scale) {
  constexpr const char* op = "correct_kv_attention";
  const c10::DeviceGuard guard(q.device());
  CorrectLaunch l = prepare_correct(op, q, k, v, k_cache, v_cache, start, scale);
  const kc::DType dtype = cuda_dtype(op, q);
  check_rows_aligned(op, "k_cache", k_cache);
  check_rows_aligned(op, "v_cache", v_cache);
  const kernels::CorrectParams& w = l.params;
  check_batch_limit(op, w.B);  // before the cache write, the first launch
  TIDAL_CHECK_ARG(w.Hkv <= 65535, op, "k_cache", "Hkv <= 65535 KV heads on CUDA (a grid dimension)", w.Hkv);
  void* stream = current_stream(q);
  check_launch(op, kc::launch_write_kv(w, dtype, stream));

  kernels::AttnParams p = attn_params(w);
  p.q_stride_s = w.q_stride_s;  // S queries per head, each attending causally up to start + i
  p.start = w.start;
  p.S = w.S;
  run_attention(op, p, dtype, w.D, w.N, q, l.out, nullptr);
  return l.out;
}

}  // namespace tidal::cuda
