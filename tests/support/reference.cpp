#include "support/reference.hpp"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <limits>

namespace pflash::testing {
namespace {

constexpr double kNegInf = -std::numeric_limits<double>::infinity();

ReferenceMask causal_reference(bool causal, std::int64_t seq_q, std::int64_t seq_k) {
  ReferenceMask mask;
  if (causal) mask.visible = [=](std::int64_t, std::int64_t i, std::int64_t j) { return j <= i + seq_k - seq_q; };
  return mask;
}

// Row i's scores (capped; -inf where hidden) into s, its probabilities into p (the sink's share
// excluded), and its LSE (the sink included; -inf for a row that sees nothing and has no sink).
double softmax_row(const Dense& q, const Dense& k, std::int64_t b, std::int64_t h, std::int64_t i,
                   const ReferenceMask& mask, double scale, std::vector<double>& s, std::vector<double>& p) {
  const std::int64_t group = q.h / k.h;
  double row_max = mask.sinks.empty() ? kNegInf : mask.sinks[static_cast<std::size_t>(h)];
  for (std::int64_t j = 0; j < k.n; ++j) {
    double& x = s[static_cast<std::size_t>(j)];
    x = kNegInf;
    if (mask.visible && !mask.visible(b, i, j)) continue;
    double dot = 0.0;
    for (std::int64_t d = 0; d < q.d; ++d) dot += q.at(b, h, i, d) * k.at(b, h / group, j, d);
    x = dot * scale;
    if (mask.soft_cap > 0.0) x = mask.soft_cap * std::tanh(x / mask.soft_cap);
    row_max = std::max(row_max, x);
  }
  std::fill(p.begin(), p.end(), 0.0);
  if (row_max == kNegInf) return kNegInf;
  double row_sum = mask.sinks.empty() ? 0.0 : std::exp(mask.sinks[static_cast<std::size_t>(h)] - row_max);
  for (std::int64_t j = 0; j < k.n; ++j) row_sum += std::exp(s[static_cast<std::size_t>(j)] - row_max);
  for (std::int64_t j = 0; j < k.n; ++j) p[static_cast<std::size_t>(j)] = std::exp(s[static_cast<std::size_t>(j)] - row_max) / row_sum;
  return row_max + std::log(row_sum);
}

}  // namespace

Dense to_dense(const HostTensor& t) {
  const auto& sh = t.shape();
  Dense out{sh[0], sh[1], sh[2], sh.size() > 3 ? sh[3] : 1, {}};
  out.data.resize(static_cast<std::size_t>(out.b * out.h * out.n * out.d));
  for (std::int64_t i0 = 0; i0 < out.b; ++i0)
    for (std::int64_t i1 = 0; i1 < out.h; ++i1)
      for (std::int64_t i2 = 0; i2 < out.n; ++i2)
        for (std::int64_t i3 = 0; i3 < out.d; ++i3) out.at(i0, i1, i2, i3) = t.at(i0, i1, i2, i3);
  return out;
}

ReferenceOutput reference_attention(const Dense& q, const Dense& k, const Dense& v, const ReferenceMask& mask,
                                    double scale) {
  const std::int64_t group = q.h / k.h;
  ReferenceOutput out;
  out.o.assign(static_cast<std::size_t>(q.b * q.h * q.n * q.d), 0.0);
  out.lse.assign(static_cast<std::size_t>(q.b * q.h * q.n), kNegInf);
  std::vector<double> s(static_cast<std::size_t>(k.n)), p(static_cast<std::size_t>(k.n));
  for (std::int64_t b = 0; b < q.b; ++b)
    for (std::int64_t h = 0; h < q.h; ++h)
      for (std::int64_t i = 0; i < q.n; ++i) {
        const std::size_t row = static_cast<std::size_t>((b * q.h + h) * q.n + i);
        out.lse[row] = softmax_row(q, k, b, h, i, mask, scale, s, p);
        for (std::int64_t d = 0; d < q.d; ++d) {
          double acc = 0.0;
          for (std::int64_t j = 0; j < k.n; ++j) {
            if (p[static_cast<std::size_t>(j)] != 0.0) acc += p[static_cast<std::size_t>(j)] * v.at(b, h / group, j, d);
          }
          out.o[row * static_cast<std::size_t>(q.d) + static_cast<std::size_t>(d)] = acc;
        }
      }
  return out;
}

ReferenceOutput reference_attention(const Dense& q, const Dense& k, const Dense& v, bool causal, double scale) {
  return reference_attention(q, k, v, causal_reference(causal, q.n, k.n), scale);
}

ReferenceOutput reference_attention(const HostTensor& q, const HostTensor& k, const HostTensor& v, bool causal,
                                    double scale) {
  return reference_attention(to_dense(q), to_dense(k), to_dense(v), causal, scale);
}

// Per query row: P (materialised), dP = dO V^T, D = rowsum(P * dP), dC = P * (dP - D), dS = dC * cap'(S);
// dV += P^T dO, dQ = scale * dS K, dK += scale * dS^T Q; d sink = -sum_i exp(sink - LSE_i) D_i.
ReferenceGradients reference_attention_backward(const Dense& q, const Dense& k, const Dense& v, const Dense& dout,
                                                const ReferenceMask& mask, double scale) {
  const std::int64_t group = q.h / k.h;
  ReferenceGradients g;
  g.dq.assign(q.data.size(), 0.0);
  g.dk.assign(k.data.size(), 0.0);
  g.dv.assign(v.data.size(), 0.0);
  g.dsinks.assign(mask.sinks.size(), 0.0);
  const auto index = [](const Dense& t, std::int64_t b, std::int64_t h, std::int64_t n, std::int64_t d) {
    return static_cast<std::size_t>(((b * t.h + h) * t.n + n) * t.d + d);
  };
  std::vector<double> s(static_cast<std::size_t>(k.n)), p(static_cast<std::size_t>(k.n)), dp(static_cast<std::size_t>(k.n));
  for (std::int64_t b = 0; b < q.b; ++b)
    for (std::int64_t h = 0; h < q.h; ++h)
      for (std::int64_t i = 0; i < q.n; ++i) {
        const double lse = softmax_row(q, k, b, h, i, mask, scale, s, p);
        double row_dot = 0.0;
        for (std::int64_t j = 0; j < k.n; ++j) {
          double dot = 0.0;
          for (std::int64_t d = 0; d < q.d; ++d) dot += dout.at(b, h, i, d) * v.at(b, h / group, j, d);
          dp[static_cast<std::size_t>(j)] = dot;
          row_dot += p[static_cast<std::size_t>(j)] * dot;
        }
        if (!mask.sinks.empty() && lse != kNegInf) {
          g.dsinks[static_cast<std::size_t>(h)] -= std::exp(mask.sinks[static_cast<std::size_t>(h)] - lse) * row_dot;
        }
        for (std::int64_t j = 0; j < k.n; ++j) {
          const double pj = p[static_cast<std::size_t>(j)];
          if (pj == 0.0) continue;
          double ds = pj * (dp[static_cast<std::size_t>(j)] - row_dot);
          if (mask.soft_cap > 0.0) {
            const double t = s[static_cast<std::size_t>(j)] / mask.soft_cap;
            ds *= 1.0 - t * t;
          }
          for (std::int64_t d = 0; d < q.d; ++d) {
            g.dv[index(v, b, h / group, j, d)] += pj * dout.at(b, h, i, d);
            g.dq[index(q, b, h, i, d)] += scale * ds * k.at(b, h / group, j, d);
            g.dk[index(k, b, h / group, j, d)] += scale * ds * q.at(b, h, i, d);
          }
        }
      }
  return g;
}

ReferenceGradients reference_attention_backward(const Dense& q, const Dense& k, const Dense& v, const Dense& dout,
                                                bool causal, double scale) {
  return reference_attention_backward(q, k, v, dout, causal_reference(causal, q.n, k.n), scale);
}

ReferenceGradients reference_attention_backward(const HostTensor& q, const HostTensor& k, const HostTensor& v,
                                                const HostTensor& dout, bool causal, double scale) {
  return reference_attention_backward(to_dense(q), to_dense(k), to_dense(v), to_dense(dout), causal, scale);
}

::testing::AssertionResult lse_near(double got, double want, double tolerance) {
  if (std::isnan(got) || std::isnan(want)) {
    return ::testing::AssertionFailure() << "LSE " << got << ", expected " << want << ": NaN";
  }
  if (std::isinf(got) || std::isinf(want)) {
    if (got == want) return ::testing::AssertionSuccess();
    return ::testing::AssertionFailure() << "LSE " << got << ", expected " << want;
  }
  const double bound = tolerance * std::max(1.0, std::abs(want));
  if (std::abs(got - want) <= bound) return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure() << "LSE " << got << ", expected " << want << " within " << bound;
}

void expect_lse_near(const HostTensor& lse, const std::vector<double>& ref, double tolerance) {
  const std::int64_t n = lse.shape()[2], h = lse.shape()[1];
  for (std::int64_t i = 0; i < static_cast<std::int64_t>(ref.size()); ++i) {
    const double got = lse.at(i / (n * h), (i / n) % h, i % n);
    ASSERT_TRUE(lse_near(got, ref[static_cast<std::size_t>(i)], tolerance)) << "lse row " << i;
  }
}

}  // namespace pflash::testing
