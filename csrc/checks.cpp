#include "checks.h"

#include <cmath>
#include <limits>

#include <ATen/ops/empty.h>

#include "tidal/config.h"

namespace tidal {
namespace {

std::string describe(const at::Tensor& t) {
  return c10::str(t.dim(), "-D ", t.sizes(), " ", t.scalar_type(), " on ", t.device());
}

void check_defined(const char* op, const char* arg, const at::Tensor& t) {
  TIDAL_CHECK_ARG(t.defined(), op, arg, "a defined tensor", "an undefined tensor");
}

void check_rank(const char* op, const char* arg, const at::Tensor& t, int64_t rank, const char* layout) {
  check_defined(op, arg, t);
  TIDAL_CHECK_ARG(t.dim() == rank, op, arg, c10::str(rank, "-D ", layout), describe(t));
}

void check_dtype(const char* op, const char* arg, const at::Tensor& t, at::ScalarType dtype, const char* why) {
  TIDAL_CHECK_ARG(t.scalar_type() == dtype, op, arg, c10::str(dtype, why), t.scalar_type());
}

void check_device(const char* op, const char* arg, const at::Tensor& t, const at::Tensor& q) {
  TIDAL_CHECK_ARG(t.device() == q.device(), op, arg, c10::str("device ", q.device(), " (same as q)"),
                  t.device());
}

void check_size(const char* op, const char* arg, const at::Tensor& t, int64_t dim, int64_t expected,
                const char* name) {
  TIDAL_CHECK_ARG(t.size(dim) == expected, op, arg, c10::str(name, " = ", expected, " in dim ", dim),
                  c10::str(t.size(dim), " (shape ", t.sizes(), ")"));
}

void check_cache(const char* op, const char* arg, const at::Tensor& cache, const at::Tensor& q) {
  check_rank(op, arg, cache, 4, "[B, Hkv, N, D]");
  check_device(op, arg, cache, q);
  check_dtype(op, arg, cache, q.scalar_type(), " (same as q)");
  TIDAL_CHECK_ARG(cache.stride(3) == 1 || cache.size(3) <= 1, op, arg, "a contiguous last dim (stride 1)",
                  c10::str("stride ", cache.stride(3)));
}

// A 1-D int32 tensor of B entries on q's device (seq_lens, start).
void check_per_sequence(const char* op, const char* arg, const at::Tensor& t, const at::Tensor& q, int64_t B) {
  check_rank(op, arg, t, 1, "[B]");
  check_dtype(op, arg, t, at::kInt, "");
  check_device(op, arg, t, q);
  check_size(op, arg, t, 0, B, "B");
}

kernels::DecodeParams check_attention_inputs(const char* op, const at::Tensor& q, const at::Tensor& k_cache,
                                             const at::Tensor& v_cache,
                                             const std::optional<at::Tensor>& seq_lens,
                                             std::optional<double> scale, int64_t q_rank) {
  check_rank(op, "q", q, q_rank, q_rank == 3 ? "[B, Hq, D]" : "[B, Hq, S, D]");
  const auto dt = q.scalar_type();
  TIDAL_CHECK_ARG(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16, op, "q",
                  "dtype Float, Half or BFloat16", dt);
  check_cache(op, "k_cache", k_cache, q);
  check_cache(op, "v_cache", v_cache, q);
  TIDAL_CHECK_ARG(v_cache.sizes() == k_cache.sizes(), op, "v_cache", c10::str("shape ", k_cache.sizes(), " (as k_cache)"),
                  c10::str("shape ", v_cache.sizes()));

  kernels::DecodeParams p;
  p.B = q.size(0);
  p.Hq = q.size(1);
  p.D = q.size(-1);
  p.Hkv = k_cache.size(1);
  p.N = k_cache.size(2);
  check_size(op, "k_cache", k_cache, 0, p.B, "B (q.size(0))");
  check_size(op, "k_cache", k_cache, 3, p.D, "D (q.size(-1))");
  TIDAL_CHECK_ARG(kernels::is_supported_head_dim(p.D), op, "q", "head dim D in {32, 64, 96, 128, 256}", p.D);
  TIDAL_CHECK_ARG(p.Hq >= 1, op, "q", "at least one query head", p.Hq);
  TIDAL_CHECK_ARG(p.Hkv >= 1, op, "k_cache", "at least one KV head", p.Hkv);
  TIDAL_CHECK_ARG(p.Hq % p.Hkv == 0, op, "q", c10::str("a number of query heads divisible by the KV heads (Hkv = ", p.Hkv, ")"),
                  c10::str("Hq = ", p.Hq));
  TIDAL_CHECK_ARG(p.N <= std::numeric_limits<int32_t>::max(), op, "k_cache",
                  "a capacity N that int32 positions can index", p.N);
  if (seq_lens.has_value()) check_per_sequence(op, "seq_lens", *seq_lens, q, p.B);

  const double s = scale.has_value() ? *scale : 1.0 / std::sqrt(static_cast<double>(p.D));
  TIDAL_CHECK_ARG(std::isfinite(s), op, "scale", "a finite number", s);
  p.scale = static_cast<float>(s);
  return p;
}

// Every value of an int32 [B] tensor in [0, hi]. Reads the data: CPU tensors only (CUDA kernels
// clamp instead of syncing the host).
void check_values_in(const char* op, const char* arg, const at::Tensor& t, int64_t hi, const std::string& expected) {
  const at::Tensor c = t.contiguous();
  const int32_t* data = c.data_ptr<int32_t>();
  for (int64_t b = 0; b < c.numel(); ++b)
    TIDAL_CHECK_ARG(data[b] >= 0 && data[b] <= hi, op, arg, expected, c10::str(data[b], " at batch row ", b));
}

}  // namespace

bool check_select_args(const char* op, int64_t top_k, c10::string_view mode, int64_t sink, int64_t recent) {
  check_budget(top_k, sink, recent, op);
  return parse_select_mode(std::string(mode), op) == SelectMode::Group;
}

void check_indices(const char* op, const at::Tensor& indices, const kernels::DecodeParams& p, const at::Tensor& q) {
  check_rank(op, "indices", indices, 3, "[B, Hsel, K]");
  check_dtype(op, "indices", indices, at::kInt, "");
  check_device(op, "indices", indices, q);
  check_size(op, "indices", indices, 0, p.B, "B");
  const int64_t hsel = indices.size(1);
  TIDAL_CHECK_ARG(hsel == p.Hq || hsel == p.Hkv, op, "indices",
                  c10::str("Hsel = Hq (", p.Hq, ") or Hkv (", p.Hkv, ") in dim 1"), hsel);
}

namespace {

void check_correct_inputs(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                          const at::Tensor& start, const kernels::DecodeParams& p) {
  const int64_t S = q.size(2);
  for (const auto& [arg, t] : {std::pair<const char*, const at::Tensor&>{"k", k}, {"v", v}}) {
    check_rank(op, arg, t, 4, "[B, Hkv, S, D]");
    check_dtype(op, arg, t, q.scalar_type(), " (same as q and the caches)");
    check_device(op, arg, t, q);
    TIDAL_CHECK_ARG(t.sizes() == at::IntArrayRef({p.B, p.Hkv, S, p.D}), op, arg,
                    c10::str("shape [B, Hkv, S, D] = ", at::IntArrayRef({p.B, p.Hkv, S, p.D})), t.sizes());
  }
  check_per_sequence(op, "start", start, q, p.B);
}

at::Tensor with_contiguous_last_dim(const at::Tensor& t) {
  return (t.dim() == 0 || t.stride(-1) == 1 || t.size(-1) <= 1) ? t : t.contiguous();
}

}  // namespace

DecodeLaunch prepare_decode(const char* op, const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                            const std::optional<at::Tensor>& seq_lens, std::optional<double> scale) {
  DecodeLaunch l;
  kernels::DecodeParams& p = l.params;
  p = check_attention_inputs(op, q, k_cache, v_cache, seq_lens, scale, 3);
  if (q.is_cpu() && seq_lens.has_value())
    check_values_in(op, "seq_lens", *seq_lens, p.N, c10::str("values in [0, N = ", p.N, "]"));
  l.q = with_contiguous_last_dim(q);
  l.out = at::empty({p.B, p.Hq, p.D}, q.options());
  p.q = l.q.data_ptr();
  p.q_stride_b = l.q.stride(0);
  p.q_stride_h = l.q.stride(1);
  p.k = k_cache.data_ptr();
  p.k_stride_b = k_cache.stride(0);
  p.k_stride_h = k_cache.stride(1);
  p.k_stride_n = k_cache.stride(2);
  p.v = v_cache.data_ptr();
  p.v_stride_b = v_cache.stride(0);
  p.v_stride_h = v_cache.stride(1);
  p.v_stride_n = v_cache.stride(2);
  p.out = l.out.data_ptr();
  if (seq_lens.has_value()) {
    l.seq_lens = seq_lens->contiguous();
    p.seq_lens = l.seq_lens.data_ptr<int32_t>();
  }
  return l;
}

CorrectLaunch prepare_correct(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                              at::Tensor& k_cache, at::Tensor& v_cache, const at::Tensor& start,
                              std::optional<double> scale) {
  const kernels::DecodeParams shape = check_attention_inputs(op, q, k_cache, v_cache, std::nullopt, scale, 4);
  check_correct_inputs(op, q, k, v, start, shape);
  const int64_t S = q.size(2);
  if (q.is_cpu())
    check_values_in(op, "start", start, shape.N - S,
                    c10::str("0 <= start and start + S <= N (S = ", S, ", N = ", shape.N, ")"));
  CorrectLaunch l;
  l.q = with_contiguous_last_dim(q);
  l.k = with_contiguous_last_dim(k);
  l.v = with_contiguous_last_dim(v);
  l.start = start.contiguous();
  l.out = at::empty({shape.B, shape.Hq, S, shape.D}, q.options());
  kernels::CorrectParams& c = l.params;
  c.B = shape.B;
  c.Hq = shape.Hq;
  c.Hkv = shape.Hkv;
  c.N = shape.N;
  c.D = shape.D;
  c.S = S;
  c.scale = shape.scale;
  c.q = l.q.data_ptr();
  c.q_stride_b = l.q.stride(0);
  c.q_stride_h = l.q.stride(1);
  c.q_stride_s = l.q.stride(2);
  c.k_new = l.k.data_ptr();
  c.kn_stride_b = l.k.stride(0);
  c.kn_stride_h = l.k.stride(1);
  c.kn_stride_s = l.k.stride(2);
  c.v_new = l.v.data_ptr();
  c.vn_stride_b = l.v.stride(0);
  c.vn_stride_h = l.v.stride(1);
  c.vn_stride_s = l.v.stride(2);
  c.k = k_cache.data_ptr();
  c.k_stride_b = k_cache.stride(0);
  c.k_stride_h = k_cache.stride(1);
  c.k_stride_n = k_cache.stride(2);
  c.v = v_cache.data_ptr();
  c.v_stride_b = v_cache.stride(0);
  c.v_stride_h = v_cache.stride(1);
  c.v_stride_n = v_cache.stride(2);
  c.out = l.out.data_ptr();
  c.start = l.start.data_ptr<int32_t>();
  return l;
}

}  // namespace tidal
