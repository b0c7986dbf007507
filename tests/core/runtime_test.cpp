#include <gtest/gtest.h>

#include "pflash/runtime.hpp"

namespace pflash {
namespace {

TEST(Runtime, IsaCapLowersAndRestores) {
  const CpuIsa detected = detected_cpu_isa();
  set_max_cpu_isa(CpuIsa::kPortable);
  EXPECT_EQ(active_cpu_isa(), CpuIsa::kPortable);
  set_max_cpu_isa(CpuIsa::kAvx512Bf16);  // a cap above the CPU is clamped to what it has
  EXPECT_EQ(active_cpu_isa(), detected);
}

TEST(Runtime, IsaNames) {
  EXPECT_EQ(to_string(CpuIsa::kPortable), "portable");
  EXPECT_EQ(to_string(CpuIsa::kAvx512Bf16), "avx512_bf16");
}

TEST(Runtime, DefaultThreadsPositive) { EXPECT_GE(default_num_threads(), 1); }

}  // namespace
}  // namespace pflash
