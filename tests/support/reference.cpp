#include "support/reference.hpp"

#include <algorithm>
#include <cmath>
#include <limits>

#include <gtest/gtest.h>

namespace pflash::testing {

ReferenceOutput reference_attention(const HostTensor& q, const HostTensor& k, const HostTensor& v, bool causal,
                                    double scale) {
  const std::int64_t batch = q.shape()[0], heads_q = q.shape()[1], seq_q = q.shape()[2], dim = q.shape()[3];
  const std::int64_t heads_kv = k.shape()[1], seq_k = k.shape()[2];
  const std::int64_t group = heads_q / heads_kv;
  ReferenceOutput out;
  out.o.assign(static_cast<std::size_t>(batch * heads_q * seq_q * dim), 0.0);
  out.lse.assign(static_cast<std::size_t>(batch * heads_q * seq_q), -std::numeric_limits<double>::infinity());
  std::vector<double> scores(static_cast<std::size_t>(seq_k));
  for (std::int64_t b = 0; b < batch; ++b) {
    for (std::int64_t h = 0; h < heads_q; ++h) {
      for (std::int64_t i = 0; i < seq_q; ++i) {
        const std::int64_t visible = causal ? std::clamp<std::int64_t>(i + seq_k - seq_q + 1, 0, seq_k) : seq_k;
        const std::size_t row = static_cast<std::size_t>((b * heads_q + h) * seq_q + i);
        if (visible == 0) continue;
        double row_max = -std::numeric_limits<double>::infinity();
        for (std::int64_t j = 0; j < visible; ++j) {
          double dot = 0.0;
          for (std::int64_t d = 0; d < dim; ++d) dot += q.at(b, h, i, d) * k.at(b, h / group, j, d);
          scores[static_cast<std::size_t>(j)] = dot * scale;
          row_max = std::max(row_max, dot * scale);
        }
        double row_sum = 0.0;
        for (std::int64_t j = 0; j < visible; ++j) row_sum += std::exp(scores[static_cast<std::size_t>(j)] - row_max);
        out.lse[row] = row_max + std::log(row_sum);
        for (std::int64_t d = 0; d < dim; ++d) {
          double acc = 0.0;
          for (std::int64_t j = 0; j < visible; ++j) {
            acc += std::exp(scores[static_cast<std::size_t>(j)] - row_max) * v.at(b, h / group, j, d);
          }
          out.o[row * static_cast<std::size_t>(dim) + static_cast<std::size_t>(d)] = acc / row_sum;
        }
      }
    }
  }
  return out;
}

void expect_lse_near(const HostTensor& lse, const std::vector<double>& ref, double tolerance) {
  const std::int64_t n = lse.shape()[2], h = lse.shape()[1];
  for (std::int64_t i = 0; i < static_cast<std::int64_t>(ref.size()); ++i) {
    const double got = lse.at(i / (n * h), (i / n) % h, i % n);
    const double want = ref[static_cast<std::size_t>(i)];
    if (std::isinf(want)) {
      ASSERT_EQ(got, want) << "lse row " << i << " sees no key";
    } else {
      ASSERT_NEAR(got, want, tolerance * std::max(1.0, std::abs(want))) << "lse row " << i;
    }
  }
}

}  // namespace pflash::testing
