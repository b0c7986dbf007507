// Running a test on each instruction set the CPU backend has kernels for.
#pragma once

#include <vector>

#include "pflash/runtime.hpp"

namespace pflash::testing {

inline std::vector<CpuIsa> kernel_isas() { return {CpuIsa::kPortable, CpuIsa::kAvx2}; }

// Sets the instruction-set cap for one test and restores it.
class IsaScope {
 public:
  explicit IsaScope(CpuIsa isa) { set_max_cpu_isa(isa); }
  ~IsaScope() { set_max_cpu_isa(CpuIsa::kAvx512Bf16); }
  IsaScope(const IsaScope&) = delete;
  IsaScope& operator=(const IsaScope&) = delete;
};

}  // namespace pflash::testing
