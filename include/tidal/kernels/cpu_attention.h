// CPU kernels of the tidal ops, framework-free: templated on the element type T, which only needs
// conversions to and from float (float, c10::Half and c10::BFloat16 all have them). Each function
// handles one unit of work (a sequence and one KV head, or one query head); the launcher in
// csrc/cpu runs the units in parallel. All arithmetic is float32.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <vector>

#include "tidal/kernels/params.h"

namespace tidal::kernels::cpu {

inline float dot(const float* a, const float* b, int64_t n) {
  // Eight partial sums let the compiler vectorize without reassociation flags.
  float part[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    for (int j = 0; j < 8; ++j) part[j] += a[i + j] * b[i + j];
  float sum = ((part[0] + part[1]) + (part[2] + part[3])) + ((part[4] + part[5]) + (part[6] + part[7]));
  for (; i < n; ++i) sum += a[i] * b[i];
  return sum;
}

// A row of D elements as float: a pointer into the data itself for float, a converted copy otherwise.
template <typename T>
inline const float* as_float(const T* row, int64_t D, float* buf) {
  if constexpr (std::is_same_v<T, float>) {
    return row;
  } else {
    for (int64_t d = 0; d < D; ++d) buf[d] = static_cast<float>(row[d]);
    return buf;
  }
}

// Ordering used for selection: higher score first, NaN above every number, ties to the lower
// position. A strict weak order even with NaN, so std::nth_element stays well defined.
inline bool ranks_before(const float* score, int32_t a, int32_t b) {
  const float sa = score[a], sb = score[b];
  const bool na = std::isnan(sa), nb = std::isnan(sb);
  if (na != nb) return na;
  if (!na && sa != sb) return sa > sb;
  return a < b;
}

// Scratch for one unit of work, reused across units of a thread.
struct Scratch {
  std::vector<float> q, row, scores, acc;
  std::vector<int32_t> candidates;
};

// Attention of G queries (qf: G x D floats, already loaded) over `count` cache rows of one KV head:
// row j is position pos[j] (or j when pos is null). Writes scale*q.k into scores (G x count), the
// softmax-weighted V rows into out_h(h) for each head h, and logsumexp per head into lse (if not null).
// count == 0 writes zeros (and lse = -inf).
template <typename T, typename OutFn>
void attend(const float* qf, int64_t G, const int32_t* pos, int64_t count, const T* k, int64_t k_stride_n,
            const T* v, int64_t v_stride_n, int64_t D, float scale, Scratch& s, OutFn out_h,
            float* lse = nullptr) {
  s.scores.resize(static_cast<size_t>(G * count));
  s.acc.assign(static_cast<size_t>(G * D), 0.f);
  s.row.resize(static_cast<size_t>(D));
  float* scores = s.scores.data();
  for (int64_t j = 0; j < count; ++j) {
    const int64_t t = pos ? pos[j] : j;
    const float* kr = as_float(k + t * k_stride_n, D, s.row.data());
    for (int64_t h = 0; h < G; ++h) scores[h * count + j] = scale * dot(qf + h * D, kr, D);
  }
  // Softmax per head; scores keep scale*q.k (the selection needs them), probabilities are recomputed.
  std::vector<float> m(G), inv_sum(G);
  for (int64_t h = 0; h < G; ++h) {
    const float* sh = scores + h * count;
    float mx = -std::numeric_limits<float>::infinity();
    bool nan = false;
    for (int64_t j = 0; j < count; ++j) {
      nan |= std::isnan(sh[j]);
      mx = std::max(mx, sh[j]);
    }
    if (nan) mx = std::numeric_limits<float>::quiet_NaN();  // propagate like torch.softmax
    float sum = 0.f;
    for (int64_t j = 0; j < count; ++j) sum += std::exp(sh[j] - mx);
    m[h] = mx;
    inv_sum[h] = count > 0 ? 1.f / sum : 0.f;
    if (lse) lse[h] = count > 0 ? mx + std::log(sum) : -std::numeric_limits<float>::infinity();
  }
  for (int64_t j = 0; j < count; ++j) {
    const int64_t t = pos ? pos[j] : j;
    const float* vr = as_float(v + t * v_stride_n, D, s.row.data());
    for (int64_t h = 0; h < G; ++h) {
      const float p = std::exp(scores[h * count + j] - m[h]) * inv_sum[h];
      float* a = s.acc.data() + h * D;
      for (int64_t d = 0; d < D; ++d) a[d] += p * vr[d];
    }
  }
  for (int64_t h = 0; h < G; ++h) {
    T* o = out_h(h);
    const float* a = s.acc.data() + h * D;
    for (int64_t d = 0; d < D; ++d) o[d] = static_cast<T>(a[d]);
  }
}

// Loads G consecutive query rows (row stride q_stride_h) into s.q as floats.
template <typename T>
const float* load_queries(const T* q, int64_t G, int64_t q_stride_h, int64_t D, Scratch& s) {
  s.q.resize(static_cast<size_t>(G * D));
  for (int64_t h = 0; h < G; ++h)
    for (int64_t d = 0; d < D; ++d) s.q[h * D + d] = static_cast<float>(q[h * q_stride_h + d]);
  return s.q.data();
}

// Picks the budget from rank scores over positions 0..L-1 and writes one sorted row of top_k entries.
inline void select_row(const float* score, int64_t L, int64_t top_k, int64_t sink, int64_t recent,
                       int32_t* out, std::vector<int32_t>& candidates) {
  int64_t n = 0;
  if (L <= top_k) {
    for (; n < L; ++n) out[n] = static_cast<int32_t>(n);
  } else {
    // sink + max(recent, 1) <= top_k < L, so the forced ranges [0, sink) and [L - tail, L) are
    // disjoint and more candidates than free slots lie between them.
    const int64_t tail = forced_tail(recent);
    const int64_t free_slots = top_k - sink - tail;
    candidates.clear();
    for (int64_t t = sink; t < L - tail; ++t) candidates.push_back(static_cast<int32_t>(t));
    auto before = [score](int32_t a, int32_t b) { return ranks_before(score, a, b); };
    std::nth_element(candidates.begin(), candidates.begin() + free_slots, candidates.end(), before);
    std::sort(candidates.begin(), candidates.begin() + free_slots);
    for (int64_t t = 0; t < sink; ++t) out[n++] = static_cast<int32_t>(t);
    for (int64_t i = 0; i < free_slots; ++i) out[n++] = candidates[i];
    for (int64_t t = L - tail; t < L; ++t) out[n++] = static_cast<int32_t>(t);
  }
  for (; n < top_k; ++n) out[n] = -1;
}

// decode_attention / select_attention for sequence b and KV head g (all G query heads of the group).
template <typename T>
void decode_unit(const DecodeParams& p, int64_t b, int64_t g, Scratch& s, const SelectParams* sel) {
  const int64_t G = p.group_size(), D = p.D, L = p.seq_len(b);
  const T* q = static_cast<const T*>(p.q) + b * p.q_stride_b + g * G * p.q_stride_h;
  const T* k = static_cast<const T*>(p.k) + b * p.k_stride_b + g * p.k_stride_h;
  const T* v = static_cast<const T*>(p.v) + b * p.v_stride_b + g * p.v_stride_h;
  T* out = static_cast<T*>(p.out) + (b * p.Hq + g * G) * D;
  std::vector<float> lse(G);
  attend<T>(load_queries(q, G, p.q_stride_h, D, s), G, nullptr, L, k, p.k_stride_n, v, p.v_stride_n, D,
            p.scale, s, [&](int64_t h) { return out + h * D; }, lse.data());
  if (sel == nullptr) return;
  const float* scores = s.scores.data();
  if (!sel->group_mode) {
    for (int64_t h = 0; h < G; ++h)
      select_row(scores + h * L, L, sel->top_k, sel->sink, sel->recent,
                 sel->indices + ((b * p.Hq) + g * G + h) * sel->top_k, s.candidates);
  } else {
    // Group rank: the largest log-probability any query head of the group gives the token.
    std::vector<float> rank(static_cast<size_t>(L), -std::numeric_limits<float>::infinity());
    for (int64_t h = 0; h < G; ++h)
      for (int64_t t = 0; t < L; ++t) {
        const float x = scores[h * L + t] - lse[h];
        if (!std::isnan(rank[t]) && (std::isnan(x) || x > rank[t])) rank[t] = x;  // NaN sticks
      }
    select_row(rank.data(), L, sel->top_k, sel->sink, sel->recent,
               sel->indices + (b * p.Hkv + g) * sel->top_k, s.candidates);
  }
}

// Keeps the entries of an index row that are valid positions (0 <= t < L), in order.
inline int64_t valid_positions(const int32_t* row, int64_t K, int64_t L, std::vector<int32_t>& pos) {
  pos.clear();
  for (int64_t i = 0; i < K; ++i)
    if (row[i] >= 0 && row[i] < L) pos.push_back(row[i]);
  return static_cast<int64_t>(pos.size());
}

// sparse_attention for sequence b and index row r: a query head (Hsel == Hq, one head) or a KV head
// (all G query heads of the group share the row, so each K/V row is loaded once for them).
template <typename T>
void sparse_unit(const SparseParams& sp, int64_t b, int64_t r, Scratch& s) {
  const DecodeParams& p = sp.attn;
  const bool per_head = sp.Hsel == p.Hq;
  const int64_t G = per_head ? 1 : p.group_size(), D = p.D;
  const int64_t g = per_head ? r / p.group_size() : r, h0 = per_head ? r : r * G;
  const int64_t count = valid_positions(sp.indices + (b * sp.Hsel + r) * sp.K, sp.K, p.seq_len(b), s.candidates);
  const T* q = static_cast<const T*>(p.q) + b * p.q_stride_b + h0 * p.q_stride_h;
  const T* k = static_cast<const T*>(p.k) + b * p.k_stride_b + g * p.k_stride_h;
  const T* v = static_cast<const T*>(p.v) + b * p.v_stride_b + g * p.v_stride_h;
  T* out = static_cast<T*>(p.out) + (b * p.Hq + h0) * D;
  attend<T>(load_queries(q, G, p.q_stride_h, D, s), G, s.candidates.data(), count, k, p.k_stride_n, v,
            p.v_stride_n, D, p.scale, s, [&](int64_t h) { return out + h * D; });
}

// correct_kv_attention, first phase: copy the S new K/V rows of (b, g) into the caches.
template <typename T>
void write_kv_unit(const CorrectParams& c, int64_t b, int64_t g) {
  const int64_t start = c.start[b];
  for (int64_t i = 0; i < c.S; ++i) {
    const T* kn = static_cast<const T*>(c.k_new) + b * c.kn_stride_b + g * c.kn_stride_h + i * c.kn_stride_s;
    const T* vn = static_cast<const T*>(c.v_new) + b * c.vn_stride_b + g * c.vn_stride_h + i * c.vn_stride_s;
    T* k = static_cast<T*>(c.k) + b * c.k_stride_b + g * c.k_stride_h + (start + i) * c.k_stride_n;
    T* v = static_cast<T*>(c.v) + b * c.v_stride_b + g * c.v_stride_h + (start + i) * c.v_stride_n;
    std::copy(kn, kn + c.D, k);
    std::copy(vn, vn + c.D, v);
  }
}

// correct_kv_attention, second phase: query i of sequence b, KV head g, all G heads, attends to
// positions 0 .. start[b] + i of the (already written) cache.
template <typename T>
void correct_attend_unit(const CorrectParams& c, int64_t b, int64_t g, int64_t i, Scratch& s) {
  const int64_t G = c.Hq / c.Hkv, D = c.D;
  const T* q = static_cast<const T*>(c.q) + b * c.q_stride_b + g * G * c.q_stride_h + i * c.q_stride_s;
  const T* k = static_cast<const T*>(c.k) + b * c.k_stride_b + g * c.k_stride_h;
  const T* v = static_cast<const T*>(c.v) + b * c.v_stride_b + g * c.v_stride_h;
  T* out = static_cast<T*>(c.out) + ((b * c.Hq + g * G) * c.S + i) * D;
  attend<T>(load_queries(q, G, c.q_stride_h, D, s), G, nullptr, c.start[b] + i + 1, k, c.k_stride_n, v,
            c.v_stride_n, D, c.scale, s, [&](int64_t h) { return out + h * c.S * D; });
}

}  // namespace tidal::kernels::cpu
