// Compiled for AVX512-BF16 by target pragma; the standard headers come first, outside it (see
// flash_fwd_avx512.cpp). bf16 inputs take the pair products; fp32 inputs the AVX-512 fp32 code.
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <numbers>

#include "core/params.hpp"
#include "core/workspace.hpp"
#include "cpu/backend.hpp"
#include "pflash/dtype.hpp"

#if defined(__x86_64__)
#include "cpu/target.hpp"

PFLASH_TARGET_BEGIN("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,fma")
#include "cpu/simd_avx512_bf16.hpp"
#include "cpu/flash_bwd_kernel.hpp"

namespace pflash::cpu {
void flash_backward_avx512_bf16(detail::BwdParams params) { flash_backward<Avx512Bf16>(params); }
}  // namespace pflash::cpu
PFLASH_TARGET_END
#else
namespace pflash::cpu {
void flash_backward_avx512_bf16(detail::BwdParams params) { flash_backward_portable(params); }
}  // namespace pflash::cpu
#endif
