// The four tidal ops through the public C++ API (tidal/ops.h) on CPU.
//
// Most cases are designed by hand so the expected result is known without another implementation:
// D = 32, queries and keys are (scaled) unit vectors so every score q.k is chosen directly, and V
// rows are one-hot so the output spells out the softmax weights. Tokens that must not be attended
// hold NaN (or huge scores) so that reading them would show in the output.
#include <cmath>
#include <vector>

#include <gtest/gtest.h>

#include "test_util.h"
#include "tidal/config.h"
#include "tidal/ops.h"

namespace {

using namespace tidal_test;

// ---------------------------------------------------------------------------------------------
// Builders

// Zero caches [B, Hkv, N, D] for keys and values.
struct Caches {
  at::Tensor k, v;
  Caches(int64_t B, int64_t Hkv, int64_t N, int64_t D = kD) : k(at::zeros({B, Hkv, N, D})), v(at::zeros({B, Hkv, N, D})) {}
  void set(int64_t b, int64_t g, int64_t t, const at::Tensor& key, const at::Tensor& value) {
    k[b][g][t].copy_(key);
    v[b][g][t].copy_(value);
  }
  // Poisons positions [from, N) of row (b, g) with NaN keys and values.
  void poison(int64_t b, int64_t g, int64_t from) {
    k[b][g].slice(0, from).fill_(kNaN);
    v[b][g].slice(0, from).fill_(kNaN);
  }
};

// Queries [B, H, D] from one D-vector per (b, h).
at::Tensor queries(const std::vector<std::vector<at::Tensor>>& rows) {
  std::vector<at::Tensor> per_batch;
  for (const auto& r : rows) per_batch.push_back(at::stack(r));
  return at::stack(per_batch);
}

// Head-mode selection setup: one head, q = e0 and key t = s[t] * e0, so with scale 1 the score of
// token t is exactly s[t]. Values are all 3 * e5, so the attention output is 3 * e5 whatever the weights.
struct ScoredCache {
  at::Tensor q;
  Caches c;
  explicit ScoredCache(const std::vector<float>& s, int64_t B = 1) : q(at::zeros({B, 1, kD})), c(B, 1, s.size()) {
    q.select(2, 0).fill_(1.0);
    for (int64_t b = 0; b < B; ++b)
      for (size_t t = 0; t < s.size(); ++t) c.set(b, 0, t, unit(0, s[t]), unit(5, 3.0));
  }
  // The indices of head-mode selection over all tokens.
  at::Tensor select(int64_t top_k, int64_t sink = 0, int64_t recent = 0) const {
    return std::get<1>(tidal::select_attention(q, c.k, c.v, std::nullopt, top_k, "head", sink, recent, 1.0));
  }
};

// The scores of the selection tests: the newest token (7) scores lowest, token 0 low too.
const std::vector<float> kScores = {-5, 1, 7, 0, 6, 2, -3, -10};

// ---------------------------------------------------------------------------------------------
// decode_attention

// Scores ln 3 and 0 give softmax weights 3/4 and 1/4; one-hot V rows make them the output.
TEST(DecodeAttention, KnownSoftmaxWeights) {
  Caches c(1, 1, 2);
  c.set(0, 0, 0, unit(0, std::log(3.0)), unit(0));
  c.set(0, 0, 1, unit(0, 0.0), unit(1));
  const at::Tensor out = tidal::decode_attention(unit(0).reshape({1, 1, kD}), c.k, c.v, std::nullopt, 1.0);
  EXPECT_TRUE(near(out, vec({{0, 0.75}, {1, 0.25}}).reshape({1, 1, kD}), 1e-6));
}

// scale = nullopt means 1/sqrt(D): a key of ln3 * sqrt(32) * e0 scores ln 3 again.
TEST(DecodeAttention, DefaultScaleIsInvSqrtD) {
  Caches c(1, 1, 2);
  c.set(0, 0, 0, unit(0, std::log(3.0) * std::sqrt(double(kD))), unit(0));
  c.set(0, 0, 1, unit(0, 0.0), unit(1));
  const at::Tensor out = tidal::decode_attention(unit(0).reshape({1, 1, kD}), c.k, c.v);
  EXPECT_TRUE(near(out, vec({{0, 0.75}, {1, 0.25}}).reshape({1, 1, kD}), 1e-6));
}

// Two tokens with equal scores and a third far below (weight underflows to 0) -> the average of
// the two V rows.
TEST(DecodeAttention, EqualScoresAverageTheirValues) {
  Caches c(1, 1, 3);
  c.set(0, 0, 0, unit(0, 5.0), unit(3, 2.0));
  c.set(0, 0, 1, unit(0, -100.0), unit(4, 1000.0));
  c.set(0, 0, 2, unit(0, 5.0), unit(3, 4.0));
  const at::Tensor out = tidal::decode_attention(unit(0).reshape({1, 1, kD}), c.k, c.v, std::nullopt, 1.0);
  EXPECT_TRUE(near(out, unit(3, 3.0).reshape({1, 1, kD}), 1e-6));
}

// GQA: query head h reads KV head h / G (G = Hq / Hkv = 2), not h % Hkv. Keys e0, e1 scaled by 50;
// head h's query picks token h % 2; KV head g's values are (10 g + t + 1) e_t.
TEST(DecodeAttention, GroupedQueryHeadsReadTheirKvHead) {
  Caches c(1, 2, 2);
  for (int64_t g = 0; g < 2; ++g)
    for (int64_t t = 0; t < 2; ++t) c.set(0, g, t, unit(t, 50.0), unit(t, 10.0 * g + t + 1));
  const at::Tensor q = queries({{unit(0), unit(1), unit(0), unit(1)}});
  const at::Tensor out = tidal::decode_attention(q, c.k, c.v, std::nullopt, 1.0);
  const at::Tensor expected = queries({{unit(0, 1), unit(1, 2), unit(0, 11), unit(1, 12)}});
  EXPECT_TRUE(near(out, expected, 1e-5));
}

// Per-row lengths: tokens >= seq_len (NaN here) are never read; seq_len 0 gives zeros.
// Zero keys give uniform weights over the valid tokens, one-hot values show which ones.
TEST(DecodeAttention, SeqLensLimitEachRow) {
  Caches c(3, 1, 4);
  for (int64_t b = 0; b < 3; ++b)
    for (int64_t t = 0; t < 4; ++t) c.set(b, 0, t, unit(0, 0.0), unit(t));
  c.poison(0, 0, 2);
  c.poison(2, 0, 0);
  const at::Tensor q = at::ones({3, 1, kD});
  const at::Tensor out = tidal::decode_attention(q, c.k, c.v, ints({2, 4, 0}), 1.0);
  const at::Tensor expected = queries({{vec({{0, 0.5}, {1, 0.5}})},
                                       {vec({{0, 0.25}, {1, 0.25}, {2, 0.25}, {3, 0.25}})},
                                       {vec({})}});
  EXPECT_TRUE(near(out, expected, 1e-6));
}

// seq_lens = nullopt means every row uses all N tokens.
TEST(DecodeAttention, NoSeqLensMeansFullCache) {
  Caches c(1, 1, 4);
  for (int64_t t = 0; t < 4; ++t) c.set(0, 0, t, unit(0, 0.0), unit(t));
  const at::Tensor out = tidal::decode_attention(at::ones({1, 1, kD}), c.k, c.v);
  EXPECT_TRUE(near(out, vec({{0, 0.25}, {1, 0.25}, {2, 0.25}, {3, 0.25}}).reshape({1, 1, kD}), 1e-6));
}

// The output is a fresh contiguous [B, Hq, D] tensor in q's dtype, also for B = 0.
TEST(DecodeAttention, OutputShapeAndDtype) {
  for (at::ScalarType dt : {at::kFloat, at::kHalf, at::kBFloat16}) {
    SCOPED_TRACE(c10::toString(dt));
    const at::Tensor q = at::randn({2, 4, 64}).to(dt), k = at::randn({2, 2, 5, 64}).to(dt);
    const at::Tensor out = tidal::decode_attention(q, k, k);
    EXPECT_EQ(out.sizes(), q.sizes());
    EXPECT_EQ(out.scalar_type(), dt);
    EXPECT_TRUE(out.is_contiguous());
  }
  const at::Tensor empty = tidal::decode_attention(at::zeros({0, 4, 64}), at::zeros({0, 2, 5, 64}),
                                                   at::zeros({0, 2, 5, 64}));
  EXPECT_EQ(empty.sizes(), (std::vector<int64_t>{0, 4, 64}));
}

// ---------------------------------------------------------------------------------------------
// select_attention, head mode (scores s[t] from kScores)

// top_k 4: the newest token 7 is forced in although it scores lowest (-10); the other three
// slots go to the best of tokens 0..6: 7 (token 2), 6 (token 4), 2 (token 5). Ascending order.
TEST(SelectAttention, TopKKeepsNewestToken) {
  const ScoredCache sc(kScores);
  const auto [out, idx] = tidal::select_attention(sc.q, sc.c.k, sc.c.v, std::nullopt, 4, "head", 0, 0, 1.0);
  EXPECT_EQ(idx.sizes(), (std::vector<int64_t>{1, 1, 4}));
  EXPECT_EQ(idx.scalar_type(), at::kInt);
  EXPECT_TRUE(idx.is_contiguous());
  EXPECT_EQ(rows_of(idx[0]), (std::vector<std::vector<int32_t>>{{2, 4, 5, 7}}));
  // The attention output is the full attention output: all V rows are 3 e5.
  EXPECT_TRUE(near(out, unit(5, 3.0).reshape({1, 1, kD}), 1e-5));
}

// sink 1 forces token 0 (score -5), recent 2 forces tokens 6, 7; the 2 free slots go to the best
// of tokens 1..5: 2 and 4.
TEST(SelectAttention, SinkAndRecentAreForcedInsideBudget) {
  const ScoredCache sc(kScores);
  EXPECT_EQ(rows_of(sc.select(5, 1, 2)[0]), (std::vector<std::vector<int32_t>>{{0, 2, 4, 6, 7}}));
  // recent 3 alone: 5, 6, 7 forced, one free slot -> token 2.
  EXPECT_EQ(rows_of(sc.select(4, 0, 3)[0]), (std::vector<std::vector<int32_t>>{{2, 5, 6, 7}}));
  // sink 2 + newest fill top_k 3: no free slot is left for the best tokens.
  EXPECT_EQ(rows_of(sc.select(3, 2, 0)[0]), (std::vector<std::vector<int32_t>>{{0, 1, 7}}));
  // top_k 1: only the newest token.
  EXPECT_EQ(rows_of(sc.select(1)[0]), (std::vector<std::vector<int32_t>>{{7}}));
}

// seq_len < top_k: every valid token, then -1; == top_k: all; top_k + 1: the newest (5) plus the
// best four of 0..4 (all but token 0, score -5); 0: all -1 and a zero output.
TEST(SelectAttention, ShortSequencesArePaddedWithMinusOne) {
  const ScoredCache sc(kScores, 4);
  const auto [out, idx] = tidal::select_attention(sc.q, sc.c.k, sc.c.v, ints({3, 5, 6, 0}), 5, "head", 0, 0, 1.0);
  EXPECT_EQ(rows_of(idx.select(1, 0)), (std::vector<std::vector<int32_t>>{
                                           {0, 1, 2, -1, -1}, {0, 1, 2, 3, 4}, {1, 2, 3, 4, 5}, {-1, -1, -1, -1, -1}}));
  const at::Tensor expected = queries({{unit(5, 3)}, {unit(5, 3)}, {unit(5, 3)}, {vec({})}});
  EXPECT_TRUE(near(out, expected, 1e-5));
}

// top_k larger than the cache capacity: every token, the rest of the row -1.
TEST(SelectAttention, TopKAboveCapacity) {
  const ScoredCache sc({1, 2, 3});
  EXPECT_EQ(rows_of(sc.select(6)[0]), (std::vector<std::vector<int32_t>>{{0, 1, 2, -1, -1, -1}}));
}

// Equal scores prefer the lower position; NaN ranks above every number.
TEST(SelectAttention, TiesPreferLowerPositionAndNaNRanksFirst) {
  EXPECT_EQ(rows_of(ScoredCache({1, 1, 1, 1, 0}).select(3)[0]), (std::vector<std::vector<int32_t>>{{0, 1, 4}}));
  EXPECT_EQ(rows_of(ScoredCache({0, kNaN, 5, 0, 0}).select(2)[0]), (std::vector<std::vector<int32_t>>{{1, 4}}));
}

// Head vs group selection where the two query heads of a KV group prefer different tokens.
// KV head 0: key t = a_t e0 + b_t e1 with a = (10, 0, 0, 0), b = (0, 20, 19, 0);
// KV head 1: a = (0, 0, 10, 0), same b. Query heads 0, 2 are e0 (score a_t), heads 1, 3 are e1 (b_t).
// Log-softmax per head: for a = (10, 0, 0, 0) token 0 gets -log(1 + 3e-10) ~ -1.4e-4; for b token 1
// gets -log(1 + e^-1 + 2e^-20) ~ -0.313 and token 2 ~ -1.313. So group 0 ranks token 0 first
// (although head 1's raw score 20 for token 1 is the largest score), then token 1; group 1 ranks
// token 2 (-1.4e-4 from head 2) first, then token 1.
struct TwoHeadGroups {
  Caches c{1, 2, 4};
  at::Tensor q = queries({{unit(0), unit(1), unit(0), unit(1)}});
  TwoHeadGroups() {
    const float b[] = {0, 20, 19, 0};
    for (int64_t t = 0; t < 4; ++t) {
      c.set(0, 0, t, unit(0, t == 0 ? 10 : 0) + unit(1, b[t]), unit(t));
      c.set(0, 1, t, unit(0, t == 2 ? 10 : 0) + unit(1, b[t]), unit(t));
    }
  }
};

TEST(SelectAttention, HeadModeRanksEachQueryHead) {
  const TwoHeadGroups s;
  const auto [out, idx] = tidal::select_attention(s.q, s.c.k, s.c.v, std::nullopt, 2, "head", 0, 0, 1.0);
  EXPECT_EQ(rows_of(idx[0]), (std::vector<std::vector<int32_t>>{{0, 3}, {1, 3}, {2, 3}, {1, 3}}));
}

TEST(SelectAttention, GroupModeRanksByMaxLogSoftmaxOverHeads) {
  const TwoHeadGroups s;
  const auto [out2, idx2] = tidal::select_attention(s.q, s.c.k, s.c.v, std::nullopt, 2, "group", 0, 0, 1.0);
  EXPECT_EQ(idx2.sizes(), (std::vector<int64_t>{1, 2, 2}));  // [B, Hkv, top_k]
  EXPECT_EQ(rows_of(idx2[0]), (std::vector<std::vector<int32_t>>{{0, 3}, {2, 3}}));
  const auto [out3, idx3] = tidal::select_attention(s.q, s.c.k, s.c.v, std::nullopt, 3, "group", 0, 0, 1.0);
  EXPECT_EQ(rows_of(idx3[0]), (std::vector<std::vector<int32_t>>{{0, 1, 3}, {1, 2, 3}}));
}

// Group mode with a padding row (seq_len 0): indices all -1 and a zero output.
TEST(SelectAttention, GroupModeZeroLengthRow) {
  Caches c(2, 1, 4);
  c.poison(1, 0, 0);
  const at::Tensor q = at::ones({2, 2, kD});
  const auto [out, idx] = tidal::select_attention(q, c.k, c.v, ints({4, 0}), 3, "group", 0, 0, 1.0);
  EXPECT_EQ(rows_of(idx.select(1, 0)), (std::vector<std::vector<int32_t>>{{0, 1, 3}, {-1, -1, -1}}));
  EXPECT_TRUE(near(out[1], at::zeros({2, kD}), 0.0));
}

// Default arguments: top_k 2048, mode "head" -> indices [B, Hq, 2048].
TEST(SelectAttention, DefaultArguments) {
  const ScoredCache sc(kScores);
  const auto [out, idx] = tidal::select_attention(sc.q, sc.c.k, sc.c.v);
  EXPECT_EQ(idx.sizes(), (std::vector<int64_t>{1, 1, 2048}));
  EXPECT_EQ(idx[0][0].slice(0, 0, 8).equal(at::arange(8, at::kInt)), true);
  EXPECT_TRUE((idx[0][0].slice(0, 8) == -1).all().item<bool>());
}

// ---------------------------------------------------------------------------------------------
// sparse_attention

// Caches for the sparse tests: zero keys (uniform weights over the attended positions), values
// (g + 1) e_t for KV head g, NaN keys and values at positions >= len.
Caches sparse_caches(int64_t Hkv, int64_t N, int64_t len) {
  Caches c(1, Hkv, N);
  for (int64_t g = 0; g < Hkv; ++g) {
    for (int64_t t = 0; t < N; ++t) c.set(0, g, t, unit(0, 0.0), unit(t, g + 1.0));
    c.poison(0, g, len);
  }
  return c;
}

// Hsel == Hq: query head h uses row h. -1, negative, >= seq_len (NaN there) and >= N entries
// are skipped, so each head averages the values of its valid listed positions.
TEST(SparseAttention, PerHeadRowsSkipInvalidEntries) {
  const Caches c = sparse_caches(1, 8, 5);
  const at::Tensor q = at::ones({1, 2, kD});
  const at::Tensor idx = index_rows({{{0, 2, -1, 5, 100}, {1, -5, 3, 4, 7}}});
  const at::Tensor out = tidal::sparse_attention(q, c.k, c.v, idx, ints({5}), 1.0);
  const double third = 1.0 / 3;
  const at::Tensor expected = queries({{vec({{0, 0.5}, {2, 0.5}}), vec({{1, third}, {3, third}, {4, third}})}});
  EXPECT_TRUE(near(out, expected, 1e-6));
}

// Only listed positions are attended: unlisted token 1 has a huge score but gets no weight,
// and the listed ones keep their relative softmax weights (scores ln 3 and 0 -> 3/4, 1/4).
TEST(SparseAttention, AttendsOnlyListedPositions) {
  Caches c(1, 1, 4);
  c.set(0, 0, 0, unit(0, std::log(3.0)), unit(0));
  c.set(0, 0, 1, unit(0, 50.0), unit(1));
  c.set(0, 0, 2, unit(0, 0.0), unit(2));
  c.set(0, 0, 3, unit(0, 50.0), unit(3));
  const at::Tensor out = tidal::sparse_attention(unit(0).reshape({1, 1, kD}), c.k, c.v, index_rows({{{2, 0}}}),
                                                 std::nullopt, 1.0);
  EXPECT_TRUE(near(out, vec({{0, 0.75}, {2, 0.25}}).reshape({1, 1, kD}), 1e-6));
}

// Hsel == Hkv (group rows): every query head of KV group g uses row g (heads 0, 1 -> row 0;
// heads 2, 3 -> row 1) and the values of KV head g ((g + 1) e_t).
TEST(SparseAttention, GroupRowsAreSharedByTheGroupsHeads) {
  const Caches c = sparse_caches(2, 6, 6);
  const at::Tensor q = at::ones({1, 4, kD});
  const at::Tensor idx = index_rows({{{0, 1, -1}, {2, 3, 4}}});
  const at::Tensor out = tidal::sparse_attention(q, c.k, c.v, idx, std::nullopt, 1.0);
  const at::Tensor g0 = vec({{0, 0.5}, {1, 0.5}}), g1 = vec({{2, 2.0 / 3}, {3, 2.0 / 3}, {4, 2.0 / 3}});
  EXPECT_TRUE(near(out, queries({{g0, g0, g1, g1}}), 1e-6));
}

// The same index tensor read per head when Hsel == Hq == 4 with Hkv = 2: row h for head h.
TEST(SparseAttention, PerHeadRowsWithGqa) {
  const Caches c = sparse_caches(2, 6, 6);
  const at::Tensor q = at::ones({1, 4, kD});
  const at::Tensor idx = index_rows({{{0, -1}, {1, -1}, {2, 3}, {5, 5}}});
  const at::Tensor out = tidal::sparse_attention(q, c.k, c.v, idx, std::nullopt, 1.0);
  const at::Tensor expected =
      queries({{unit(0), unit(1), vec({{2, 1.0}, {3, 1.0}}), unit(5, 2.0)}});  // KV head 1 values are 2 e_t
  EXPECT_TRUE(near(out, expected, 1e-6));
}

// A position listed twice counts twice (weights 2/3, 1/3); a row with no valid entry gives zeros;
// a zero-length sequence gives zeros whatever it lists.
TEST(SparseAttention, DuplicatesAndEmptyRows) {
  const Caches c = sparse_caches(1, 4, 4);
  const at::Tensor q = at::ones({1, 2, kD});
  const at::Tensor out = tidal::sparse_attention(q, c.k, c.v, index_rows({{{1, 1, 2}, {-1, 4, -1}}}), std::nullopt, 1.0);
  EXPECT_TRUE(near(out, queries({{vec({{1, 2.0 / 3}, {2, 1.0 / 3}}), vec({})}}), 1e-6));

  Caches pad(1, 1, 4);
  pad.poison(0, 0, 0);
  const at::Tensor zero = tidal::sparse_attention(at::ones({1, 1, kD}), pad.k, pad.v, index_rows({{{0, 1, 2}}}),
                                                  ints({0}), 1.0);
  EXPECT_TRUE(near(zero, at::zeros({1, 1, kD}), 0.0));
}

// ---------------------------------------------------------------------------------------------
// correct_kv_attention

// Writes rows start..start+S-1 and only those; the rest of both caches is bit-unchanged.
TEST(CorrectKvAttention, WritesOnlyTheNewRows) {
  const int64_t B = 2, Hkv = 2, N = 8, S = 3, D = 64;
  at::Tensor k_cache = at::randn({B, Hkv, N, D}), v_cache = at::randn({B, Hkv, N, D});
  const at::Tensor k0 = k_cache.clone(), v0 = v_cache.clone();
  const at::Tensor k = at::randn({B, Hkv, S, D}), v = at::randn({B, Hkv, S, D});
  const std::vector<int32_t> start = {2, 5};
  const at::Tensor out = tidal::correct_kv_attention(at::randn({B, 4, S, D}), k, v, k_cache, v_cache, ints(start));
  EXPECT_EQ(out.sizes(), (std::vector<int64_t>{B, 4, S, D}));
  for (int64_t b = 0; b < B; ++b) {
    SCOPED_TRACE(b);
    const int64_t s0 = start[b];
    EXPECT_TRUE(bits_equal(k_cache[b].slice(1, s0, s0 + S), k[b]));
    EXPECT_TRUE(bits_equal(v_cache[b].slice(1, s0, s0 + S), v[b]));
    EXPECT_TRUE(bits_equal(k_cache[b].slice(1, 0, s0), k0[b].slice(1, 0, s0)));
    EXPECT_TRUE(bits_equal(v_cache[b].slice(1, 0, s0), v0[b].slice(1, 0, s0)));
    EXPECT_TRUE(bits_equal(k_cache[b].slice(1, s0 + S), k0[b].slice(1, s0 + S)));
    EXPECT_TRUE(bits_equal(v_cache[b].slice(1, s0 + S), v0[b].slice(1, s0 + S)));
  }
}

// Causal ranges: with zero keys every visible token weighs the same and one-hot values e_t show
// which tokens are visible: query i of row b sees exactly 0..start[b]+i (query 0 sees up to and
// including its own new row at start). Rows after start+S-1 are NaN and must stay unread. GQA:
// Hq = 4, Hkv = 2, KV head g's values are (g + 1) e_t.
TEST(CorrectKvAttention, EachQueryAttendsCausally) {
  const int64_t B = 2, Hkv = 2, Hq = 4, N = 8, S = 2;
  const std::vector<int32_t> start = {0, 3};
  Caches c(B, Hkv, N);
  at::Tensor k = at::zeros({B, Hkv, S, kD}), v = at::zeros({B, Hkv, S, kD});
  for (int64_t b = 0; b < B; ++b)
    for (int64_t g = 0; g < Hkv; ++g) {
      for (int64_t t = 0; t < start[b]; ++t) c.set(b, g, t, unit(0, 0.0), unit(t, g + 1.0));
      c.poison(b, g, start[b]);  // overwritten for the S new rows, left NaN after them
      for (int64_t i = 0; i < S; ++i) v[b][g][i].copy_(unit(start[b] + i, g + 1.0));
    }
  const at::Tensor out = tidal::correct_kv_attention(at::ones({B, Hq, S, kD}), k, v, c.k, c.v, ints(start), 1.0);
  at::Tensor expected = at::zeros({B, Hq, S, kD});
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < Hq; ++h)
      for (int64_t i = 0; i < S; ++i) {
        const int64_t visible = start[b] + i + 1;  // tokens 0 .. start + i
        expected[b][h][i].slice(0, 0, visible).fill_((h / 2 + 1.0) / visible);
      }
  EXPECT_TRUE(near(out, expected, 1e-6));
}

// Query i's scores use its own query and the cache keys: scores ln 3 (token 0) and 0 (token 1)
// for the single query at start 1 -> 3/4, 1/4.
TEST(CorrectKvAttention, SoftmaxWeightsOverCache) {
  Caches c(1, 1, 4);
  c.set(0, 0, 0, unit(0, std::log(3.0)), unit(0));
  const at::Tensor k = unit(0, 0.0).reshape({1, 1, 1, kD}), v = unit(1).reshape({1, 1, 1, kD});
  const at::Tensor out =
      tidal::correct_kv_attention(unit(0).reshape({1, 1, 1, kD}), k, v, c.k, c.v, ints({1}), 1.0);
  EXPECT_TRUE(near(out, vec({{0, 0.75}, {1, 0.25}}).reshape({1, 1, 1, kD}), 1e-6));
}

// ---------------------------------------------------------------------------------------------
// Strided inputs and dtypes (random data, compared op-to-op on the same values)

struct RandomProblem {
  int64_t B = 2, Hq = 4, Hkv = 2, N = 13, D = 64, S = 3;
  at::Tensor q, k_cache, v_cache, seq_lens, q4, k_new, v_new, start;
  RandomProblem() {
    at::manual_seed(7);
    q = at::randn({B, Hq, D});
    k_cache = at::randn({B, Hkv, N, D});
    v_cache = at::randn({B, Hkv, N, D});
    seq_lens = ints({13, 7});
    q4 = at::randn({B, Hq, S, D});
    k_new = at::randn({B, Hkv, S, D});
    v_new = at::randn({B, Hkv, S, D});
    start = ints({10, 4});
  }
};

// Caches that are slices of a bigger NaN-padded buffer (strided B, H, N dims, offset) and a q whose
// last dim is not contiguous give bit-identical results to contiguous inputs, for all four ops; the
// correction writes land in the view and leave the rest of the big buffer untouched.
TEST(StridedInputs, MatchContiguous) {
  const RandomProblem p;
  const at::Tensor ks = strided_copy(p.k_cache), vs = strided_copy(p.v_cache);
  ASSERT_FALSE(ks.is_contiguous());
  const at::Tensor qs = p.q.transpose(1, 2).contiguous().transpose(1, 2);  // last-dim stride Hq
  ASSERT_NE(qs.stride(2), 1);

  EXPECT_TRUE(bits_equal(tidal::decode_attention(qs, ks, vs, p.seq_lens),
                         tidal::decode_attention(p.q, p.k_cache, p.v_cache, p.seq_lens)));
  for (const char* mode : {"head", "group"}) {
    SCOPED_TRACE(mode);
    const auto [out_s, idx_s] = tidal::select_attention(qs, ks, vs, p.seq_lens, 5, mode, 1, 2);
    const auto [out_c, idx_c] = tidal::select_attention(p.q, p.k_cache, p.v_cache, p.seq_lens, 5, mode, 1, 2);
    EXPECT_TRUE(bits_equal(out_s, out_c));
    EXPECT_TRUE(bits_equal(idx_s, idx_c));
    const at::Tensor idx_strided = strided_copy(idx_c);  // indices need not be contiguous either
    EXPECT_TRUE(bits_equal(tidal::sparse_attention(qs, ks, vs, idx_strided, p.seq_lens),
                           tidal::sparse_attention(p.q, p.k_cache, p.v_cache, idx_c, p.seq_lens)));
  }

  at::Tensor kc = p.k_cache.clone(), vc = p.v_cache.clone();
  at::Tensor k_buf, v_buf;
  at::Tensor k_big = strided_copy(p.k_cache, &k_buf), v_big = strided_copy(p.v_cache, &v_buf);
  at::Tensor k_expect = k_buf.clone(), v_expect = v_buf.clone();
  const at::Tensor out_s = tidal::correct_kv_attention(strided_copy(p.q4), strided_copy(p.k_new),
                                                       strided_copy(p.v_new), k_big, v_big, p.start);
  const at::Tensor out_c = tidal::correct_kv_attention(p.q4, p.k_new, p.v_new, kc, vc, p.start);
  EXPECT_TRUE(bits_equal(out_s, out_c));
  EXPECT_TRUE(bits_equal(k_big, kc));
  EXPECT_TRUE(bits_equal(v_big, vc));
  // Outside the view the big buffers still hold exactly their NaN padding.
  k_expect.as_strided(k_big.sizes(), k_big.strides(), k_big.storage_offset()).copy_(kc);
  v_expect.as_strided(v_big.sizes(), v_big.strides(), v_big.storage_offset()).copy_(vc);
  EXPECT_TRUE(bits_equal(k_buf, k_expect));
  EXPECT_TRUE(bits_equal(v_buf, v_expect));
}

// Half and bfloat16 agree with float run on the same (rounded) values within the output
// rounding of the dtype; selections are identical (scores are computed in float either way).
TEST(Dtypes, ReducedPrecisionAgreesWithFloat) {
  const RandomProblem p;
  struct Case {
    at::ScalarType dt;
    double tol;
  };
  for (const Case& c : {Case{at::kFloat, 0.0}, Case{at::kHalf, 2e-3}, Case{at::kBFloat16, 1.6e-2}}) {
    SCOPED_TRACE(c10::toString(c.dt));
    auto low = [&](const at::Tensor& t) { return t.to(c.dt); };
    auto ref = [&](const at::Tensor& t) { return t.to(c.dt).to(at::kFloat); };  // float of the rounded values

    const at::Tensor out = tidal::decode_attention(low(p.q), low(p.k_cache), low(p.v_cache), p.seq_lens);
    EXPECT_EQ(out.scalar_type(), c.dt);
    EXPECT_TRUE(near(out, tidal::decode_attention(ref(p.q), ref(p.k_cache), ref(p.v_cache), p.seq_lens), c.tol, c.tol));

    for (const char* mode : {"head", "group"}) {
      SCOPED_TRACE(mode);
      const auto [o, i] = tidal::select_attention(low(p.q), low(p.k_cache), low(p.v_cache), p.seq_lens, 5, mode, 1, 1);
      const auto [o_ref, i_ref] =
          tidal::select_attention(ref(p.q), ref(p.k_cache), ref(p.v_cache), p.seq_lens, 5, mode, 1, 1);
      EXPECT_EQ(o.scalar_type(), c.dt);
      EXPECT_TRUE(near(o, o_ref, c.tol, c.tol));
      EXPECT_TRUE(bits_equal(i, i_ref));
      const at::Tensor s = tidal::sparse_attention(low(p.q), low(p.k_cache), low(p.v_cache), i, p.seq_lens);
      EXPECT_EQ(s.scalar_type(), c.dt);
      EXPECT_TRUE(near(s, tidal::sparse_attention(ref(p.q), ref(p.k_cache), ref(p.v_cache), i, p.seq_lens), c.tol,
                       c.tol));
    }

    at::Tensor kc = low(p.k_cache), vc = low(p.v_cache), kr = ref(p.k_cache), vr = ref(p.v_cache);
    const at::Tensor o = tidal::correct_kv_attention(low(p.q4), low(p.k_new), low(p.v_new), kc, vc, p.start);
    const at::Tensor o_ref = tidal::correct_kv_attention(ref(p.q4), ref(p.k_new), ref(p.v_new), kr, vr, p.start);
    EXPECT_EQ(o.scalar_type(), c.dt);
    EXPECT_TRUE(near(o, o_ref, c.tol, c.tol));
    EXPECT_TRUE(bits_equal(kc, kr.to(c.dt)));  // the cache writes are exact copies
    EXPECT_TRUE(bits_equal(vc, vr.to(c.dt)));
  }
}

// ---------------------------------------------------------------------------------------------
// Error messages: "tidal.<op>: <argument>: expected X, got Y"

struct Valid {
  at::Tensor q = at::randn({2, 4, 64}), k = at::randn({2, 2, 8, 64}), v = at::randn({2, 2, 8, 64});
  at::Tensor lens = ints({8, 3});
  at::Tensor idx = at::zeros({2, 4, 3}, at::kInt);
};

TEST(Errors, DecodeAttention) {
  Valid a;
  EXPECT_NO_THROW(tidal::decode_attention(a.q, a.k, a.v, a.lens));
  EXPECT_TIDAL_ERROR(tidal::decode_attention(a.q.to(at::kDouble), a.k, a.v), "tidal.decode_attention: q: expected",
                     "Double");
  EXPECT_TIDAL_ERROR(tidal::decode_attention(a.q, a.k.to(at::kHalf), a.v), "tidal.decode_attention: k_cache:",
                     "Half");
  EXPECT_TIDAL_ERROR(tidal::decode_attention(a.q, a.k, a.v.to(at::kBFloat16)), "tidal.decode_attention: v_cache:");
  EXPECT_TIDAL_ERROR(tidal::decode_attention(a.q[0], a.k, a.v), "tidal.decode_attention: q: expected 3-D");
  EXPECT_TIDAL_ERROR(tidal::decode_attention(a.q, a.k[0], a.v), "tidal.decode_attention: k_cache: expected 4-D");
  EXPECT_TIDAL_ERROR(tidal::decode_attention(a.q, a.k, a.v.slice(2, 0, 4)), "tidal.decode_attention: v_cache:",
                     "shape");
  // Hq % Hkv != 0: 3 query heads over 2 KV heads.
  EXPECT_TIDAL_ERROR(tidal::decode_attention(a.q.slice(1, 0, 3), a.k, a.v), "tidal.decode_attention: q:",
                     "divisible", "Hq = 3");
  // Unsupported head dim 48.
  EXPECT_TIDAL_ERROR(tidal::decode_attention(at::randn({2, 4, 48}), at::randn({2, 2, 8, 48}), at::randn({2, 2, 8, 48})),
                     "tidal.decode_attention: q:", "head dim", "got 48");
  // Batch mismatch between q and the caches.
  EXPECT_TIDAL_ERROR(tidal::decode_attention(a.q[0].unsqueeze(0), a.k, a.v), "tidal.decode_attention: k_cache:");
  // Last dim not contiguous.
  EXPECT_TIDAL_ERROR(tidal::decode_attention(a.q, a.k.transpose(2, 3).contiguous().transpose(2, 3), a.v),
                     "tidal.decode_attention: k_cache:", "stride");
  // seq_lens: above N, negative, wrong dtype, wrong shape.
  EXPECT_TIDAL_ERROR(tidal::decode_attention(a.q, a.k, a.v, ints({9, 3})), "tidal.decode_attention: seq_lens:",
                     "got 9");
  EXPECT_TIDAL_ERROR(tidal::decode_attention(a.q, a.k, a.v, ints({-1, 3})), "tidal.decode_attention: seq_lens:");
  EXPECT_TIDAL_ERROR(tidal::decode_attention(a.q, a.k, a.v, a.lens.to(at::kLong)), "tidal.decode_attention: seq_lens:",
                     "Long");
  EXPECT_TIDAL_ERROR(tidal::decode_attention(a.q, a.k, a.v, ints({8, 3, 1})), "tidal.decode_attention: seq_lens:");
  EXPECT_TIDAL_ERROR(tidal::decode_attention(a.q, a.k, a.v, std::nullopt, std::nan("")),
                     "tidal.decode_attention: scale:");
}

TEST(Errors, SelectAttention) {
  Valid a;
  EXPECT_NO_THROW(tidal::select_attention(a.q, a.k, a.v, a.lens, 4, "group", 1, 1));
  EXPECT_TIDAL_ERROR(tidal::select_attention(a.q, a.k, a.v, a.lens, 4, "topk"), "tidal.select_attention: mode:",
                     "\"topk\"");
  EXPECT_TIDAL_ERROR(tidal::select_attention(a.q, a.k, a.v, a.lens, 0), "tidal.select_attention: top_k:", "got 0");
  EXPECT_TIDAL_ERROR(tidal::select_attention(a.q, a.k, a.v, a.lens, tidal::kMaxTopK + 1),
                     "tidal.select_attention: top_k:");
  EXPECT_TIDAL_ERROR(tidal::select_attention(a.q, a.k, a.v, a.lens, 4, "head", -1), "tidal.select_attention: sink:");
  EXPECT_TIDAL_ERROR(tidal::select_attention(a.q, a.k, a.v, a.lens, 4, "head", 0, -2),
                     "tidal.select_attention: recent:");
  EXPECT_TIDAL_ERROR(tidal::select_attention(a.q, a.k, a.v, a.lens, 4, "head", 2, 3),
                     "tidal.select_attention: sink/recent:");
  EXPECT_TIDAL_ERROR(tidal::select_attention(a.q, a.k, a.v, a.lens, 4, "head", 4, 0),
                     "tidal.select_attention: sink/recent:");
  EXPECT_TIDAL_ERROR(tidal::select_attention(a.q.to(at::kInt), a.k, a.v), "tidal.select_attention: q:");
  EXPECT_TIDAL_ERROR(tidal::select_attention(a.q, a.k, a.v, ints({8, 100})), "tidal.select_attention: seq_lens:",
                     "got 100");
}

TEST(Errors, SparseAttention) {
  Valid a;
  EXPECT_NO_THROW(tidal::sparse_attention(a.q, a.k, a.v, a.idx, a.lens));
  EXPECT_TIDAL_ERROR(tidal::sparse_attention(a.q, a.k, a.v, a.idx.to(at::kLong)), "tidal.sparse_attention: indices:",
                     "Long");
  EXPECT_TIDAL_ERROR(tidal::sparse_attention(a.q, a.k, a.v, a.idx[0]), "tidal.sparse_attention: indices:",
                     "expected 3-D");
  // Hsel must be Hq (4) or Hkv (2).
  EXPECT_TIDAL_ERROR(tidal::sparse_attention(a.q, a.k, a.v, at::zeros({2, 3, 3}, at::kInt)),
                     "tidal.sparse_attention: indices:", "got 3");
  EXPECT_TIDAL_ERROR(tidal::sparse_attention(a.q, a.k, a.v, at::zeros({1, 4, 3}, at::kInt)),
                     "tidal.sparse_attention: indices:");
  EXPECT_TIDAL_ERROR(tidal::sparse_attention(a.q, a.k, a.v, a.idx, ints({8, 9})), "tidal.sparse_attention: seq_lens:");
  EXPECT_TIDAL_ERROR(tidal::sparse_attention(a.q.to(at::kHalf), a.k, a.v, a.idx), "tidal.sparse_attention: k_cache:");
}

TEST(Errors, CorrectKvAttention) {
  at::Tensor kc = at::zeros({2, 2, 8, 64}), vc = at::zeros({2, 2, 8, 64});
  const at::Tensor q = at::randn({2, 4, 3, 64}), k = at::randn({2, 2, 3, 64}), v = at::randn({2, 2, 3, 64});
  EXPECT_NO_THROW(tidal::correct_kv_attention(q, k, v, kc, vc, ints({5, 0})));  // 5 + 3 == N
  const at::Tensor kc_before = kc.clone(), vc_before = vc.clone();
  EXPECT_TIDAL_ERROR(tidal::correct_kv_attention(q, k, v, kc, vc, ints({6, 0})), "tidal.correct_kv_attention: start:",
                     "got 6");
  EXPECT_TIDAL_ERROR(tidal::correct_kv_attention(q, k, v, kc, vc, ints({0, -1})), "tidal.correct_kv_attention: start:");
  EXPECT_TIDAL_ERROR(tidal::correct_kv_attention(q, k, v, kc, vc, ints({0, 0}).to(at::kLong)),
                     "tidal.correct_kv_attention: start:", "Long");
  EXPECT_TIDAL_ERROR(tidal::correct_kv_attention(q[0], k, v, kc, vc, ints({0, 0})),
                     "tidal.correct_kv_attention: q: expected 4-D");
  EXPECT_TIDAL_ERROR(tidal::correct_kv_attention(q, k.slice(2, 0, 2), v, kc, vc, ints({0, 0})),
                     "tidal.correct_kv_attention: k:", "shape");
  EXPECT_TIDAL_ERROR(tidal::correct_kv_attention(q, k, v.to(at::kHalf), kc, vc, ints({0, 0})),
                     "tidal.correct_kv_attention: v:", "Half");
  at::Tensor kc_half = kc.to(at::kHalf);
  EXPECT_TIDAL_ERROR(tidal::correct_kv_attention(q, k, v, kc_half, vc, ints({0, 0})),
                     "tidal.correct_kv_attention: k_cache:");
  EXPECT_TIDAL_ERROR(tidal::correct_kv_attention(q.slice(1, 0, 3), k, v, kc, vc, ints({0, 0})),
                     "tidal.correct_kv_attention: q:", "divisible");
  // The failed calls left the caches untouched.
  EXPECT_TRUE(bits_equal(kc, kc_before));
  EXPECT_TRUE(bits_equal(vc, vc_before));
}

}  // namespace
