// The user-defined MPI reduction operator merges (O, LSE) states exactly as merge_attention_states
// merges the same parts.
#include <gtest/gtest.h>
#include <mpi.h>

#include <algorithm>
#include <cmath>
#include <random>
#include <vector>

#include "distributed/merge_op.hpp"
#include "support/merge.hpp"
#include "support/reference.hpp"
#include "support/tensors.hpp"

namespace pflash::testing {
namespace {

TEST(MergeStatesOp, AllReduceEqualsMergeAttentionStates) {
  int rank = 0, p = 0;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  MPI_Comm_size(MPI_COMM_WORLD, &p);
  for (const std::int64_t dim : {1, 96, 256}) {
    auto rng = make_rng();  // the same stream on every rank: every rank knows every rank's part
    const std::int64_t n = 37, heads = 3, rows = n * heads;
    HostTensor o_parts(DType::kFloat32, {p, n, heads, dim}), lse_parts(DType::kFloat32, {p, n, heads});
    o_parts.fill_normal(rng);
    std::uniform_real_distribution<double> spread(-20.0, 20.0);
    std::uniform_int_distribution<int> kind(0, 9);
    for (std::int64_t s = 0; s < p; ++s) {
      for (std::int64_t i = 0; i < n; ++i) {
        for (std::int64_t h = 0; h < heads; ++h) {
          const int k = kind(rng);
          // Parts that saw nothing (NaN O, as a kernel may leave it), LSEs near 1e4, ordinary ones;
          // row 0 sees nothing anywhere.
          double lse = k == 0 || i == 0 ? -INFINITY : k == 1 ? 1e4 + spread(rng) : spread(rng);
          lse_parts.set(lse, s, i, h);
          if (std::isinf(lse)) o_parts.set(NAN, s, i, h, 0);
        }
      }
    }
    const auto [o, lse] = merge_parts(o_parts, lse_parts);

    // This rank's part as states of D + 1 floats, all-reduced with the operator.
    std::vector<float> states(static_cast<std::size_t>(rows * (dim + 1)));
    for (std::int64_t r = 0; r < rows; ++r) {
      for (std::int64_t d = 0; d < dim; ++d) states[r * (dim + 1) + d] = static_cast<float>(o_parts.at(rank, r / heads, r % heads, d));
      states[r * (dim + 1) + dim] = static_cast<float>(lse_parts.at(rank, r / heads, r % heads));
    }
    const detail::StateType type(dim);
    ASSERT_EQ(MPI_Allreduce(MPI_IN_PLACE, states.data(), static_cast<int>(rows), type.get(), detail::merge_states_op(),
                            MPI_COMM_WORLD),
              MPI_SUCCESS);
    for (std::int64_t r = 0; r < rows; ++r) {
      const double expected_lse = lse.at(r / heads, r % heads, 0), got_lse = states[r * (dim + 1) + dim];
      EXPECT_TRUE(lse_near(got_lse, expected_lse, 1e-6)) << "row " << r;
      if (std::isinf(expected_lse)) continue;  // a state that saw nothing has no O to compare (a lone part's is left as it came)
      // Pairwise merging rounds differently from one P-way merge. Each intermediate state's LSE is an
      // fp32 number, off by up to half an ulp of |LSE| (5e-4 near 1e4), which shifts the next merge's
      // weights by that much relative, moving O by that times its parts' spread: per merge,
      // ulp(max |LSE_s|) x 2 max |O_s|, P - 1 merges in all, plus a few ulps of O.
      double worst = 0.0, max_abs_lse = 0.0, max_abs_o = 0.0;
      for (std::int64_t s = 0; s < p; ++s) {
        const double part_lse = lse_parts.at(s, r / heads, r % heads);
        if (std::isinf(part_lse)) continue;
        max_abs_lse = std::max(max_abs_lse, std::abs(part_lse));
        for (std::int64_t d = 0; d < dim; ++d) max_abs_o = std::max(max_abs_o, std::abs(o_parts.at(s, r / heads, r % heads, d)));
      }
      for (std::int64_t d = 0; d < dim; ++d) {
        const double error = std::abs(states[r * (dim + 1) + d] - o.at(r / heads, r % heads, d));
        worst = std::isnan(error) ? INFINITY : std::max(worst, error);
      }
      const double lse_rounding = std::ldexp(max_abs_lse, -23);
      EXPECT_LT(worst, 1e-5 + (p - 1) * lse_rounding * 2.0 * max_abs_o) << "row " << r << ", D = " << dim;
    }
  }
}

}  // namespace
}  // namespace pflash::testing
