#include <gtest/gtest.h>

#include <cstdlib>
#include <string>
#include <vector>

#include "pflash/pflash.hpp"
#include "support/tensors.hpp"

namespace pflash::testing {
namespace {

TEST(Runtime, IsaCapLowersAndRestores) {
  const CpuIsa detected = detected_cpu_isa();
  set_max_cpu_isa(CpuIsa::kPortable);
  EXPECT_EQ(active_cpu_isa(), CpuIsa::kPortable);
  set_max_cpu_isa(CpuIsa::kAmxBf16);  // a cap above the CPU is clamped to what it has
  EXPECT_EQ(active_cpu_isa(), detected);
}

// PFLASH_MAX_CPU_ISA caps the instruction set until set_max_cpu_isa overrides it; a value that names
// no instruction set is an error naming the accepted ones, of every call that would use it.
TEST(Runtime, IsaCapFromTheEnvironment) {
  const CpuIsa detected = detected_cpu_isa();
  setenv("PFLASH_MAX_CPU_ISA", "portable", 1);
  reset_max_cpu_isa();
  EXPECT_EQ(active_cpu_isa(), CpuIsa::kPortable);
  setenv("PFLASH_MAX_CPU_ISA", "foo", 1);
  try {
    (void)active_cpu_isa();
    ADD_FAILURE() << "no error for PFLASH_MAX_CPU_ISA=foo";
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), ErrorCode::kInvalidArgument);
    EXPECT_STREQ(e.what(), "PFLASH_MAX_CPU_ISA: expected one of portable, avx2, avx512, avx512_bf16, amx_bf16 (or unset), got 'foo'");
  }
  HostTensor q(DType::kFloat32, {1, 1, 4, 8}), o(DType::kFloat32, {1, 1, 4, 8});
  o.poison();
  const std::vector<unsigned char> o_before = o.bytes();
  AttentionParams p;
  p.q = p.k = p.v = q.view();
  p.o = o.mutable_view();
  EXPECT_THROW(flash_attention_forward(p), Error);
  EXPECT_EQ(o.bytes(), o_before);
  set_max_cpu_isa(CpuIsa::kAmxBf16);  // an explicit cap wins over the environment
  EXPECT_EQ(active_cpu_isa(), detected);
  unsetenv("PFLASH_MAX_CPU_ISA");
  reset_max_cpu_isa();
  EXPECT_EQ(active_cpu_isa(), detected);
}

TEST(Runtime, IsaNames) {
  EXPECT_EQ(to_string(CpuIsa::kPortable), "portable");
  EXPECT_EQ(to_string(CpuIsa::kAvx512Bf16), "avx512_bf16");
  EXPECT_EQ(to_string(CpuIsa::kAmxBf16), "amx_bf16");
  for (CpuIsa isa : {CpuIsa::kPortable, CpuIsa::kAvx2, CpuIsa::kAvx512, CpuIsa::kAvx512Bf16, CpuIsa::kAmxBf16}) {
    EXPECT_EQ(cpu_isa_from_string(to_string(isa)), isa);
    EXPECT_NE(std::string(cpu_isa_names()).find(to_string(isa)), std::string::npos);
  }
  EXPECT_EQ(cpu_isa_from_string("amx"), std::nullopt);
}

// AMX is detected only with the CPU's tiles and the system's leave to use them; it implies AVX512-BF16.
TEST(Runtime, AmxImpliesAvx512Bf16) {
  if (detected_cpu_isa() < CpuIsa::kAmxBf16) GTEST_SKIP() << "this CPU (or system) has no amx_bf16";
  EXPECT_TRUE(__builtin_cpu_supports("avx512bf16"));
}

TEST(Runtime, DefaultThreadsPositive) { EXPECT_GE(default_num_threads(), 1); }

}  // namespace
}  // namespace pflash::testing
