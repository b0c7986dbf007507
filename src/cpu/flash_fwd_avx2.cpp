// Compiled for AVX2 + FMA by target pragma, not by -mavx2 on the whole file: the standard library
// headers are included first, outside the pragma, so none of their inline functions is compiled
// for AVX2 and shared with code that runs on CPUs without it.
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <numbers>
#include <vector>

#include "core/params.hpp"
#include "core/workspace.hpp"
#include "cpu/backend.hpp"
#include "pflash/dtype.hpp"

#if defined(__x86_64__)
#include "cpu/target.hpp"

PFLASH_TARGET_BEGIN("avx2,fma")
#include "cpu/simd_avx2.hpp"
#include "cpu/flash_fwd_kernel.hpp"

namespace pflash::cpu {
void flash_forward_avx2(detail::FwdParams params) { flash_forward<Avx2>(params); }
}  // namespace pflash::cpu
PFLASH_TARGET_END
#else
namespace pflash::cpu {
void flash_forward_avx2(detail::FwdParams params) { flash_forward_portable(params); }
}  // namespace pflash::cpu
#endif
