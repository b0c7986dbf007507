#include "cpu/simd_portable.hpp"
// simd_portable.hpp first: the kernel template is instantiated for it below.
#include "cpu/backend.hpp"
#include "cpu/flash_fwd_kernel.hpp"

namespace pflash::cpu {

void flash_forward_portable(detail::FwdParams params) { flash_forward<Portable>(params); }

}  // namespace pflash::cpu
