// Every mask rule and score option of pflash/mask.hpp (sliding windows, chunks, query offsets, segment
// ids, lengths, the soft cap, sinks), forward (O, LSE) and backward (dq, dk, dv, dsinks), on every
// instruction set and both dtypes, against the float64 reference given the rule's own definition.
#include <gtest/gtest.h>

#include <cmath>
#include <string>
#include <vector>

#include "support/isa.hpp"
#include "support/mask_cases.hpp"
#include "support/tensors.hpp"

namespace pflash::testing {
namespace {

class MaskVariant : public ::testing::TestWithParam<std::tuple<MaskCase, DType, CpuIsa>> {};

TEST_P(MaskVariant, ForwardAndBackwardMatchFloat64Reference) {
  const auto& [c, dtype, isa] = GetParam();
  if (detected_cpu_isa() < isa) GTEST_SKIP() << "this CPU has no " << to_string(isa);
  const IsaScope scope(isa);
  expect_mask_case_matches_reference(c, dtype, public_kernels());
}

INSTANTIATE_TEST_SUITE_P(Variants, MaskVariant,
                         ::testing::Combine(::testing::ValuesIn(mask_cases()),
                                            ::testing::Values(DType::kFloat32, DType::kBFloat16),
                                            ::testing::ValuesIn(kernel_isas())),
                         [](const auto& info) {
                           return std::get<0>(info.param).name + "_" + std::string(to_string(std::get<1>(info.param))) +
                                  "_" + std::string(to_string(std::get<2>(info.param)));
                         });

}  // namespace
}  // namespace pflash::testing
