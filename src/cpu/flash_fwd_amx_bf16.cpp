// Compiled for AMX-BF16 (AVX512-BF16 plus the AMX tile instructions) by target pragma, as the other
// instruction sets' files are (flash_fwd_avx512_bf16.cpp says why). bf16 inputs multiply on tiles;
// fp32 inputs have nothing to gain from them and run the AVX-512 kernels.
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

PFLASH_TARGET_BEGIN("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,fma,amx-tile,amx-bf16")
#include "cpu/simd_amx.hpp"
#include "cpu/flash_fwd_kernel.hpp"

namespace pflash::cpu {
void flash_forward_amx_bf16(detail::FwdParams params) {
  if (params.dtype == DType::kBFloat16) {
    FlashForward<AmxBf16, bfloat16>(params).run();
  } else {
    flash_forward_avx512(params);
  }
}
}  // namespace pflash::cpu
PFLASH_TARGET_END
#else
namespace pflash::cpu {
void flash_forward_amx_bf16(detail::FwdParams params) { flash_forward_portable(params); }
}  // namespace pflash::cpu
#endif
