// Compiled for AVX512-BF16 (AVX-512 plus vdpbf16ps) by target pragma, not by flags on the whole file:
// the standard library headers are included first, outside the pragma, so none of their inline
// functions is compiled for AVX-512 and shared with code that runs on CPUs without it. bf16 inputs
// take the pair products; fp32 inputs the AVX-512 fp32 code.
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

PFLASH_TARGET_BEGIN("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,fma")
#include "cpu/simd_avx512_bf16.hpp"
#include "cpu/flash_fwd_kernel.hpp"

namespace pflash::cpu {
void flash_forward_avx512_bf16(detail::FwdParams params) { flash_forward<Avx512Bf16>(params); }
}  // namespace pflash::cpu
PFLASH_TARGET_END
#else
namespace pflash::cpu {
void flash_forward_avx512_bf16(detail::FwdParams params) { flash_forward_portable(params); }
}  // namespace pflash::cpu
#endif
