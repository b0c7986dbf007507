// The float64 oracle: materialised attention computed in double from the (already rounded) inputs.
#pragma once

#include <vector>

#include "support/tensors.hpp"

namespace pflash::testing {

struct ReferenceOutput {
  std::vector<double> o;    // [B, Hq, Nq, D] in logical order
  std::vector<double> lse;  // [B, Hq, Nq], natural log; -inf for rows that see no key
};

// Bottom-right causal alignment: query i sees keys j <= i + Nk - Nq.
// The kernels' LSE ([B, H, N] fp32) against the reference's: -inf exactly where the reference has
// it, elsewhere within tolerance * max(1, |lse|) (fp32 in both dtypes: a few ulps of its magnitude).
void expect_lse_near(const HostTensor& lse, const std::vector<double>& ref, double tolerance);

ReferenceOutput reference_attention(const HostTensor& q, const HostTensor& k, const HostTensor& v, bool causal,
                                    double scale);

}  // namespace pflash::testing
