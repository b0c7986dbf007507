// The oracle checked against values worked out by hand, so it cannot share a mistake with the kernels.
#include <gtest/gtest.h>

#include <cmath>
#include <limits>

#include "support/reference.hpp"

namespace pflash::testing {
namespace {

TEST(Reference, TwoKeysMatchesHandComputedSoftmax) {
  // q = [1, 0], keys [1, 0] and [0, 1], scale 2: scores 2 and 0.
  HostTensor q(DType::kFloat32, {1, 1, 1, 2}), k(DType::kFloat32, {1, 1, 2, 2}), v(DType::kFloat32, {1, 1, 2, 2});
  q.set(1, 0, 0, 0, 0);
  k.set(1, 0, 0, 0, 0);
  k.set(1, 0, 0, 1, 1);
  v.set(3, 0, 0, 0, 0);
  v.set(5, 0, 0, 0, 1);
  v.set(-1, 0, 0, 1, 0);
  v.set(7, 0, 0, 1, 1);
  const ReferenceOutput ref = reference_attention(q, k, v, false, 2.0);
  const double w0 = std::exp(2.0) / (std::exp(2.0) + 1.0), w1 = 1.0 - w0;
  EXPECT_NEAR(ref.o[0], 3 * w0 - 1 * w1, 1e-14);
  EXPECT_NEAR(ref.o[1], 5 * w0 + 7 * w1, 1e-14);
  EXPECT_NEAR(ref.lse[0], std::log(std::exp(2.0) + 1.0), 1e-14);
}

TEST(Reference, CausalIsBottomRightAligned) {
  // Nq = 2, Nk = 3: row 0 sees keys 0..1, row 1 sees keys 0..2. With zero queries every visible key
  // has weight 1/visible, so the output is the mean of the visible values.
  HostTensor q(DType::kFloat32, {1, 1, 2, 1}), k(DType::kFloat32, {1, 1, 3, 1}), v(DType::kFloat32, {1, 1, 3, 1});
  v.set(1, 0, 0, 0, 0);
  v.set(2, 0, 0, 1, 0);
  v.set(6, 0, 0, 2, 0);
  const ReferenceOutput ref = reference_attention(q, k, v, true, 1.0);
  EXPECT_DOUBLE_EQ(ref.o[0], 1.5);
  EXPECT_DOUBLE_EQ(ref.o[1], 3.0);
  EXPECT_DOUBLE_EQ(ref.lse[0], std::log(2.0));
  EXPECT_DOUBLE_EQ(ref.lse[1], std::log(3.0));
}

TEST(Reference, RowsWithNoVisibleKeyAreZeroWithNegInfLse) {
  HostTensor q(DType::kFloat32, {1, 1, 3, 1}), k(DType::kFloat32, {1, 1, 1, 1}), v(DType::kFloat32, {1, 1, 1, 1});
  v.set(4, 0, 0, 0, 0);
  const ReferenceOutput ref = reference_attention(q, k, v, true, 1.0);
  EXPECT_EQ(ref.o[0], 0.0);
  EXPECT_EQ(ref.lse[1], -std::numeric_limits<double>::infinity());
  EXPECT_EQ(ref.o[2], 4.0);
}

}  // namespace
}  // namespace pflash::testing
