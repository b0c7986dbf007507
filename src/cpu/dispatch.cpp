// The one place the CPU backend chooses an instruction set: a table of kernel sets, widest first; a
// call runs the first whose instruction set the active one (pflash::active_cpu_isa) includes. A new
// instruction set is one row here and one <family>_<isa>.cpp per kernel family.
#include <iterator>

#include "cpu/backend.hpp"
#include "pflash/runtime.hpp"

namespace pflash::cpu {
namespace {

struct KernelSet {
  CpuIsa isa;
  void (*forward)(detail::FwdParams);
  void (*backward)(detail::BwdParams);
  void (*decode)(detail::DecodeParams);
};

// AVX512-BF16: the bf16 products are vdpbf16ps pairs (the forward's and backward's; the decode's scores).
constexpr KernelSet kKernelSets[] = {
    {CpuIsa::kAvx512Bf16, flash_forward_avx512_bf16, flash_backward_avx512_bf16, flash_decode_avx512_bf16},
    {CpuIsa::kAvx512, flash_forward_avx512, flash_backward_avx512, flash_decode_avx512},
    {CpuIsa::kAvx2, flash_forward_avx2, flash_backward_avx2, flash_decode_avx2},
    {CpuIsa::kPortable, flash_forward_portable, flash_backward_portable, flash_decode_portable},
};

const KernelSet& kernels() {
  const CpuIsa active = active_cpu_isa();
  for (const KernelSet& set : kKernelSets) {
    if (set.isa <= active) return set;
  }
  return kKernelSets[std::size(kKernelSets) - 1];
}

}  // namespace

void flash_forward(detail::FwdParams params) { kernels().forward(params); }
void flash_backward(detail::BwdParams params) { kernels().backward(params); }
void flash_decode(detail::DecodeParams params) { kernels().decode(params); }

}  // namespace pflash::cpu
