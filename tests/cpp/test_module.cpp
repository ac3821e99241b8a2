// tidal::DecodeContext and tidal::TidalAttention through the public C++ API (tidal/decode_context.h,
// tidal/attention.h) on CPU.
//
// DecodeContext: construction checks, layer roles per schedule (prefill always full), the step
// counter, lengths/positions advancing on the device, the correction schedule and the selection slot.
// TidalAttention, run as a small decoder stack (h += layer(h) per layer; random token embeddings):
//  * top_k >= context: a tidal stack equals the all-full stack bit for bit (projections and *_qkv);
//  * small top_k: equals a step-by-step double-precision reference written here with plain ATen ops
//    (own projections, own rotary embedding, own top-k selection, own softmax);
//  * a right-padded batch with unequal lengths equals each sequence run alone (padding is NaN);
//  * KV-cache correction rewrites exactly the last S rows of every layer, with what an all-full stack
//    wrote at decode time;
//  * rope, borrowed caches (slices of a model-wide buffer) and the error messages of misuse.
#include <algorithm>
#include <cmath>
#include <iterator>
#include <set>
#include <tuple>
#include <vector>

#include <gtest/gtest.h>
#include <torch/torch.h>

#include "test_util.h"
#include "tidal/attention.h"
#include "tidal/config.h"
#include "tidal/decode_context.h"

namespace {

using namespace tidal_test;
using tidal::DecodeContext;
using tidal::LayerRole;
using tidal::TidalAttention;
using tidal::TidalAttentionOptions;
using tidal::TidalConfig;

// ---------------------------------------------------------------------------------------------
// Helpers

TidalConfig cfg(int64_t top_k, std::vector<int64_t> layers, const std::string& mode = "head", int64_t sink = 0,
                int64_t recent = 0, int64_t stride = 0) {
  return TidalConfig(top_k, std::move(layers), mode, sink, recent, stride);
}

std::vector<int32_t> to_vec(const at::Tensor& t) {
  const at::Tensor c = t.to(at::kInt).contiguous();
  return std::vector<int32_t>(c.data_ptr<int32_t>(), c.data_ptr<int32_t>() + c.numel());
}

// torch::equal with a readable failure (shape/dtype or the largest difference).
::testing::AssertionResult same(const at::Tensor& a, const at::Tensor& b) {
  if (a.sizes() != b.sizes() || a.scalar_type() != b.scalar_type())
    return ::testing::AssertionFailure() << a.scalar_type() << a.sizes() << " vs " << b.scalar_type() << b.sizes();
  if (torch::equal(a, b)) return ::testing::AssertionSuccess();
  const at::Tensor d = (a.to(at::kDouble) - b.to(at::kDouble)).abs();
  return ::testing::AssertionFailure() << "not equal: " << d.ne(0).sum().item<int64_t>() << " of " << d.numel()
                                       << " elements differ, max |diff| " << d.nan_to_num(1e300).max().item<double>();
}

// The largest |a - b| (NaN counts as huge).
double max_diff(const at::Tensor& a, const at::Tensor& b) {
  return (a.to(at::kDouble) - b.to(at::kDouble)).abs().nan_to_num(1e300).max().item<double>();
}

// Llama-like miniature shapes: Hq 4, Hkv 2 (GQA, G = 2), D 32, hidden 64, rope on.
struct Dims {
  int64_t Hq = 4, Hkv = 2, D = 32, hidden = 64;
  double theta = 10000.0;
  int64_t max_positions = 64;
};

TidalAttentionOptions layer_options(const Dims& d, int64_t layer_idx, bool projections = true) {
  TidalAttentionOptions o;
  o.layer_idx = layer_idx;
  o.num_heads = d.Hq;
  o.num_kv_heads = d.Hkv;
  o.head_dim = d.D;
  if (projections) {
    o.hidden_size = d.hidden;
    o.rope_theta = d.theta;
    o.max_positions = d.max_positions;
  }
  return o;
}

// A decoder stack of TidalAttention layers with a residual connection: h = h + layer_l(h).
// Two models built with the same seed have identical weights.
struct Model {
  std::vector<TidalAttention> layers;
  Model(const Dims& d, int64_t num_layers, uint64_t seed, bool projections = true) {
    torch::manual_seed(seed);
    for (int64_t l = 0; l < num_layers; ++l) layers.emplace_back(layer_options(d, l, projections));
  }
  void allocate(int64_t B, int64_t N) {
    for (auto& l : layers) l->allocate_cache(B, N, at::kFloat);
  }
  at::Tensor prefill(const at::Tensor& x, DecodeContext& ctx) {
    at::Tensor h = x;
    for (auto& l : layers) h = h + l->prefill(h, ctx);
    return h;
  }
  at::Tensor step(const at::Tensor& x, DecodeContext& ctx) {
    at::Tensor h = x;
    for (auto& l : layers) h = h + l->decode_step(h, ctx);
    return h;
  }
  at::Tensor correct(const at::Tensor& x, DecodeContext& ctx) {
    at::Tensor h = x;
    for (auto& l : layers) h = h + l->correct(h, ctx);
    return h;
  }
};

// ---------------------------------------------------------------------------------------------
// DecodeContext: construction

TEST(DecodeContext, RejectsBadNumLayers) {
  EXPECT_TIDAL_ERROR(DecodeContext(cfg(16, {}), 0), "tidal.DecodeContext: num_layers: expected", "got 0");
  EXPECT_TIDAL_ERROR(DecodeContext(cfg(16, {}), -3), "DecodeContext", "num_layers", "got -3");
}

TEST(DecodeContext, RejectsSelectLayerBeyondModel) {
  EXPECT_TIDAL_ERROR(DecodeContext(cfg(16, {2, 13}), 13), "select_layers", "13");
  EXPECT_TIDAL_ERROR(DecodeContext(cfg(16, {2}), 2), "select_layers");
  EXPECT_TIDAL_ERROR(DecodeContext(cfg(16, {0}), 0), "num_layers");
  EXPECT_NO_THROW(DecodeContext(cfg(16, {2, 13}), 14));
  EXPECT_NO_THROW(DecodeContext(cfg(16, {0}), 1));
  EXPECT_NO_THROW(DecodeContext(cfg(16, {}), 1));
}

TEST(DecodeContext, KeepsConfigAndLayerCount) {
  const DecodeContext ctx(cfg(64, {1, 5}, "group", 4, 8, 16), 10);
  EXPECT_EQ(ctx.num_layers(), 10);
  EXPECT_EQ(ctx.config().top_k, 64);
  EXPECT_EQ(ctx.config().select_layers, (std::vector<int64_t>{1, 5}));
  EXPECT_EQ(ctx.config().mode, tidal::SelectMode::Group);
  EXPECT_EQ(ctx.config().sink, 4);
  EXPECT_EQ(ctx.config().recent, 8);
  EXPECT_EQ(ctx.config().correction_stride, 16);
}

// ---------------------------------------------------------------------------------------------
// DecodeContext: roles

struct Schedule {
  std::vector<int64_t> select_layers;
  int64_t num_layers;
};

LayerRole expected_role(const Schedule& s, int64_t layer) {
  if (s.select_layers.empty() || layer < s.select_layers.front()) return LayerRole::Full;
  if (std::find(s.select_layers.begin(), s.select_layers.end(), layer) != s.select_layers.end())
    return LayerRole::Select;
  return LayerRole::Sparse;
}

const std::vector<Schedule> kSchedules = {{{2, 13}, 32}, {{}, 8}, {{0}, 4}, {{1, 3}, 5}};

// Before the first begin_step (fresh, after begin_prefill, after a second begin_prefill) every layer
// is full; during decode the schedule applies.
TEST(DecodeContext, RolesInPrefillAndDecode) {
  for (const Schedule& s : kSchedules) {
    SCOPED_TRACE(::testing::Message() << "select_layers " << c10::IntArrayRef(s.select_layers) << ", "
                                      << s.num_layers << " layers");
    DecodeContext ctx(cfg(16, s.select_layers), s.num_layers);
    EXPECT_TRUE(ctx.in_prefill());
    for (int64_t l = 0; l < s.num_layers; ++l) EXPECT_EQ(ctx.role(l), LayerRole::Full) << "fresh, layer " << l;
    ctx.begin_prefill(ints({7, 3}));
    EXPECT_TRUE(ctx.in_prefill());
    for (int64_t l = 0; l < s.num_layers; ++l) EXPECT_EQ(ctx.role(l), LayerRole::Full) << "prefill, layer " << l;
    for (int step = 1; step <= 3; ++step) {
      ctx.begin_step();
      EXPECT_FALSE(ctx.in_prefill());
      for (int64_t l = 0; l < s.num_layers; ++l)
        EXPECT_EQ(ctx.role(l), expected_role(s, l)) << "step " << step << ", layer " << l;
    }
    ctx.begin_prefill(ints({2, 2}));
    EXPECT_TRUE(ctx.in_prefill());
    for (int64_t l = 0; l < s.num_layers; ++l) EXPECT_EQ(ctx.role(l), LayerRole::Full) << "re-prefill, layer " << l;
  }
}

// The schedule {2, 13} on 32 layers spelled out.
TEST(DecodeContext, LlamaScheduleSpelledOut) {
  DecodeContext ctx(cfg(2048, {2, 13}), 32);
  ctx.begin_prefill(ints({100}));
  ctx.begin_step();
  EXPECT_EQ(ctx.role(0), LayerRole::Full);
  EXPECT_EQ(ctx.role(1), LayerRole::Full);
  EXPECT_EQ(ctx.role(2), LayerRole::Select);
  for (int64_t l = 3; l < 13; ++l) EXPECT_EQ(ctx.role(l), LayerRole::Sparse) << l;
  EXPECT_EQ(ctx.role(13), LayerRole::Select);
  for (int64_t l = 14; l < 32; ++l) EXPECT_EQ(ctx.role(l), LayerRole::Sparse) << l;
}

TEST(DecodeContext, RoleRejectsLayerOutOfRange) {
  DecodeContext ctx(cfg(16, {2, 13}), 32);
  EXPECT_TIDAL_ERROR(ctx.role(32), "tidal.DecodeContext.role: layer_idx: expected", "got 32");
  EXPECT_TIDAL_ERROR(ctx.role(-1), "DecodeContext.role", "layer_idx", "got -1");
  ctx.begin_prefill(ints({4}));
  ctx.begin_step();
  EXPECT_TIDAL_ERROR(ctx.role(40), "DecodeContext.role", "layer_idx");
}

// ---------------------------------------------------------------------------------------------
// DecodeContext: step counter, lengths, positions

TEST(DecodeContext, StepCounter) {
  DecodeContext ctx(cfg(16, {1}), 4);
  EXPECT_EQ(ctx.step(), 0);
  ctx.begin_prefill(ints({5}));
  EXPECT_EQ(ctx.step(), 0);
  for (int s = 1; s <= 5; ++s) {
    ctx.begin_step();
    EXPECT_EQ(ctx.step(), s);
  }
  ctx.begin_prefill(ints({3}));
  EXPECT_EQ(ctx.step(), 0);
  ctx.begin_step();
  EXPECT_EQ(ctx.step(), 1);
}

TEST(DecodeContext, SeqLensAndPositionsAdvance) {
  DecodeContext ctx(cfg(16, {1}), 4);
  const at::Tensor prompt = ints({5, 3, 1});
  ctx.begin_prefill(prompt);
  EXPECT_EQ(ctx.seq_lens().scalar_type(), at::kInt);
  EXPECT_EQ(ctx.positions().scalar_type(), at::kInt);
  EXPECT_EQ(to_vec(ctx.seq_lens()), (std::vector<int32_t>{5, 3, 1}));
  EXPECT_EQ(to_vec(ctx.positions()), (std::vector<int32_t>{4, 2, 0}));
  ctx.begin_step();
  EXPECT_EQ(to_vec(ctx.seq_lens()), (std::vector<int32_t>{6, 4, 2}));
  EXPECT_EQ(to_vec(ctx.positions()), (std::vector<int32_t>{5, 3, 1}));
  ctx.begin_step();
  ctx.begin_step();
  EXPECT_EQ(to_vec(ctx.seq_lens()), (std::vector<int32_t>{8, 6, 4}));
  EXPECT_EQ(to_vec(ctx.positions()), (std::vector<int32_t>{7, 5, 3}));
  // The caller's tensor is never advanced in place.
  EXPECT_EQ(to_vec(prompt), (std::vector<int32_t>{5, 3, 1}));
  // A new generation starts from its own lengths.
  ctx.begin_prefill(ints({2, 9, 4}));
  EXPECT_EQ(to_vec(ctx.seq_lens()), (std::vector<int32_t>{2, 9, 4}));
  ctx.begin_step();
  EXPECT_EQ(to_vec(ctx.positions()), (std::vector<int32_t>{2, 9, 4}));
}

// A tensor returned by seq_lens() earlier is not changed by a later begin_step.
// The lengths are the context's own copy, advanced in place (so a captured begin_step replays):
// the caller's prompt lengths never change, seq_lens() is live.
TEST(DecodeContext, SeqLensAdvanceInPlaceOnTheContextsCopy) {
  DecodeContext ctx(cfg(16, {1}), 4);
  const at::Tensor prompt = ints({5, 3});
  ctx.begin_prefill(prompt);
  const at::Tensor live = ctx.seq_lens();
  ctx.begin_step();
  EXPECT_EQ(to_vec(prompt), (std::vector<int32_t>{5, 3}));
  EXPECT_EQ(to_vec(live), (std::vector<int32_t>{6, 4}));
  EXPECT_EQ(live.data_ptr(), ctx.seq_lens().data_ptr());
  EXPECT_EQ(to_vec(ctx.position_index().to(at::kInt)), (std::vector<int32_t>{5, 3}));
}

TEST(DecodeContext, NeedsBeginPrefillFirst) {
  DecodeContext ctx(cfg(16, {1}), 4);
  EXPECT_TIDAL_ERROR(ctx.begin_step(), "tidal.DecodeContext.begin_step: seq_lens: expected", "begin_prefill");
  EXPECT_TIDAL_ERROR(ctx.seq_lens(), "DecodeContext.seq_lens", "begin_prefill");
  EXPECT_TIDAL_ERROR(ctx.positions(), "DecodeContext.positions", "begin_prefill");
  EXPECT_TIDAL_ERROR(ctx.correction_start(2), "DecodeContext.correction_start", "begin_prefill");
}

TEST(DecodeContext, BeginPrefillValidatesSeqLens) {
  DecodeContext ctx(cfg(16, {1}), 4);
  EXPECT_TIDAL_ERROR(ctx.begin_prefill(at::tensor(std::vector<int64_t>{4, 2})),
                     "tidal.DecodeContext.begin_prefill: seq_lens: expected", "int32", "Long");
  EXPECT_TIDAL_ERROR(ctx.begin_prefill(at::zeros({2, 2}, at::kInt)), "DecodeContext.begin_prefill", "seq_lens",
                     "[2, 2]");
  EXPECT_TIDAL_ERROR(ctx.begin_prefill(at::Tensor()), "DecodeContext.begin_prefill", "seq_lens", "undefined");
}

// ---------------------------------------------------------------------------------------------
// DecodeContext: correction schedule

TEST(DecodeContext, CorrectionDueEveryStrideSteps) {
  for (int64_t S : {1, 3, 4}) {
    SCOPED_TRACE(::testing::Message() << "correction_stride " << S);
    DecodeContext ctx(cfg(16, {1}, "head", 0, 0, S), 4);
    EXPECT_FALSE(ctx.correction_due());
    ctx.begin_prefill(ints({6, 2}));
    EXPECT_FALSE(ctx.correction_due()) << "in prefill";
    for (int64_t step = 1; step <= 3 * S + 2; ++step) {
      ctx.begin_step();
      EXPECT_EQ(ctx.correction_due(), step % S == 0) << "step " << step;
    }
    // A new generation restarts the schedule.
    ctx.begin_prefill(ints({3, 3}));
    EXPECT_FALSE(ctx.correction_due());
    for (int64_t step = 1; step <= S; ++step) {
      ctx.begin_step();
      EXPECT_EQ(ctx.correction_due(), step == S) << "after re-prefill, step " << step;
    }
  }
}

TEST(DecodeContext, CorrectionNeverDueWithStrideZero) {
  DecodeContext ctx(cfg(16, {1}), 4);
  ctx.begin_prefill(ints({6}));
  EXPECT_FALSE(ctx.correction_due());
  for (int step = 1; step <= 20; ++step) {
    ctx.begin_step();
    EXPECT_FALSE(ctx.correction_due()) << "step " << step;
  }
}

TEST(DecodeContext, CorrectionStartIsSeqLensMinusChunk) {
  DecodeContext ctx(cfg(16, {1}, "head", 0, 0, 4), 4);
  ctx.begin_prefill(ints({10, 7}));
  for (int i = 0; i < 4; ++i) ctx.begin_step();
  EXPECT_EQ(to_vec(ctx.seq_lens()), (std::vector<int32_t>{14, 11}));
  const at::Tensor start = ctx.correction_start(4);
  EXPECT_EQ(start.scalar_type(), at::kInt);
  EXPECT_EQ(to_vec(start), (std::vector<int32_t>{10, 7}));
  EXPECT_EQ(to_vec(ctx.correction_start(1)), (std::vector<int32_t>{13, 10}));
  EXPECT_TIDAL_ERROR(ctx.correction_start(0), "tidal.DecodeContext.correction_start: chunk: expected", "got 0");
  EXPECT_TIDAL_ERROR(ctx.correction_start(-2), "DecodeContext.correction_start", "chunk");
}

// ---------------------------------------------------------------------------------------------
// DecodeContext: the selection slot

TEST(DecodeContext, IndicesBeforeAnySelectThrow) {
  DecodeContext ctx(cfg(16, {1}), 4);
  EXPECT_FALSE(ctx.has_indices());
  EXPECT_TIDAL_ERROR(ctx.indices(), "tidal.DecodeContext.indices: indices: expected");
  ctx.begin_prefill(ints({4}));
  EXPECT_FALSE(ctx.has_indices());
  EXPECT_TIDAL_ERROR(ctx.indices(), "DecodeContext.indices", "indices");
  ctx.begin_step();
  EXPECT_FALSE(ctx.has_indices());
  EXPECT_TIDAL_ERROR(ctx.indices(), "DecodeContext.indices", "step 1");
}

TEST(DecodeContext, SetIndicesValidates) {
  DecodeContext ctx(cfg(16, {1}), 4);
  EXPECT_TIDAL_ERROR(ctx.set_indices(at::Tensor()), "tidal.DecodeContext.set_indices: indices: expected",
                     "undefined");
  EXPECT_TIDAL_ERROR(ctx.set_indices(at::zeros({1, 2, 4}, at::kLong)), "DecodeContext.set_indices", "indices",
                     "int32", "Long");
  EXPECT_TIDAL_ERROR(ctx.set_indices(at::zeros({2, 4}, at::kInt)), "DecodeContext.set_indices", "indices", "[2, 4]");
  EXPECT_TIDAL_ERROR(ctx.set_indices(at::zeros({1, 2, 4}, at::kFloat)), "DecodeContext.set_indices", "indices");
  EXPECT_FALSE(ctx.has_indices());  // a rejected tensor is not stored
}

TEST(DecodeContext, SetIndicesRoundTripAndReset) {
  DecodeContext ctx(cfg(16, {1}), 4);
  ctx.begin_prefill(ints({9, 6}));
  ctx.begin_step();
  const at::Tensor idx = at::arange(2 * 4 * 3, at::kInt).reshape({2, 4, 3});
  ctx.set_indices(idx);
  ASSERT_TRUE(ctx.has_indices());
  EXPECT_TRUE(ctx.indices().is_same(idx));  // stored as is: no copy
  // The next step's sparse layers must not see the previous step's selection.
  ctx.begin_step();
  EXPECT_FALSE(ctx.has_indices());
  ctx.set_indices(idx);
  ctx.begin_step();
  ctx.begin_step();
  ctx.set_indices(idx + 1);
  EXPECT_EQ(ctx.step(), 4);
  // begin_prefill clears the selection and the step counter.
  ctx.begin_prefill(ints({3, 3}));
  EXPECT_FALSE(ctx.has_indices());
  EXPECT_EQ(ctx.step(), 0);
  EXPECT_TRUE(ctx.in_prefill());
}

// ---------------------------------------------------------------------------------------------
// TidalAttention: top_k >= context equals the all-full stack exactly

// Prefill + decode steps of a tidal stack (select_layers {1}) and an all-full stack with the same
// weights and inputs: with every token kept the selection covers the whole context, so every step's
// output and every cache row must be identical (the same kernels do the same math).
TEST(TidalAttention, LargeTopKEqualsFullStackExactly) {
  const Dims d;
  const int64_t L = 4, B = 2, T = 12, N = 32, steps = 8;
  for (const std::string mode : {"head", "group"}) {
    SCOPED_TRACE(mode);
    Model tidal_model(d, L, 7), full_model(d, L, 7);
    tidal_model.allocate(B, N);
    full_model.allocate(B, N);
    DecodeContext tidal_ctx(cfg(N, {1}, mode), L), full_ctx(cfg(N, {}, mode), L);
    const at::Tensor lens = ints({T, T - 3});
    tidal_ctx.begin_prefill(lens);
    full_ctx.begin_prefill(lens);
    const at::Tensor x = torch::randn({B, T, d.hidden});
    EXPECT_TRUE(same(tidal_model.prefill(x, tidal_ctx), full_model.prefill(x, full_ctx)));
    for (int64_t s = 1; s <= steps; ++s) {
      SCOPED_TRACE(::testing::Message() << "step " << s);
      tidal_ctx.begin_step();
      full_ctx.begin_step();
      ASSERT_EQ(tidal_ctx.role(2), LayerRole::Sparse);
      ASSERT_EQ(full_ctx.role(2), LayerRole::Full);
      const at::Tensor xs = torch::randn({B, d.hidden});
      EXPECT_TRUE(same(tidal_model.step(xs, tidal_ctx), full_model.step(xs, full_ctx)));
      // The selection of every sequence is all of its tokens (ascending, then -1).
      const at::Tensor idx = tidal_ctx.indices();
      ASSERT_EQ(idx.size(2), N);
      for (int64_t b = 0; b < B; ++b) {
        const int64_t len = to_vec(tidal_ctx.seq_lens())[b];
        const at::Tensor expect_row = at::cat({at::arange(len, at::kInt), at::full({N - len}, -1, at::kInt)});
        for (int64_t h = 0; h < idx.size(1); ++h) EXPECT_TRUE(same(idx[b][h], expect_row)) << "b " << b << " h " << h;
      }
    }
    for (int64_t l = 0; l < L; ++l) {
      EXPECT_TRUE(same(tidal_model.layers[l]->k_cache(), full_model.layers[l]->k_cache())) << "k_cache layer " << l;
      EXPECT_TRUE(same(tidal_model.layers[l]->v_cache(), full_model.layers[l]->v_cache())) << "v_cache layer " << l;
    }
  }
}

// The same through the *_qkv methods (no projections, no rope): every layer gets its own random q/k/v.
TEST(TidalAttention, LargeTopKEqualsFullStackExactlyQkv) {
  torch::NoGradGuard no_grad;
  const Dims d;
  const int64_t L = 4, B = 3, T = 10, N = 24, steps = 6;
  Model tidal_model(d, L, 3, /*projections=*/false), full_model(d, L, 3, false);
  tidal_model.allocate(B, N);
  full_model.allocate(B, N);
  DecodeContext tidal_ctx(cfg(N, {1}, "head", 1, 2), L), full_ctx(cfg(N, {}), L);
  const at::Tensor lens = ints({T, 4, 7});
  tidal_ctx.begin_prefill(lens);
  full_ctx.begin_prefill(lens);
  for (int64_t l = 0; l < L; ++l) {
    const at::Tensor q = torch::randn({B, d.Hq, T, d.D}), k = torch::randn({B, d.Hkv, T, d.D}),
                     v = torch::randn({B, d.Hkv, T, d.D});
    EXPECT_TRUE(same(tidal_model.layers[l]->prefill_qkv(q, k, v, tidal_ctx),
                     full_model.layers[l]->prefill_qkv(q, k, v, full_ctx)))
        << "prefill layer " << l;
  }
  for (int64_t s = 1; s <= steps; ++s) {
    tidal_ctx.begin_step();
    full_ctx.begin_step();
    for (int64_t l = 0; l < L; ++l) {
      const at::Tensor q = torch::randn({B, d.Hq, d.D}), k = torch::randn({B, d.Hkv, d.D}),
                       v = torch::randn({B, d.Hkv, d.D});
      const at::Tensor out = tidal_model.layers[l]->decode_qkv(q, k, v, tidal_ctx);
      EXPECT_EQ(out.sizes(), (c10::IntArrayRef{B, d.Hq, d.D}));
      EXPECT_TRUE(same(out, full_model.layers[l]->decode_qkv(q, k, v, full_ctx))) << "step " << s << " layer " << l;
    }
  }
}

// ---------------------------------------------------------------------------------------------
// TidalAttention: small top_k against a step-by-step reference

// A double-precision re-implementation of the stack from the layer semantics: its own projections
// (the modules' weights), rotary embedding, caches, softmax and top-k selection.
struct Reference {
  Dims d;
  int64_t top_k, sink, recent;
  bool group;
  double scale;
  std::vector<at::Tensor> Wq, Wk, Wv, Wo, K, V;  // per layer; K/V [B, Hkv, N, D]
  std::vector<int64_t> lens;                       // valid length per sequence (host)
  // the last select layer's reference selection and scores, [B][Hsel]
  std::vector<std::vector<std::vector<int64_t>>> last_selection;
  std::vector<std::vector<at::Tensor>> last_scores;

  Reference(const Model& m, const Dims& dims, const TidalConfig& c, int64_t B, int64_t N)
      : d(dims), top_k(c.top_k), sink(c.sink), recent(c.recent), group(c.mode == tidal::SelectMode::Group),
        scale(1.0 / std::sqrt(double(dims.D))) {
    for (const auto& layer : m.layers) {
      auto p = layer->named_parameters();
      Wq.push_back(p["q_proj.weight"].detach().to(at::kDouble));
      Wk.push_back(p["k_proj.weight"].detach().to(at::kDouble));
      Wv.push_back(p["v_proj.weight"].detach().to(at::kDouble));
      Wo.push_back(p["o_proj.weight"].detach().to(at::kDouble));
      K.push_back(at::zeros({B, d.Hkv, N, d.D}, at::kDouble));
      V.push_back(at::zeros({B, d.Hkv, N, d.D}, at::kDouble));
    }
  }
  int64_t G() const { return d.Hq / d.Hkv; }

  // x [B, S, D'] rows at positions pos [B, S] (long): Llama rotate_half rope in double.
  at::Tensor rope(const at::Tensor& x, const at::Tensor& pos) const {
    const at::Tensor inv = at::pow(d.theta, -at::arange(0, d.D, 2, at::kDouble) / double(d.D));  // [D/2]
    at::Tensor ang = pos.to(at::kDouble).unsqueeze(-1) * inv;                                      // [B, S, D/2]
    ang = at::cat({ang, ang}, -1).unsqueeze(1);                                                    // [B, 1, S, D]
    const int64_t h = d.D / 2;
    const at::Tensor rot = at::cat({-x.narrow(-1, h, h), x.narrow(-1, 0, h)}, -1);
    return x * ang.cos() + rot * ang.sin();
  }
  // x [B, S, hidden] -> [B, heads, S, D]
  at::Tensor proj(const at::Tensor& W, const at::Tensor& x, int64_t heads) const {
    return at::matmul(x, W.t()).view({x.size(0), x.size(1), heads, d.D}).transpose(1, 2);
  }
  // softmax attention of one query [D] over the listed positions of (b, kv head g)
  at::Tensor attend(int64_t l, int64_t b, int64_t g, const at::Tensor& q, const std::vector<int64_t>& pos) const {
    const at::Tensor p = at::tensor(pos, at::kLong);
    const at::Tensor k = K[l][b][g].index_select(0, p), v = V[l][b][g].index_select(0, p);
    return at::matmul(at::softmax(at::mv(k, q) * scale, 0), v);
  }
  // Selection scores of (b, row) over 0..len-1 (head: scale q.k; group: max log-softmax of the group).
  at::Tensor scores(int64_t l, int64_t b, int64_t row, const at::Tensor& q /*[Hq, D]*/) const {
    const int64_t len = lens[b];
    if (!group) return at::mv(K[l][b][row / G()].narrow(0, 0, len), q[row]) * scale;
    at::Tensor best;
    for (int64_t h = row * G(); h < (row + 1) * G(); ++h) {
      const at::Tensor s = at::mv(K[l][b][row].narrow(0, 0, len), q[h]) * scale;
      const at::Tensor lp = s - at::logsumexp(s, 0);
      best = best.defined() ? at::maximum(best, lp) : lp;
    }
    return best;
  }
  std::vector<int64_t> forced(int64_t len) const {
    std::set<int64_t> f{len - 1};
    for (int64_t t = 0; t < std::min(sink, len); ++t) f.insert(t);
    for (int64_t t = std::max<int64_t>(len - recent, 0); t < len; ++t) f.insert(t);
    return {f.begin(), f.end()};
  }
  // Reference selection (ascending): the forced tokens plus the best-scoring others (ties: lower first).
  std::vector<int64_t> select(const at::Tensor& s, int64_t len) const {
    std::vector<int64_t> out;
    if (len <= top_k) {
      for (int64_t t = 0; t < len; ++t) out.push_back(t);
      return out;
    }
    out = forced(len);
    std::vector<int64_t> others;
    for (int64_t t = 0; t < len; ++t)
      if (!std::binary_search(out.begin(), out.end(), t)) others.push_back(t);
    const auto sv = s.contiguous();
    const double* sp = sv.data_ptr<double>();
    std::stable_sort(others.begin(), others.end(), [&](int64_t a, int64_t b) { return sp[a] > sp[b]; });
    others.resize(top_k - out.size());
    out.insert(out.end(), others.begin(), others.end());
    std::sort(out.begin(), out.end());
    return out;
  }

  // Prefill of x [B, T, hidden] (causal over all T positions of every row, like the module).
  at::Tensor prefill(const at::Tensor& x, const std::vector<int64_t>& prompt_lens) {
    lens = prompt_lens;
    const int64_t B = x.size(0), T = x.size(1);
    const at::Tensor pos = at::arange(T, at::kLong).unsqueeze(0).expand({B, T});
    at::Tensor h = x.to(at::kDouble);
    for (size_t l = 0; l < Wq.size(); ++l) {
      const at::Tensor q = rope(proj(Wq[l], h, d.Hq), pos), k = rope(proj(Wk[l], h, d.Hkv), pos),
                       v = proj(Wv[l], h, d.Hkv);
      K[l].narrow(2, 0, T).copy_(k);
      V[l].narrow(2, 0, T).copy_(v);
      const at::Tensor kk = k.repeat_interleave(G(), 1), vv = v.repeat_interleave(G(), 1);
      at::Tensor s = at::matmul(q, kk.transpose(-1, -2)) * scale;                       // [B, Hq, T, T]
      s = s.masked_fill(at::ones({T, T}, at::kBool).triu(1), -INFINITY);
      const at::Tensor o = at::matmul(at::softmax(s, -1), vv);                           // [B, Hq, T, D]
      h = h + at::matmul(o.transpose(1, 2).reshape({B, T, -1}), Wo[l].t());
    }
    return h;
  }

  // One decode layer: appends k/v, attends per role. A select layer stores its reference selection
  // in last_selection/last_scores; a sparse layer attends over `use` (the checked selection).
  at::Tensor layer_step(size_t l, const at::Tensor& x /*[B, hidden]*/, LayerRole role,
                        const std::vector<std::vector<std::vector<int64_t>>>& use) {
    const int64_t B = x.size(0);
    std::vector<int64_t> p(lens.begin(), lens.end());
    for (auto& v : p) v -= 1;
    const at::Tensor pos = at::tensor(p, at::kLong).unsqueeze(1);
    const at::Tensor x3 = x.to(at::kDouble).unsqueeze(1);
    const at::Tensor q = rope(proj(Wq[l], x3, d.Hq), pos).squeeze(2), k = rope(proj(Wk[l], x3, d.Hkv), pos).squeeze(2),
                     v = proj(Wv[l], x3, d.Hkv).squeeze(2);
    at::Tensor out = at::zeros({B, d.Hq, d.D}, at::kDouble);
    if (role == LayerRole::Select) {
      last_selection.assign(B, {});
      last_scores.assign(B, {});
    }
    for (int64_t b = 0; b < B; ++b) {
      K[l][b].select(1, p[b]).copy_(k[b]);
      V[l][b].select(1, p[b]).copy_(v[b]);
      std::vector<int64_t> all;
      for (int64_t t = 0; t < lens[b]; ++t) all.push_back(t);
      if (role == LayerRole::Select) {
        const int64_t Hsel = group ? d.Hkv : d.Hq;
        for (int64_t r = 0; r < Hsel; ++r) {
          last_scores[b].push_back(scores(l, b, r, q[b]));
          last_selection[b].push_back(select(last_scores[b].back(), lens[b]));
        }
      }
      for (int64_t h = 0; h < d.Hq; ++h) {
        const bool sparse = role == LayerRole::Sparse;
        const auto& positions = sparse ? use[b][use[b].size() == size_t(d.Hq) ? h : h / G()] : all;
        out[b][h].copy_(attend(l, b, h / G(), q[b][h], positions));
      }
    }
    return at::matmul(out.reshape({B, -1}), Wo[l].t());
  }
};

// Checks the op's selection against the reference one, row by row: int32, ascending valid entries
// then -1, the same count, every forced position present, and every position in which the two
// differ has a reference score within a rounding tolerance of the cutoff (a near-tie the fp32
// kernel may break the other way). Returns the op's selection as position lists: what this step's
// sparse layers attend over (so a legitimate near-tie flip cannot derail the sparse reference).
std::vector<std::vector<std::vector<int64_t>>> check_selection(const at::Tensor& op_idx, const Reference& ref) {
  std::vector<std::vector<std::vector<int64_t>>> out(op_idx.size(0));
  EXPECT_EQ(op_idx.scalar_type(), at::kInt);
  EXPECT_EQ(op_idx.size(2), ref.top_k);
  for (int64_t b = 0; b < op_idx.size(0); ++b) {
    const int64_t len = ref.lens[b];
    for (int64_t r = 0; r < op_idx.size(1); ++r) {
      SCOPED_TRACE(::testing::Message() << "selection b " << b << " row " << r << " (len " << len << ")");
      const std::vector<int32_t> row = to_vec(op_idx[b][r]);
      std::vector<int64_t> got;
      size_t i = 0;
      for (; i < row.size() && row[i] >= 0; ++i) got.push_back(row[i]);
      for (; i < row.size(); ++i) EXPECT_EQ(row[i], -1) << "padding must be -1 after the valid entries";
      EXPECT_TRUE(std::is_sorted(got.begin(), got.end()));
      const auto& exp = ref.last_selection[b][r];
      EXPECT_EQ(got.size(), exp.size());
      for (int64_t f : ref.forced(len))
        if (len > ref.top_k) EXPECT_TRUE(std::binary_search(got.begin(), got.end(), f)) << "forced " << f << " missing";
      out[b].push_back(got);
      if (got == exp) continue;
      const auto s = ref.last_scores[b][r];
      const auto forced = ref.forced(len);
      double cutoff = INFINITY;
      for (int64_t t : exp)
        if (!std::binary_search(forced.begin(), forced.end(), t)) cutoff = std::min(cutoff, s[t].item<double>());
      std::vector<int64_t> diff;
      std::set_symmetric_difference(got.begin(), got.end(), exp.begin(), exp.end(), std::back_inserter(diff));
      for (int64_t t : diff) {
        EXPECT_TRUE(t >= 0 && t < len) << t;
        if (t < 0 || t >= len) continue;
        EXPECT_NEAR(s[t].item<double>(), cutoff, 1e-4 * (1 + std::abs(cutoff)))
            << "position " << t << " differs (op " << c10::IntArrayRef(got) << ", reference " << c10::IntArrayRef(exp)
            << ") without a near-tie";
      }
    }
  }
  return out;
}

// Small top_k (well below the context): every layer's output at every step, and the selection of
// every select layer, match the reference. Schedules with a re-selection layer; head mode with
// sink/recent, group mode without.
TEST(TidalAttention, SmallTopKMatchesStepByStepReference) {
  torch::NoGradGuard no_grad;
  const Dims d;
  const int64_t L = 5, B = 2, T = 20, N = 40, steps = 6;
  for (const TidalConfig& c : {cfg(6, {1, 3}, "head", 1, 2), cfg(5, {1}, "group"), cfg(4, {0, 2}, "head")}) {
    SCOPED_TRACE(::testing::Message() << "mode " << tidal::to_string(c.mode) << " top_k " << c.top_k << " select "
                                      << c10::IntArrayRef(c.select_layers));
    Model m(d, L, 11);
    m.allocate(B, N);
    Reference ref(m, d, c, B, N);
    DecodeContext ctx(c, L);
    const std::vector<int64_t> prompt{T, T - 5};
    ctx.begin_prefill(ints({T, T - 5}));
    const at::Tensor x = torch::randn({B, T, d.hidden});
    const at::Tensor h_ref = ref.prefill(x, prompt);
    const at::Tensor h_mod = m.prefill(x, ctx);
    EXPECT_TRUE(near(h_mod, h_ref, 1e-4, 1e-4)) << "prefill";
    int64_t sparse_layers_checked = 0;
    for (int64_t s = 1; s <= steps; ++s) {
      SCOPED_TRACE(::testing::Message() << "step " << s);
      ctx.begin_step();
      for (auto& len : ref.lens) ++len;
      at::Tensor hm = torch::randn({B, d.hidden});
      at::Tensor hr = hm.to(at::kDouble);
      std::vector<std::vector<std::vector<int64_t>>> current;  // this step's checked selection
      for (int64_t l = 0; l < L; ++l) {
        const LayerRole role = ctx.role(l);
        const at::Tensor out_ref = ref.layer_step(l, hr, role, current);
        const at::Tensor out_mod = m.layers[l]->decode_step(hm, ctx);
        EXPECT_TRUE(near(out_mod, out_ref, 1e-4, 1e-4)) << "layer " << l << " (" << tidal::to_string(role) << ")";
        if (role == LayerRole::Select) current = check_selection(ctx.indices(), ref);
        if (role == LayerRole::Sparse) ++sparse_layers_checked;
        hm = hm + out_mod;
        hr = hr + out_ref;
      }
    }
    EXPECT_GT(sparse_layers_checked, 0);
  }
}

// The sparse layers really attend over a subset: with small top_k the tidal stack departs from the
// all-full stack (else the reference test above would not tell sparse from full attention).
TEST(TidalAttention, SmallTopKDiffersFromFullAttention) {
  torch::NoGradGuard no_grad;
  const Dims d;
  const int64_t L = 3, B = 1, T = 30, N = 40;
  Model tidal_model(d, L, 5), full_model(d, L, 5);
  tidal_model.allocate(B, N);
  full_model.allocate(B, N);
  DecodeContext tidal_ctx(cfg(4, {1}), L), full_ctx(cfg(4, {}), L);
  tidal_ctx.begin_prefill(ints({T}));
  full_ctx.begin_prefill(ints({T}));
  const at::Tensor x = torch::randn({B, T, d.hidden});
  tidal_model.prefill(x, tidal_ctx);
  full_model.prefill(x, full_ctx);
  tidal_ctx.begin_step();
  full_ctx.begin_step();
  const at::Tensor xs = torch::randn({B, d.hidden});
  at::Tensor ht = xs, hf = xs;
  for (int64_t l = 0; l < L; ++l) {
    const at::Tensor ot = tidal_model.layers[l]->decode_step(ht, tidal_ctx);
    const at::Tensor of = full_model.layers[l]->decode_step(hf, full_ctx);
    if (l < 2) EXPECT_TRUE(same(ot, of)) << "layer " << l;  // full and select: full attention
    else EXPECT_GT(max_diff(ot, of), 1e-3) << "sparse layer " << l << " equals full attention";
    ht = ht + ot;
    hf = hf + of;
  }
}

// ---------------------------------------------------------------------------------------------
// TidalAttention: a right-padded batch with unequal lengths

// Sequence 1 of the batch is 7 tokens shorter; its padding (NaN input rows) sits in the cache beyond
// its length and must never reach its outputs: each sequence in the batch gives what it gives alone.
TEST(TidalAttention, UnequalLengthsMatchEachSequenceAlone) {
  torch::NoGradGuard no_grad;
  const Dims d;
  const int64_t L = 4, T = 16, N = 32, steps = 5;
  const std::vector<int64_t> lens{T, T - 7};
  for (const TidalConfig& c : {cfg(6, {1}, "head", 1, 1), cfg(N, {}), cfg(5, {1}, "group")}) {
    SCOPED_TRACE(::testing::Message() << "mode " << tidal::to_string(c.mode) << " top_k " << c.top_k);
    at::Tensor x = torch::randn({2, T, d.hidden});
    x[1].narrow(0, lens[1], T - lens[1]).fill_(kNaN);
    std::vector<at::Tensor> xs;
    for (int64_t s = 0; s < steps; ++s) xs.push_back(torch::randn({2, d.hidden}));

    Model batch(d, L, 21);
    batch.allocate(2, N);
    DecodeContext ctx(c, L);
    ctx.begin_prefill(ints({int32_t(lens[0]), int32_t(lens[1])}));
    const at::Tensor pre = batch.prefill(x, ctx);
    std::vector<at::Tensor> outs, sel;
    for (int64_t s = 0; s < steps; ++s) {
      ctx.begin_step();
      outs.push_back(batch.step(xs[s], ctx));
      sel.push_back(ctx.has_indices() ? ctx.indices().clone() : at::Tensor());
      EXPECT_TRUE(outs.back().isfinite().all().item<bool>()) << "step " << s + 1;
    }
    for (int64_t b = 0; b < 2; ++b) {
      SCOPED_TRACE(::testing::Message() << "sequence " << b);
      Model alone(d, L, 21);
      alone.allocate(1, N);
      DecodeContext actx(c, L);
      actx.begin_prefill(ints({int32_t(lens[b])}));
      const at::Tensor apre = alone.prefill(x[b].narrow(0, 0, lens[b]).unsqueeze(0), actx);
      EXPECT_TRUE(near(pre[b].narrow(0, 0, lens[b]), apre[0], 1e-5, 1e-5)) << "prefill";
      for (int64_t s = 0; s < steps; ++s) {
        actx.begin_step();
        const at::Tensor a = alone.step(xs[s][b].unsqueeze(0), actx);
        EXPECT_TRUE(near(outs[s][b], a[0], 1e-5, 1e-5)) << "step " << s + 1;
        EXPECT_EQ(actx.has_indices(), sel[s].defined());
        if (actx.has_indices() && sel[s].defined())  // the same selection as in the batch
          EXPECT_EQ(to_vec(actx.indices()[0]), to_vec(sel[s][b])) << "step " << s + 1;
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// TidalAttention: KV-cache correction

// Three stacks with the same weights and token inputs, S = correction_stride = 3, two rounds:
//   tidal   small top_k, corrects every S steps
//   fullc   all full, corrects every S steps (the same correction calls)
//   full    all full, never corrects (what full attention wrote at decode time)
// At each correction: the tidal rows outside start..start+S-1 are untouched; the rewritten rows equal
// fullc's exactly (same inputs, same kernels: prefill rows and earlier corrected rows are identical)
// and full's decode-time rows up to rounding; before the correction the deepest layers' rows
// differed from full's (the sparse layers changed them), so the check is not vacuous.
TEST(TidalAttention, CorrectionRewritesLastStrideRows) {
  torch::NoGradGuard no_grad;
  const Dims d;
  const int64_t L = 5, T = 14, N = 40, S = 3, rounds = 2;
  const std::vector<int32_t> prompt{T, T - 4};
  const int64_t B = 2;
  Model tidal_model(d, L, 31), fullc(d, L, 31), full(d, L, 31);
  for (Model* m : {&tidal_model, &fullc, &full}) m->allocate(B, N);
  DecodeContext tctx(cfg(4, {1}, "head", 0, 0, S), L), cctx(cfg(4, {}, "head", 0, 0, S), L), fctx(cfg(4, {}), L);
  const at::Tensor x = torch::randn({B, T, d.hidden});
  for (auto [m, c] : std::vector<std::pair<Model*, DecodeContext*>>{{&tidal_model, &tctx}, {&fullc, &cctx}, {&full, &fctx}}) {
    c->begin_prefill(ints(prompt));
    m->prefill(x, *c);
  }
  for (int64_t round = 0; round < rounds; ++round) {
    SCOPED_TRACE(::testing::Message() << "round " << round + 1);
    std::vector<at::Tensor> inputs, full_outs;
    for (int64_t s = 0; s < S; ++s) {
      const at::Tensor xs = torch::randn({B, d.hidden});
      inputs.push_back(xs);
      tctx.begin_step();
      cctx.begin_step();
      fctx.begin_step();
      EXPECT_EQ(tctx.correction_due(), s == S - 1) << "step " << tctx.step();
      EXPECT_EQ(cctx.correction_due(), s == S - 1);
      EXPECT_FALSE(fctx.correction_due());
      tidal_model.step(xs, tctx);
      fullc.step(xs, cctx);
      full_outs.push_back(full.step(xs, fctx));
    }
    ASSERT_TRUE(tctx.correction_due());
    const std::vector<int32_t> start = to_vec(tctx.correction_start(S));
    EXPECT_EQ(start, (std::vector<int32_t>{int32_t(T + round * S), int32_t(T - 4 + round * S)}));

    std::vector<at::Tensor> k_before, v_before;
    for (auto& l : tidal_model.layers) {
      k_before.push_back(l->k_cache().clone());
      v_before.push_back(l->v_cache().clone());
    }
    // Before the correction the sparse layers' effect shows in the deepest layers' rows.
    double deepest_gap = 0;
    for (int64_t b = 0; b < B; ++b)
      deepest_gap = std::max(deepest_gap, max_diff(k_before[L - 1][b].narrow(1, start[b], S),
                                                   full.layers[L - 1]->k_cache()[b].narrow(1, start[b], S)));
    EXPECT_GT(deepest_gap, 1e-3) << "the tidal cache already equals full attention's: the check would be vacuous";

    const at::Tensor chunk = at::stack(inputs, 1);  // [B, S, hidden]: the last S token inputs
    const at::Tensor tout = tidal_model.correct(chunk, tctx);
    const at::Tensor cout_ = fullc.correct(chunk, cctx);
    EXPECT_TRUE(same(tout, cout_)) << "correct() outputs";
    // The corrected outputs of the last S tokens are what full attention gave at decode time.
    EXPECT_TRUE(near(tout, at::stack(full_outs, 1), 1e-4, 1e-4));

    for (int64_t l = 0; l < L; ++l) {
      SCOPED_TRACE(::testing::Message() << "layer " << l);
      const auto& lt = tidal_model.layers[l];
      for (int64_t b = 0; b < B; ++b) {
        const int64_t st = start[b];
        using Row = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, const char*>;
        for (auto [now, before, c_ref, f_ref, name] : std::vector<Row>{
                 {lt->k_cache(), k_before[l], fullc.layers[l]->k_cache(), full.layers[l]->k_cache(), "k"},
                 {lt->v_cache(), v_before[l], fullc.layers[l]->v_cache(), full.layers[l]->v_cache(), "v"}}) {
          SCOPED_TRACE(::testing::Message() << name << "_cache b " << b);
          // untouched outside the window
          EXPECT_TRUE(same(now[b].narrow(1, 0, st), before[b].narrow(1, 0, st))) << "rows before start";
          EXPECT_TRUE(same(now[b].narrow(1, st + S, N - st - S), before[b].narrow(1, st + S, N - st - S)))
              << "rows after the window";
          // the window rewritten: exactly as the all-full stack's correction, close to full's decode rows
          EXPECT_TRUE(same(now[b].narrow(1, st, S), c_ref[b].narrow(1, st, S))) << "window vs corrected full stack";
          EXPECT_TRUE(near(now[b].narrow(1, st, S), f_ref[b].narrow(1, st, S), 1e-4, 1e-4))
              << "window vs full attention's decode-time rows";
        }
      }
      // Everything valid in the cache now equals the corrected all-full stack's.
      for (int64_t b = 0; b < B; ++b) {
        const int64_t len = to_vec(tctx.seq_lens())[b];
        EXPECT_TRUE(same(lt->k_cache()[b].narrow(1, 0, len), fullc.layers[l]->k_cache()[b].narrow(1, 0, len)));
        EXPECT_TRUE(same(lt->v_cache()[b].narrow(1, 0, len), fullc.layers[l]->v_cache()[b].narrow(1, 0, len)));
      }
    }
  }
}

// correct_qkv writes the given rows at seq_lens - S and attends causally (no projections).
TEST(TidalAttention, CorrectQkvRewritesRows) {
  torch::NoGradGuard no_grad;
  const Dims d;
  const int64_t B = 2, N = 16, S = 2;
  TidalAttention layer(layer_options(d, 0, false));
  layer->allocate_cache(B, N, at::kFloat);
  DecodeContext ctx(cfg(4, {}, "head", 0, 0, S), 1);
  ctx.begin_prefill(ints({6, 3}));
  layer->prefill_qkv(torch::randn({B, d.Hq, 6, d.D}), torch::randn({B, d.Hkv, 6, d.D}),
                     torch::randn({B, d.Hkv, 6, d.D}), ctx);
  for (int i = 0; i < S; ++i) {
    ctx.begin_step();
    layer->decode_qkv(torch::randn({B, d.Hq, d.D}), torch::randn({B, d.Hkv, d.D}), torch::randn({B, d.Hkv, d.D}), ctx);
  }
  const at::Tensor k_before = layer->k_cache().clone(), v_before = layer->v_cache().clone();
  const at::Tensor q = torch::randn({B, d.Hq, S, d.D}), k = torch::randn({B, d.Hkv, S, d.D}),
                   v = torch::randn({B, d.Hkv, S, d.D});
  const at::Tensor out = layer->correct_qkv(q, k, v, ctx);
  EXPECT_EQ(out.sizes(), q.sizes());
  const std::vector<int64_t> start{6, 3};
  for (int64_t b = 0; b < B; ++b) {
    EXPECT_TRUE(same(layer->k_cache()[b].narrow(1, start[b], S), k[b]));
    EXPECT_TRUE(same(layer->v_cache()[b].narrow(1, start[b], S), v[b]));
    EXPECT_TRUE(same(layer->k_cache()[b].narrow(1, 0, start[b]), k_before[b].narrow(1, 0, start[b])));
    const int64_t after = start[b] + S;
    EXPECT_TRUE(same(layer->k_cache()[b].narrow(1, after, N - after), k_before[b].narrow(1, after, N - after)));
    // the last query sees everything up to its own position: plain softmax attention per head
    for (int64_t h = 0; h < d.Hq; ++h) {
      const at::Tensor kk = layer->k_cache()[b][h / 2].narrow(0, 0, after).to(at::kDouble);
      const at::Tensor vv = layer->v_cache()[b][h / 2].narrow(0, 0, after).to(at::kDouble);
      const at::Tensor p = at::softmax(at::mv(kk, q[b][h][S - 1].to(at::kDouble)) / std::sqrt(double(d.D)), 0);
      EXPECT_TRUE(near(out[b][h][S - 1], at::matmul(p, vv), 1e-5, 1e-5)) << "b " << b << " h " << h;
    }
  }
}

// ---------------------------------------------------------------------------------------------
// TidalAttention: rope

TEST(TidalAttention, RopeAtPositionZeroIsIdentityAndPreservesNorms) {
  const Dims d;
  TidalAttention layer(layer_options(d, 0));
  const at::Tensor x = torch::randn({2, 3, 5, d.D});
  for (at::ScalarType pt : {at::kInt, at::kLong}) {
    EXPECT_TRUE(same(layer->rotate(x, at::zeros({2, 5}, pt)), x));
    const at::Tensor pos = at::randint(0, d.max_positions, {2, 5}, at::TensorOptions().dtype(pt));
    const at::Tensor r = layer->rotate(x, pos);
    EXPECT_EQ(r.sizes(), x.sizes());
    EXPECT_TRUE(near(r.norm(2, -1), x.norm(2, -1), 1e-5, 1e-5));
    EXPECT_GT(max_diff(r, x), 1e-2);  // it did rotate
  }
}

// Llama convention: dim i pairs with dim i + D/2, angle p * theta^(-2i/D).
TEST(TidalAttention, RopeMatchesLlamaConvention) {
  const Dims d;
  TidalAttention layer(layer_options(d, 0));
  const int64_t p = 5, half = d.D / 2;
  for (int64_t i : {0, 1, 7}) {
    const double angle = p * std::pow(d.theta, -2.0 * i / double(d.D));
    const at::Tensor x = unit(i).reshape({1, 1, 1, d.D});
    const at::Tensor expected = vec({{i, std::cos(angle)}, {i + half, std::sin(angle)}}).reshape({1, 1, 1, d.D});
    EXPECT_TRUE(near(layer->rotate(x, at::full({1, 1}, p, at::kLong)), expected, 1e-6)) << "dim " << i;
  }
  // Scores depend on the relative position only: <R(p1) q, R(p2) k> == <R(p1+s) q, R(p2+s) k>.
  const at::Tensor q = torch::randn({1, 1, 1, d.D}), k = torch::randn({1, 1, 1, d.D});
  auto score = [&](int64_t pq, int64_t pk) {
    return (layer->rotate(q, at::full({1, 1}, pq, at::kLong)) * layer->rotate(k, at::full({1, 1}, pk, at::kLong)))
        .sum()
        .item<double>();
  };
  EXPECT_NEAR(score(9, 4), score(30, 25), 1e-4);
  EXPECT_NEAR(score(3, 3), (q * k).sum().item<double>(), 1e-4);
  // Without rope, rotate is the identity (the same tensor).
  TidalAttention plain(layer_options(d, 0, false));
  EXPECT_TRUE(plain->rotate(q, at::full({1, 1}, 3, at::kLong)).is_same(q));
}

// ---------------------------------------------------------------------------------------------
// TidalAttention: borrowed caches

// Each layer's cache is a slice of one model-wide NaN-filled buffer [L, 2, B + 1, Hkv, N + 6, D]
// (offset in batch and position, non-trivial strides). Outputs equal an owned-cache run, the rows land
// in the buffer, and nothing outside the slices is touched.
TEST(TidalAttention, BorrowedCacheSlicesOfABiggerBuffer) {
  torch::NoGradGuard no_grad;
  const Dims d;
  const int64_t L = 3, B = 2, T = 10, N = 24, steps = 5, S = 2;
  const TidalConfig c = cfg(4, {1}, "head", 0, 1, S);
  Model owned(d, L, 41), borrowed(d, L, 41);
  owned.allocate(B, N);
  at::Tensor buffer = at::full({L, 2, B + 1, d.Hkv, N + 6, d.D}, kNaN);
  auto slice = [&](int64_t l, int64_t kv) { return buffer[l][kv].narrow(0, 1, B).narrow(2, 3, N); };
  for (int64_t l = 0; l < L; ++l) {
    borrowed.layers[l]->set_cache(slice(l, 0), slice(l, 1));
    EXPECT_EQ(borrowed.layers[l]->k_cache().data_ptr(), slice(l, 0).data_ptr());
    EXPECT_FALSE(borrowed.layers[l]->k_cache().is_contiguous());
  }
  const at::Tensor outside_mask = [&] {
    at::Tensor m = at::ones({L, 2, B + 1, d.Hkv, N + 6, d.D}, at::kBool);
    for (int64_t l = 0; l < L; ++l)
      for (int64_t kv = 0; kv < 2; ++kv) m[l][kv].narrow(0, 1, B).narrow(2, 3, N).fill_(false);
    return m;
  }();
  DecodeContext octx(c, L), bctx(c, L);
  const at::Tensor x = torch::randn({B, T, d.hidden});
  octx.begin_prefill(ints({T, T - 2}));
  bctx.begin_prefill(ints({T, T - 2}));
  EXPECT_TRUE(same(borrowed.prefill(x, bctx), owned.prefill(x, octx)));
  std::vector<at::Tensor> inputs;
  for (int64_t s = 1; s <= steps; ++s) {
    octx.begin_step();
    bctx.begin_step();
    inputs.push_back(torch::randn({B, d.hidden}));
    EXPECT_TRUE(same(borrowed.step(inputs.back(), bctx), owned.step(inputs.back(), octx))) << "step " << s;
    if (bctx.correction_due()) {
      const at::Tensor chunk = at::stack(std::vector<at::Tensor>(inputs.end() - S, inputs.end()), 1);
      EXPECT_TRUE(same(borrowed.correct(chunk, bctx), owned.correct(chunk, octx))) << "correct at step " << s;
    }
  }
  const std::vector<int32_t> lens = to_vec(bctx.seq_lens());
  for (int64_t l = 0; l < L; ++l)
    for (int64_t b = 0; b < B; ++b) {
      // the rows live in the buffer itself
      EXPECT_TRUE(same(buffer[l][0][1 + b].narrow(1, 3, lens[b]), owned.layers[l]->k_cache()[b].narrow(1, 0, lens[b])))
          << "layer " << l << " b " << b;
      EXPECT_TRUE(same(buffer[l][1][1 + b].narrow(1, 3, lens[b]), owned.layers[l]->v_cache()[b].narrow(1, 0, lens[b])))
          << "layer " << l << " b " << b;
    }
  EXPECT_TRUE(buffer.masked_select(outside_mask).isnan().all().item<bool>()) << "a write landed outside the slices";
}

// ---------------------------------------------------------------------------------------------
// TidalAttention: misuse

TEST(TidalAttention, ConstructorValidates) {
  const Dims d;
  auto with = [&](auto change) {
    TidalAttentionOptions o = layer_options(d, 0);
    change(o);
    return o;
  };
  EXPECT_TIDAL_ERROR(TidalAttention(with([](auto& o) { o.layer_idx = -1; })), "tidal.TidalAttention: layer_idx");
  EXPECT_TIDAL_ERROR(TidalAttention(with([](auto& o) { o.num_kv_heads = 3; })), "TidalAttention",
                     "num_heads/num_kv_heads", "4/3");
  EXPECT_TIDAL_ERROR(TidalAttention(with([](auto& o) { o.num_kv_heads = 0; })), "TidalAttention", "num_kv_heads");
  EXPECT_TIDAL_ERROR(TidalAttention(with([](auto& o) { o.head_dim = 48; })), "TidalAttention", "head_dim", "48");
  EXPECT_TIDAL_ERROR(TidalAttention(with([](auto& o) { o.hidden_size = -1; })), "TidalAttention", "hidden_size");
  EXPECT_TIDAL_ERROR(TidalAttention(with([](auto& o) { o.max_positions = 0; })), "TidalAttention", "max_positions");
  EXPECT_TIDAL_ERROR(TidalAttention(with([](auto& o) { o.scale = std::nan(""); })), "TidalAttention: scale", "nan");
}

// Misconfigured caches fail where they are attached, not at the first token.
TEST(TidalAttention, AllocateCacheValidates) {
  const Dims d;
  TidalAttention layer(layer_options(d, 0));
  EXPECT_TIDAL_ERROR(layer->allocate_cache(-1, 8, at::kFloat), "TidalAttention.allocate_cache: batch", "-1");
  EXPECT_TIDAL_ERROR(layer->allocate_cache(1, -1, at::kFloat), "TidalAttention.allocate_cache: capacity", "-1");
  EXPECT_TIDAL_ERROR(layer->allocate_cache(1, int64_t(1) << 31, at::kFloat), "TidalAttention.allocate_cache: capacity",
                     "2147483648");
  EXPECT_TIDAL_ERROR(layer->allocate_cache(1, 8, at::kDouble), "TidalAttention.allocate_cache: dtype", "Double");
  EXPECT_FALSE(layer->k_cache().defined());
}

// A layer whose index lies beyond the context's model fails at its first call (the prefill), not
// at the first decode step where the context's role() would reject it.
TEST(TidalAttention, LayerBeyondTheContextFailsAtPrefill) {
  torch::NoGradGuard no_grad;
  const Dims d;
  TidalAttention layer(layer_options(d, 2));
  layer->allocate_cache(1, 16, at::kFloat);
  DecodeContext ctx(cfg(4, {}), 2);
  ctx.begin_prefill(ints({3}));
  EXPECT_TIDAL_ERROR(layer->prefill(torch::randn({1, 3, d.hidden}), ctx), "TidalAttention.prefill: ctx",
                     "layer_idx = 2", "2 layers");
}

TEST(TidalAttention, UseBeforeCacheNamesTheLayer) {
  torch::NoGradGuard no_grad;
  const Dims d;
  TidalAttention layer(layer_options(d, 0));
  DecodeContext ctx(cfg(4, {}), 1);
  ctx.begin_prefill(ints({3}));
  EXPECT_TIDAL_ERROR(layer->prefill(torch::randn({1, 3, d.hidden}), ctx), "tidal.TidalAttention", "k_cache",
                     "allocate_cache");
  ctx.begin_step();
  EXPECT_TIDAL_ERROR(layer->decode_step(torch::randn({1, d.hidden}), ctx), "tidal.TidalAttention", "k_cache",
                     "allocate_cache");
  EXPECT_TIDAL_ERROR(layer->correct(torch::randn({1, 1, d.hidden}), ctx), "tidal.TidalAttention", "k_cache");
  TidalAttention plain(layer_options(d, 0, false));
  EXPECT_TIDAL_ERROR(plain->decode_qkv(torch::randn({1, d.Hq, d.D}), torch::randn({1, d.Hkv, d.D}),
                                       torch::randn({1, d.Hkv, d.D}), ctx),
                     "tidal.TidalAttention", "k_cache");
  EXPECT_TIDAL_ERROR(plain->prefill_qkv(torch::randn({1, d.Hq, 3, d.D}), torch::randn({1, d.Hkv, 3, d.D}),
                                        torch::randn({1, d.Hkv, 3, d.D}), ctx),
                     "tidal.TidalAttention", "k_cache");
}

TEST(TidalAttention, WrongInputShapesNameTheLayer) {
  torch::NoGradGuard no_grad;
  const Dims d;
  TidalAttention layer(layer_options(d, 0));
  layer->allocate_cache(2, 16, at::kFloat);
  DecodeContext ctx(cfg(4, {}, "head", 0, 0, 1), 1);
  ctx.begin_prefill(ints({3, 3}));
  EXPECT_TIDAL_ERROR(layer->prefill(torch::randn({2, d.hidden}), ctx), "tidal.TidalAttention", "x");
  EXPECT_TIDAL_ERROR(layer->prefill(torch::randn({2, 3, d.hidden + 1}), ctx), "tidal.TidalAttention", "x", "65");
  layer->prefill(torch::randn({2, 3, d.hidden}), ctx);
  ctx.begin_step();
  EXPECT_TIDAL_ERROR(layer->decode_step(torch::randn({2, d.hidden + 1}), ctx), "tidal.TidalAttention.decode_step: x",
                     "[B, 64]", "[2, 65]");
  EXPECT_TIDAL_ERROR(layer->decode_step(torch::randn({2, 1, d.hidden}), ctx), "tidal.TidalAttention.decode_step: x",
                     "[2, 1, 64]");
  EXPECT_TIDAL_ERROR(layer->correct(torch::randn({2, 1, d.hidden + 1}), ctx), "tidal.TidalAttention", "x");
  EXPECT_TIDAL_ERROR(layer->correct(torch::randn({2, d.hidden}), ctx), "tidal.TidalAttention", "x");
  // hidden-state methods need projections
  TidalAttention plain(layer_options(d, 0, false));
  plain->allocate_cache(2, 16, at::kFloat);
  EXPECT_TIDAL_ERROR(plain->decode_step(torch::randn({2, d.hidden}), ctx), "tidal.TidalAttention", "hidden_size");
  EXPECT_TIDAL_ERROR(plain->prefill(torch::randn({2, 3, d.hidden}), ctx), "tidal.TidalAttention", "hidden_size");
  // *_qkv: k/v of the wrong shape
  EXPECT_TIDAL_ERROR(plain->decode_qkv(torch::randn({2, d.Hq, d.D}), torch::randn({2, d.Hq, d.D}),
                                       torch::randn({2, d.Hq, d.D}), ctx),
                     "tidal.TidalAttention.decode_qkv", "k/v");
  EXPECT_TIDAL_ERROR(plain->decode_qkv(torch::randn({2, d.Hq, d.D}), torch::randn({2, d.Hkv, d.D}),
                                       torch::randn({2, d.Hkv, d.D + 1}), ctx),
                     "tidal.TidalAttention.decode_qkv", "k/v");
}

// Batch mismatches are refused with a message naming the layer (not a broadcasting error from
// inside): x's batch vs the cache's and the context's, and the context's batch vs the cache's.
TEST(TidalAttention, BatchMismatchNamesTheLayer) {
  torch::NoGradGuard no_grad;
  const Dims d;
  TidalAttention layer(layer_options(d, 0));
  layer->allocate_cache(2, 16, at::kFloat);
  DecodeContext ctx(cfg(4, {}), 1);
  ctx.begin_prefill(ints({3, 3}));
  ctx.begin_step();
  EXPECT_TIDAL_ERROR(layer->decode_step(torch::randn({3, d.hidden}), ctx), "tidal.TidalAttention");
  DecodeContext ctx3(cfg(4, {}), 1);
  ctx3.begin_prefill(ints({3, 3, 3}));
  ctx3.begin_step();
  EXPECT_TIDAL_ERROR(layer->decode_step(torch::randn({2, d.hidden}), ctx3), "tidal.TidalAttention");
}

// x of too few dimensions for correct() / prefill() is refused naming the layer and x.
TEST(TidalAttention, LowRankXNamesTheLayer) {
  torch::NoGradGuard no_grad;
  const Dims d;
  TidalAttention layer(layer_options(d, 0));
  layer->allocate_cache(1, 16, at::kFloat);
  DecodeContext ctx(cfg(4, {}, "head", 0, 0, 1), 1);
  ctx.begin_prefill(ints({3}));
  EXPECT_TIDAL_ERROR(layer->prefill(torch::randn({}), ctx), "tidal.TidalAttention", "x");
  layer->prefill(torch::randn({1, 3, d.hidden}), ctx);
  ctx.begin_step();
  layer->decode_step(torch::randn({1, d.hidden}), ctx);
  EXPECT_TIDAL_ERROR(layer->correct(torch::randn({d.hidden}), ctx), "tidal.TidalAttention", "x");
}

// A sparse layer run before any select layer of the step gets the context's error, not a crash.
TEST(TidalAttention, SparseLayerWithoutSelectionThrows) {
  torch::NoGradGuard no_grad;
  const Dims d;
  TidalAttention layer(layer_options(d, 2));
  layer->allocate_cache(1, 16, at::kFloat);
  DecodeContext ctx(cfg(4, {1}), 3);
  ctx.begin_prefill(ints({5}));
  layer->prefill(torch::randn({1, 5, d.hidden}), ctx);
  ctx.begin_step();
  ASSERT_EQ(ctx.role(2), LayerRole::Sparse);
  EXPECT_TIDAL_ERROR(layer->decode_step(torch::randn({1, d.hidden}), ctx), "DecodeContext.indices");
}

TEST(TidalAttention, SetCacheValidates) {
  const Dims d;
  TidalAttention layer(layer_options(d, 0));
  EXPECT_TIDAL_ERROR(layer->set_cache(at::zeros({1, 3, 8, d.D}), at::zeros({1, 3, 8, d.D})),
                     "tidal.TidalAttention.set_cache: k_cache: expected", "[B, 2, N, 32]");
  EXPECT_TIDAL_ERROR(layer->set_cache(at::zeros({1, 2, 8, d.D}), at::zeros({1, 2, 8, 16})),
                     "TidalAttention.set_cache", "v_cache");
  EXPECT_TIDAL_ERROR(layer->set_cache(at::zeros({1, 2, 8, d.D}), at::zeros({1, 2, 9, d.D})),
                     "TidalAttention.set_cache", "v_cache");
  EXPECT_TIDAL_ERROR(layer->set_cache(at::Tensor(), at::zeros({1, 2, 8, d.D})), "TidalAttention.set_cache", "k_cache",
                     "undefined");
  EXPECT_TIDAL_ERROR(layer->set_cache(at::zeros({1, 2, 8, d.D}, at::kDouble), at::zeros({1, 2, 8, d.D}, at::kDouble)),
                     "TidalAttention.set_cache: k_cache", "Double");
  EXPECT_TIDAL_ERROR(layer->set_cache(at::zeros({1, 2, 8, d.D}), at::zeros({1, 2, 8, d.D}, at::kHalf)),
                     "TidalAttention.set_cache: v_cache", "Half");
  EXPECT_TIDAL_ERROR(layer->set_cache(at::zeros({1, 2, 8, d.D}), at::zeros({1, 2, 8, d.D}, at::Device(at::kMeta))),
                     "TidalAttention.set_cache: v_cache", "device");
  EXPECT_TIDAL_ERROR(layer->set_cache(at::zeros({1, 2, 8, 2 * d.D}).slice(3, 0, 2 * d.D, 2), at::zeros({1, 2, 8, d.D})),
                     "TidalAttention.set_cache: k_cache", "stride 2");
  EXPECT_FALSE(layer->k_cache().defined());
}

// Decoding past the cache capacity is an error, not an out-of-bounds write.
TEST(TidalAttention, DecodePastCapacityThrows) {
  torch::NoGradGuard no_grad;
  const Dims d;
  TidalAttention layer(layer_options(d, 0));
  layer->allocate_cache(1, 4, at::kFloat);
  DecodeContext ctx(cfg(4, {}), 1);
  ctx.begin_prefill(ints({4}));
  layer->prefill(torch::randn({1, 4, d.hidden}), ctx);
  ctx.begin_step();
  EXPECT_THROW(layer->decode_step(torch::randn({1, d.hidden}), ctx), c10::Error);
}

}  // namespace
