// Running a test on each instruction set the CPU backend has kernels for.
#pragma once

#include <gtest/gtest.h>

#include <memory>
#include <string>
#include <vector>

#include "pflash/runtime.hpp"

namespace pflash::testing {

inline std::vector<CpuIsa> kernel_isas() {
  return {CpuIsa::kPortable, CpuIsa::kAvx2, CpuIsa::kAvx512, CpuIsa::kAvx512Bf16, CpuIsa::kAmxBf16};
}

// Sets the instruction-set cap for one test, with the widest-set rule so that the kernels capped to
// are the ones that run (the measured rule may pick AVX-512 under an AVX512-BF16 cap), and restores both.
class IsaScope {
 public:
  explicit IsaScope(CpuIsa isa) {
    set_max_cpu_isa(isa);
    set_cpu_kernel_rule(CpuKernelRule::kWidest);
  }
  ~IsaScope() {
    set_max_cpu_isa(CpuIsa::kAmxBf16);
    reset_cpu_kernel_rule();
  }
  IsaScope(const IsaScope&) = delete;
  IsaScope& operator=(const IsaScope&) = delete;
};

// A fixture run once per kernel instruction set: skipped where the CPU lacks it, capped to it for
// the test. Instantiate with ::testing::ValuesIn(kernel_isas()), IsaName().
class PerIsaTest : public ::testing::TestWithParam<CpuIsa> {
 protected:
  void SetUp() override {
    if (detected_cpu_isa() < GetParam()) GTEST_SKIP() << "this CPU has no " << to_string(GetParam());
    scope_ = std::make_unique<IsaScope>(GetParam());
  }

 private:
  std::unique_ptr<IsaScope> scope_;
};

struct IsaName {
  std::string operator()(const ::testing::TestParamInfo<CpuIsa>& info) const {
    return std::string(to_string(info.param));
  }
};

}  // namespace pflash::testing
