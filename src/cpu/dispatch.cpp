// The one place the CPU backend chooses an instruction set.
#include "cpu/backend.hpp"
#include "pflash/runtime.hpp"

namespace pflash::cpu {
namespace {

// AVX-512 kernels are not built yet: CPUs that have it run the AVX2 kernels.
bool use_avx2() { return active_cpu_isa() >= CpuIsa::kAvx2; }

}  // namespace

void flash_forward(detail::FwdParams params) {
  if (use_avx2()) {
    flash_forward_avx2(params);
  } else {
    flash_forward_portable(params);
  }
}

void flash_backward(detail::BwdParams params) {
  if (use_avx2()) {
    flash_backward_avx2(params);
  } else {
    flash_backward_portable(params);
  }
}

void flash_decode(detail::DecodeParams params) {
  if (use_avx2()) {
    flash_decode_avx2(params);
  } else {
    flash_decode_portable(params);
  }
}

}  // namespace pflash::cpu
