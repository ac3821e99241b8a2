// CPU launchers: validate, then run the kernel units of include/tidal/kernels/cpu_attention.h in
// parallel with at::parallel_for (one unit = a sequence and a KV head or query head).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>

#include "../backends.h"
#include "../checks.h"
#include "tidal/kernels/cpu_attention.h"

namespace tidal::cpu {
namespace {

namespace k = tidal::kernels::cpu;

#define TIDAL_DISPATCH_CPU_TYPES(TYPE, NAME, ...)                 \
  AT_DISPATCH_SWITCH(TYPE, NAME, AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__) \
                                     AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__) \
                                     AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))

// Runs fn(unit, scratch) for unit in [0, units), in parallel, one scratch per chunk.
template <typename Fn>
void for_each_unit(int64_t units, const Fn& fn) {
  at::parallel_for(0, units, 1, [&](int64_t begin, int64_t end) {
    k::Scratch scratch;
    for (int64_t u = begin; u < end; ++u) fn(u, scratch);
  });
}

void run_decode(const kernels::DecodeParams& p, at::ScalarType dtype, const kernels::SelectParams* sel) {
  TIDAL_DISPATCH_CPU_TYPES(dtype, "tidal_decode_cpu", [&] {
    for_each_unit(p.B * p.Hkv, [&](int64_t u, k::Scratch& s) {
      k::decode_unit<scalar_t>(p, u / p.Hkv, u % p.Hkv, s, sel);
    });
  });
}

}  // namespace

at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                            const std::optional<at::Tensor>& seq_lens, std::optional<double> scale) {
  DecodeLaunch l = prepare_decode("decode_attention", q, k_cache, v_cache, seq_lens, scale);
  run_decode(l.params, q.scalar_type(), nullptr);
  return l.out;
}

std::tuple<at::Tensor, at::Tensor> select_attention(const at::Tensor& q, const at::Tensor& k_cache,
                                                    const at::Tensor& v_cache,
                                                    const std::optional<at::Tensor>& seq_lens, int64_t top_k,
                                                    c10::string_view mode, int64_t sink, int64_t recent,
                                                    std::optional<double> scale) {
  constexpr const char* op = "select_attention";
  const bool group = check_select_args(op, top_k, mode, sink, recent);
  DecodeLaunch l = prepare_decode(op, q, k_cache, v_cache, seq_lens, scale);
  const kernels::DecodeParams& p = l.params;
  at::Tensor indices = at::empty({p.B, group ? p.Hkv : p.Hq, top_k}, q.options().dtype(at::kInt));
  kernels::SelectParams sel{p, indices.data_ptr<int32_t>(), top_k, sink, recent, group};
  run_decode(p, q.scalar_type(), &sel);
  return {l.out, indices};
}

at::Tensor sparse_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                            const at::Tensor& indices, const std::optional<at::Tensor>& seq_lens,
                            std::optional<double> scale) {
  constexpr const char* op = "sparse_attention";
  DecodeLaunch l = prepare_decode(op, q, k_cache, v_cache, seq_lens, scale);
  check_indices(op, indices, l.params, q);
  const at::Tensor idx = indices.contiguous();
  kernels::SparseParams sp{l.params, idx.data_ptr<int32_t>(), idx.size(1), idx.size(2)};
  TIDAL_DISPATCH_CPU_TYPES(q.scalar_type(), "tidal_sparse_cpu", [&] {
    for_each_unit(sp.attn.B * sp.Hsel, [&](int64_t u, k::Scratch& s) {
      k::sparse_unit<scalar_t>(sp, u / sp.Hsel, u % sp.Hsel, s);
    });
  });
  return l.out;
}

at::Tensor correct_kv_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, at::Tensor& k_cache,
                                at::Tensor& v_cache, const at::Tensor& start, std::optional<double> scale) {
  CorrectLaunch l = prepare_correct("correct_kv_attention", q, k, v, k_cache, v_cache, start, scale);
  const kernels::CorrectParams& c = l.params;
  TIDAL_DISPATCH_CPU_TYPES(q.scalar_type(), "tidal_correct_cpu", [&] {
    // Every new row is written before any query runs: query i reads the rows of queries 0..i.
    at::parallel_for(0, c.B * c.Hkv, 1, [&](int64_t begin, int64_t end) {
      for (int64_t u = begin; u < end; ++u) k::write_kv_unit<scalar_t>(c, u / c.Hkv, u % c.Hkv);
    });
    for_each_unit(c.B * c.Hkv * c.S, [&](int64_t u, k::Scratch& s) {
      k::correct_attend_unit<scalar_t>(c, u / (c.Hkv * c.S), (u / c.S) % c.Hkv, u % c.S, s);
    });
  });
  return l.out;
}

}  // namespace tidal::cpu
