// Small helpers shared by the GoogleTest files: building hand-designed tensors, comparing results
// and checking the "tidal.<op>: <argument>: expected X, got Y" error messages.
#pragma once

#include <cstring>
#include <initializer_list>
#include <limits>
#include <string>
#include <utility>
#include <vector>

#include <ATen/ATen.h>
#include <c10/util/Exception.h>
#include <gtest/gtest.h>

namespace tidal_test {

constexpr int64_t kD = 32;  // the smallest supported head dim: enough room for one-hot rows
constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();

// A float D-vector that is zero except for the listed (position, value) entries,
// e.g. vec({{0, 0.75}, {1, 0.25}}).
inline at::Tensor vec(std::initializer_list<std::pair<int64_t, double>> entries, int64_t D = kD) {
  at::Tensor t = at::zeros({D});
  for (const auto& [i, value] : entries) t[i] = value;
  return t;
}

// value * e_i (a one-hot D-vector).
inline at::Tensor unit(int64_t i, double value = 1.0, int64_t D = kD) { return vec({{i, value}}, D); }

// int32 1-D tensor (seq_lens, start) and int32 [B, Hsel, K] indices.
inline at::Tensor ints(std::vector<int32_t> values) { return at::tensor(values, at::kInt); }
inline at::Tensor index_rows(std::vector<std::vector<std::vector<int32_t>>> rows) {
  std::vector<int32_t> flat;
  for (const auto& b : rows)
    for (const auto& r : b) flat.insert(flat.end(), r.begin(), r.end());
  const int64_t B = rows.size(), H = rows[0].size(), K = rows[0][0].size();
  return at::tensor(flat, at::kInt).reshape({B, H, K});
}

// The rows of an int32 tensor as nested vectors, so EXPECT_EQ prints readable diffs.
inline std::vector<std::vector<int32_t>> rows_of(const at::Tensor& indices_bh) {
  const at::Tensor t = indices_bh.contiguous();
  std::vector<std::vector<int32_t>> out;
  for (int64_t r = 0; r < t.size(0); ++r) {
    const int32_t* p = t[r].data_ptr<int32_t>();
    out.emplace_back(p, p + t.size(1));
  }
  return out;
}

// Same shape and |actual - expected| <= atol + rtol * |expected| everywhere (NaN fails).
inline ::testing::AssertionResult near(const at::Tensor& actual, const at::Tensor& expected, double atol,
                                       double rtol = 0.0) {
  if (actual.sizes() != expected.sizes())
    return ::testing::AssertionFailure() << "shape " << actual.sizes() << " vs expected " << expected.sizes();
  const at::Tensor a = actual.to(at::kDouble), e = expected.to(at::kDouble);
  const at::Tensor err = (a - e).abs();
  const at::Tensor bad = err.gt(atol + rtol * e.abs()).logical_or(err.isnan());
  if (bad.any().item<bool>())
    return ::testing::AssertionFailure() << bad.sum().item<int64_t>() << " element(s) off; max |error| "
                                         << err.nan_to_num(1e300).max().item<double>() << "\nactual:\n"
                                         << actual << "\nexpected:\n" << expected;
  return ::testing::AssertionSuccess();
}

// Bit-for-bit equality (NaN payloads included): same dtype, shape and bytes.
inline ::testing::AssertionResult bits_equal(const at::Tensor& a, const at::Tensor& b) {
  if (a.scalar_type() != b.scalar_type() || a.sizes() != b.sizes())
    return ::testing::AssertionFailure() << a.scalar_type() << a.sizes() << " vs " << b.scalar_type() << b.sizes();
  const at::Tensor ca = a.contiguous(), cb = b.contiguous();
  if (std::memcmp(ca.data_ptr(), cb.data_ptr(), ca.nbytes()) != 0)
    return ::testing::AssertionFailure() << "bytes differ";
  return ::testing::AssertionSuccess();
}

// A copy of `t` living in a slice of a bigger buffer: every dim but the last gets a non-trivial
// stride (and an offset), the last stays contiguous. The padding is NaN (floating types) or 1
// (integer types: a valid position for index tensors), so a read outside the view shows.
// `buffer`, when given, receives the whole big buffer.
inline at::Tensor strided_copy(const at::Tensor& t, at::Tensor* buffer = nullptr) {
  std::vector<int64_t> big_sizes;
  for (int64_t d = 0; d < t.dim(); ++d) big_sizes.push_back(d + 1 < t.dim() ? 2 * t.size(d) + 1 : t.size(d) + 8);
  at::Tensor view = t.is_floating_point() ? at::full(big_sizes, kNaN, t.options()) : at::full(big_sizes, 1, t.options());
  if (buffer) *buffer = view;
  for (int64_t d = 0; d + 1 < t.dim(); ++d) view = view.slice(d, 1, 1 + 2 * t.size(d), 2);
  view = view.slice(t.dim() - 1, 0, t.size(-1));
  view.copy_(t);
  return view;
}

// Checks that a caught c10::Error's message (without backtrace) contains every part.
inline void expect_message(const c10::Error& e, std::initializer_list<const char*> parts) {
  const std::string msg = e.what_without_backtrace();
  for (const char* part : parts)
    EXPECT_NE(msg.find(part), std::string::npos) << "missing \"" << part << "\" in the message: " << msg;
}

}  // namespace tidal_test

// EXPECT_THROW(stmt, c10::Error) that also checks the message contains each of the given substrings.
#define EXPECT_TIDAL_ERROR(stmt, ...)                                                               \
  EXPECT_THROW(                                                                                      \
      {                                                                                              \
        try {                                                                                        \
          stmt;                                                                                      \
        } catch (const c10::Error& tidal_error_) {                                                   \
          ::tidal_test::expect_message(tidal_error_, {__VA_ARGS__});                                 \
          throw;                                                                                     \
        }                                                                                            \
      },                                                                                             \
      c10::Error)
