// Compiled for AVX2 + FMA by target pragma; the standard headers come first, outside it (see
// flash_fwd_avx2.cpp).
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

PFLASH_TARGET_BEGIN("avx2,fma")
#include "cpu/simd_avx2.hpp"
#include "cpu/flash_bwd_kernel.hpp"

namespace pflash::cpu {
void flash_backward_avx2(detail::BwdParams params) { flash_backward<Avx2>(params); }
}  // namespace pflash::cpu
PFLASH_TARGET_END
#else
namespace pflash::cpu {
void flash_backward_avx2(detail::BwdParams params) { flash_backward_portable(params); }
}  // namespace pflash::cpu
#endif
