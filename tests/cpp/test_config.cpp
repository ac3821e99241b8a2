// tidal::TidalConfig: validation on construction (messages name "TidalConfig" and the bad field),
// the layer schedule role(), validate_for_model, and the small enum helpers.
#include <vector>

#include <gtest/gtest.h>

#include "test_util.h"
#include "tidal/config.h"

namespace {

using tidal::LayerRole;
using tidal::SelectMode;
using tidal::TidalConfig;

// Builds a config through the validating constructor (keeps the EXPECT lines short).
TidalConfig make(int64_t top_k, std::vector<int64_t> layers = {2, 13}, const std::string& mode = "head",
                 int64_t sink = 0, int64_t recent = 0, int64_t stride = 0) {
  return TidalConfig(top_k, std::move(layers), mode, sink, recent, stride);
}

// The defaults are the paper's setting and pass validation.
TEST(TidalConfig, DefaultsAreValid) {
  const TidalConfig c;
  EXPECT_EQ(c.top_k, 2048);
  EXPECT_EQ(c.select_layers, (std::vector<int64_t>{2, 13}));
  EXPECT_EQ(c.mode, SelectMode::Head);
  EXPECT_EQ(c.sink, 0);
  EXPECT_EQ(c.recent, 0);
  EXPECT_EQ(c.correction_stride, 0);
  EXPECT_NO_THROW(c.validate());
  EXPECT_NO_THROW(c.validate_for_model(32));
}

// The constructor stores every argument (mode parsed) when they are valid.
TEST(TidalConfig, ConstructorStoresFields) {
  const TidalConfig c = make(64, {1, 5, 9}, "group", 4, 8, 16);
  EXPECT_EQ(c.top_k, 64);
  EXPECT_EQ(c.select_layers, (std::vector<int64_t>{1, 5, 9}));
  EXPECT_EQ(c.mode, SelectMode::Group);
  EXPECT_EQ(c.sink, 4);
  EXPECT_EQ(c.recent, 8);
  EXPECT_EQ(c.correction_stride, 16);
}

// Boundary values that are still valid.
TEST(TidalConfig, AcceptsBoundaryValues) {
  EXPECT_NO_THROW(make(1));                       // top_k 1: only the newest token
  EXPECT_NO_THROW(make(tidal::kMaxTopK));         // the largest budget
  EXPECT_NO_THROW(make(4, {2, 13}, "head", 3, 0));  // sink 3 + newest = 4
  EXPECT_NO_THROW(make(4, {2, 13}, "head", 2, 2));  // sink 2 + recent 2 = 4
  EXPECT_NO_THROW(make(4, {2, 13}, "head", 0, 4));  // recent fills the budget
  EXPECT_NO_THROW(make(4, {}));                   // no select layers: TidalDecode off
  EXPECT_NO_THROW(make(4, {0}));
}

TEST(TidalConfig, RejectsBadTopK) {
  EXPECT_TIDAL_ERROR(make(0), "tidal.TidalConfig: top_k: expected", "got 0");
  EXPECT_TIDAL_ERROR(make(-3), "TidalConfig", "top_k");
  EXPECT_TIDAL_ERROR(make(tidal::kMaxTopK + 1), "TidalConfig", "top_k");
}

TEST(TidalConfig, RejectsNegativeSinkAndRecent) {
  EXPECT_TIDAL_ERROR(make(16, {2, 13}, "head", -1, 0), "tidal.TidalConfig: sink: expected", "got -1");
  EXPECT_TIDAL_ERROR(make(16, {2, 13}, "head", 0, -1), "tidal.TidalConfig: recent: expected", "got -1");
}

// The newest token always takes a slot, so sink + max(recent, 1) must fit in top_k.
TEST(TidalConfig, RejectsSinkPlusRecentOverBudget) {
  EXPECT_TIDAL_ERROR(make(4, {2, 13}, "head", 4, 0), "TidalConfig", "sink/recent");  // 4 + newest > 4
  EXPECT_TIDAL_ERROR(make(4, {2, 13}, "head", 2, 3), "TidalConfig", "sink/recent");
  EXPECT_TIDAL_ERROR(make(4, {2, 13}, "head", 0, 5), "TidalConfig", "sink/recent");
  EXPECT_TIDAL_ERROR(make(1, {2, 13}, "head", 1, 0), "TidalConfig", "sink/recent");
}

// select_layers must be non-negative and strictly increasing.
TEST(TidalConfig, RejectsBadSelectLayers) {
  EXPECT_TIDAL_ERROR(make(16, {13, 2}), "tidal.TidalConfig: select_layers: expected", "increasing");
  EXPECT_TIDAL_ERROR(make(16, {2, 2}), "TidalConfig", "select_layers");
  EXPECT_TIDAL_ERROR(make(16, {2, 13, 13}), "TidalConfig", "select_layers");
  EXPECT_TIDAL_ERROR(make(16, {-1, 2}), "TidalConfig", "select_layers", ">= 0");
  EXPECT_TIDAL_ERROR(make(16, {-1}), "TidalConfig", "select_layers");
}

TEST(TidalConfig, RejectsNegativeCorrectionStride) {
  EXPECT_TIDAL_ERROR(make(16, {2, 13}, "head", 0, 0, -1), "tidal.TidalConfig: correction_stride: expected",
                     "got -1");
}

TEST(TidalConfig, RejectsBadMode) {
  EXPECT_TIDAL_ERROR(make(16, {2, 13}, "topk"), "tidal.TidalConfig: mode: expected", "\"topk\"");
  EXPECT_TIDAL_ERROR(make(16, {2, 13}, ""), "TidalConfig", "mode");
}

// validate() re-checks fields changed after construction (the struct's fields are public).
TEST(TidalConfig, ValidateChecksMutatedFields) {
  TidalConfig c;
  c.top_k = 0;
  EXPECT_TIDAL_ERROR(c.validate(), "TidalConfig", "top_k");
  c = TidalConfig();
  c.select_layers = {5, 3};
  EXPECT_TIDAL_ERROR(c.validate(), "TidalConfig", "select_layers");
  c = TidalConfig();
  c.correction_stride = -2;
  EXPECT_TIDAL_ERROR(c.validate(), "TidalConfig", "correction_stride");
}

// Schedule {2, 13} on a 32-layer model: 0, 1 full; 2 and 13 select; everything else sparse.
TEST(TidalConfig, RoleForDefaultSchedule) {
  const TidalConfig c = make(16, {2, 13});
  for (int64_t layer = 0; layer < 40; ++layer) {
    SCOPED_TRACE(layer);
    const LayerRole expected = layer < 2                 ? LayerRole::Full
                               : layer == 2 || layer == 13 ? LayerRole::Select
                                                           : LayerRole::Sparse;
    EXPECT_EQ(c.role(layer), expected);
  }
}

// No select layers: every layer is full attention (the baseline).
TEST(TidalConfig, RoleWithNoSelectLayersIsAllFull) {
  const TidalConfig c = make(16, {});
  for (int64_t layer : {0, 1, 2, 13, 31, 1000}) EXPECT_EQ(c.role(layer), LayerRole::Full) << layer;
}

// Selecting at layer 0: no full layers, layer 0 selects, all later layers are sparse.
TEST(TidalConfig, RoleWithSelectAtLayerZero) {
  const TidalConfig c = make(16, {0});
  EXPECT_EQ(c.role(0), LayerRole::Select);
  for (int64_t layer : {1, 2, 13, 31}) EXPECT_EQ(c.role(layer), LayerRole::Sparse) << layer;
}

// validate_for_model: every select layer must exist in the model.
TEST(TidalConfig, ValidateForModel) {
  const TidalConfig c = make(16, {2, 13});
  EXPECT_NO_THROW(c.validate_for_model(32));
  EXPECT_NO_THROW(c.validate_for_model(14));
  EXPECT_TIDAL_ERROR(c.validate_for_model(13), "tidal.TidalConfig: select_layers: expected", "13 layers");
  EXPECT_TIDAL_ERROR(c.validate_for_model(4), "TidalConfig", "select_layers");
  EXPECT_NO_THROW(make(16, {}).validate_for_model(1));  // nothing to check without select layers
  TidalConfig bad;
  bad.top_k = 0;
  EXPECT_TIDAL_ERROR(bad.validate_for_model(32), "TidalConfig", "top_k");  // also runs validate()
}

TEST(TidalConfig, EnumHelpers) {
  EXPECT_EQ(tidal::parse_select_mode("head", "op"), SelectMode::Head);
  EXPECT_EQ(tidal::parse_select_mode("group", "op"), SelectMode::Group);
  EXPECT_TIDAL_ERROR(tidal::parse_select_mode("heads", "my_op"), "tidal.my_op: mode: expected");
  EXPECT_STREQ(tidal::to_string(SelectMode::Head), "head");
  EXPECT_STREQ(tidal::to_string(SelectMode::Group), "group");
  EXPECT_STREQ(tidal::to_string(LayerRole::Full), "full");
  EXPECT_STREQ(tidal::to_string(LayerRole::Select), "select");
  EXPECT_STREQ(tidal::to_string(LayerRole::Sparse), "sparse");
}

}  // namespace
