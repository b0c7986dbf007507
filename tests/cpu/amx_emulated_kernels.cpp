// Compiled for AVX512-BF16 by target pragma, as src/cpu/flash_fwd_avx512_bf16.cpp is (it says why),
// without the AMX instructions: the tiles are amx_tile_emulator.hpp's.
#include "cpu/amx_emulated_kernels.hpp"

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <numbers>
#include <type_traits>
#include <vector>

#include "core/params.hpp"
#include "core/workspace.hpp"
#include "cpu/amx_tile_emulator.hpp"
#include "pflash/dtype.hpp"
#include "pflash/error.hpp"

#include "cpu/target.hpp"

PFLASH_TARGET_BEGIN("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,fma")
#include "cpu/simd_amx.hpp"
#include "cpu/flash_bwd_kernel.hpp"
#include "cpu/flash_fwd_kernel.hpp"

namespace pflash::testing {

using EmulatedAmx = cpu::AmxBf16Policy<EmulatedAmxTiles>;

void flash_forward_amx_emulated(const AttentionParams& params) {
  const detail::FwdParams p = detail::make_fwd_params(params, "flash_forward_amx_emulated");
  if (p.dtype != DType::kBFloat16) throw Error(ErrorCode::kUnsupported, "flash_forward_amx_emulated: bf16 only");
  cpu::FlashForward<EmulatedAmx, bfloat16>(p).run();
}

void flash_backward_amx_emulated(const AttentionBackwardParams& params) {
  const detail::BwdParams p = detail::make_bwd_params(params, "flash_backward_amx_emulated");
  if (p.fwd.dtype != DType::kBFloat16) throw Error(ErrorCode::kUnsupported, "flash_backward_amx_emulated: bf16 only");
  cpu::FlashBackward<EmulatedAmx, bfloat16>(p).run();
}

}  // namespace pflash::testing
PFLASH_TARGET_END
