// The oracle checked against values worked out by hand, so it cannot share a mistake with the kernels.
#include <gtest/gtest.h>

#include <cmath>
#include <limits>

#include "support/reference.hpp"

#include <random>

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

TEST(Reference, LseComparisonTreatsInfinitiesAsValuesAndNaNAsFailure) {
  constexpr double kInf = std::numeric_limits<double>::infinity();
  EXPECT_TRUE(lse_near(-kInf, -kInf, 1e-5));  // a row that sees no key, on both sides
  EXPECT_TRUE(lse_near(10.00001, 10.0, 1e-5));
  EXPECT_FALSE(lse_near(10.001, 10.0, 1e-5));
  EXPECT_FALSE(lse_near(-kInf, 3.0, 1e-5));
  EXPECT_FALSE(lse_near(3.0, -kInf, 1e-5));
  EXPECT_FALSE(lse_near(kInf, -kInf, 1e-5));
  const double nan = std::numeric_limits<double>::quiet_NaN();
  EXPECT_FALSE(lse_near(nan, 3.0, 1e-5));  // a planted NaN fails where a number is expected
  EXPECT_FALSE(lse_near(nan, -kInf, 1e-5));
  EXPECT_FALSE(lse_near(nan, nan, 1e-5));
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

// The analytic gradient against central finite differences of the float64 forward, on tiny shapes
// with GQA and both maskings, so the gradient oracle cannot be wrong in the same way as the kernel.
TEST(Reference, BackwardMatchesFiniteDifferences) {
  std::mt19937_64 rng(12345);
  std::normal_distribution<double> normal(0.0, 1.0);
  for (bool causal : {false, true}) {
    const auto random = [&](std::int64_t h, std::int64_t n) {
      Dense t{1, h, n, 3, {}};
      for (std::int64_t i = 0; i < h * n * 3; ++i) t.data.push_back(normal(rng));
      return t;
    };
    Dense q = random(2, 3), k = random(1, 4), v = random(1, 4);
    const Dense dout = random(2, 3);
    const double scale = 0.7;
    const auto loss = [&] {
      const ReferenceOutput out = reference_attention(q, k, v, causal, scale);
      double sum = 0.0;
      for (std::size_t i = 0; i < out.o.size(); ++i) sum += out.o[i] * dout.data[i];
      return sum;
    };
    const ReferenceGradients grads = reference_attention_backward(q, k, v, dout, causal, scale);
    const std::pair<Dense*, const std::vector<double>*> inputs[] = {{&q, &grads.dq}, {&k, &grads.dk}, {&v, &grads.dv}};
    for (const auto& [tensor, grad] : inputs) {
      for (std::size_t i = 0; i < tensor->data.size(); ++i) {
        const double saved = tensor->data[i], eps = 1e-6;
        tensor->data[i] = saved + eps;
        const double up = loss();
        tensor->data[i] = saved - eps;
        const double down = loss();
        tensor->data[i] = saved;
        EXPECT_NEAR((*grad)[i], (up - down) / (2 * eps), 1e-7) << "element " << i << (causal ? " causal" : "");
      }
    }
  }
}

}  // namespace
}  // namespace pflash::testing
