// The float64 oracle: materialised attention and its analytic gradient, computed in double from the
// (already rounded) inputs.
#pragma once

#include <cstdint>
#include <functional>
#include <vector>

#include <gtest/gtest.h>

#include "support/tensors.hpp"

namespace pflash::testing {

// A [B, H, N, D] tensor in double, logical (row-major) order.
struct Dense {
  std::int64_t b = 0, h = 0, n = 0, d = 0;
  std::vector<double> data;

  double& at(std::int64_t i0, std::int64_t i1, std::int64_t i2, std::int64_t i3) {
    return data[static_cast<std::size_t>(((i0 * h + i1) * n + i2) * d + i3)];
  }
  double at(std::int64_t i0, std::int64_t i1, std::int64_t i2, std::int64_t i3) const {
    return data[static_cast<std::size_t>(((i0 * h + i1) * n + i2) * d + i3)];
  }
};
Dense to_dense(const HostTensor& t);

// What a query row sees and how its scores are shaped, for the reference: visible(b, i, j) (null: every
// key), the soft cap c (0: none; s -> c * tanh(s / c)) and sink logits per query head (empty: none).
struct ReferenceMask {
  std::function<bool(std::int64_t b, std::int64_t i, std::int64_t j)> visible;
  double soft_cap = 0.0;
  std::vector<double> sinks;
};

struct ReferenceOutput {
  std::vector<double> o;    // [B, Hq, Nq, D] in logical order
  std::vector<double> lse;  // [B, Hq, Nq], natural log; -inf for rows that see no key
};

struct ReferenceGradients {
  std::vector<double> dq, dk, dv;  // logical order, shapes of q, k, v
  std::vector<double> dsinks;      // [Hq], with sinks
};

ReferenceOutput reference_attention(const Dense& q, const Dense& k, const Dense& v, const ReferenceMask& mask,
                                    double scale);
ReferenceGradients reference_attention_backward(const Dense& q, const Dense& k, const Dense& v, const Dense& dout,
                                                const ReferenceMask& mask, double scale);

// Bottom-right causal alignment: query i sees keys j <= i + Nk - Nq.
ReferenceOutput reference_attention(const Dense& q, const Dense& k, const Dense& v, bool causal, double scale);
ReferenceOutput reference_attention(const HostTensor& q, const HostTensor& k, const HostTensor& v, bool causal,
                                    double scale);

// The gradients of sum(O * dout) with respect to q, k, v.
ReferenceGradients reference_attention_backward(const Dense& q, const Dense& k, const Dense& v, const Dense& dout,
                                                bool causal, double scale);
ReferenceGradients reference_attention_backward(const HostTensor& q, const HostTensor& k, const HostTensor& v,
                                                const HostTensor& dout, bool causal, double scale);

// One LSE against its expected value: an infinity only by the same infinity (a row that sees no key
// has LSE = -inf, and -inf - -inf is NaN, which EXPECT_NEAR takes for a failure), a finite value
// within tolerance * max(1, |want|), and NaN never (neither where a number nor where -inf is expected).
::testing::AssertionResult lse_near(double got, double want, double tolerance);

// The kernels' LSE ([B, H, N] fp32) against the reference's, row by row with lse_near (fp32 in both
// dtypes: tolerance is a few ulps of its magnitude).
void expect_lse_near(const HostTensor& lse, const std::vector<double>& ref, double tolerance);

}  // namespace pflash::testing
