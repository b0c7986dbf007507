// The one place the CPU backend chooses an instruction set.
#include "cpu/backend.hpp"
#include "pflash/runtime.hpp"

namespace pflash::cpu {

void flash_forward(detail::FwdParams params) {
  switch (active_cpu_isa()) {
    case CpuIsa::kAvx512Bf16:
    case CpuIsa::kAvx512:
    case CpuIsa::kAvx2:
      flash_forward_avx2(params);
      return;
    case CpuIsa::kPortable:
      flash_forward_portable(params);
      return;
  }
}

}  // namespace pflash::cpu
