#include "cpu/simd_portable.hpp"
// simd_portable.hpp first: the kernel template is instantiated for it below.
#include "cpu/backend.hpp"
#include "cpu/flash_decode_kernel.hpp"

namespace pflash::cpu {

void flash_decode_portable(detail::DecodeParams params) { flash_decode<Portable>(params); }

}  // namespace pflash::cpu
