#include "cpu/simd_portable.hpp"
// simd_portable.hpp first: the kernel template is instantiated for it below.
#include "cpu/backend.hpp"
#include "cpu/flash_bwd_kernel.hpp"

namespace pflash::cpu {

void flash_backward_portable(detail::BwdParams params) { flash_backward<Portable>(params); }

}  // namespace pflash::cpu
