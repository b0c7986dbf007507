// Compiled for AVX512-BF16 by target pragma; the standard headers come first, outside it (see
// flash_fwd_avx512.cpp). A bf16 query against a bf16 cache takes the pair products.
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <numbers>

#include "core/params.hpp"
#include "core/workspace.hpp"
#include "cpu/backend.hpp"
#include "core/merge_row.hpp"  // plain C++, shared with merge.cpp: kept outside the pragma
#include "pflash/dtype.hpp"

#if defined(__x86_64__)
#include "cpu/target.hpp"

PFLASH_TARGET_BEGIN("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,fma")
#include "cpu/simd_avx512_bf16.hpp"
#include "cpu/flash_decode_kernel.hpp"

namespace pflash::cpu {
void flash_decode_avx512_bf16(detail::DecodeParams params) { flash_decode<Avx512Bf16>(params); }
}  // namespace pflash::cpu
PFLASH_TARGET_END
#else
namespace pflash::cpu {
void flash_decode_avx512_bf16(detail::DecodeParams params) { flash_decode_portable(params); }
}  // namespace pflash::cpu
#endif
