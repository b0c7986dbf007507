// The AMX kernels (flash_fwd_kernel.hpp and flash_bwd_kernel.hpp over the AMX policy) with their
// tiles emulated (amx_tile_emulator.hpp): the kernels' tile code, runnable on any CPU with
// AVX512-BF16 (the code around the tiles is AVX512-BF16's). bf16 inputs only.
#pragma once

#include "pflash/attention.hpp"

namespace pflash::testing {

void flash_forward_amx_emulated(const AttentionParams& params);
void flash_backward_amx_emulated(const AttentionBackwardParams& params);

}  // namespace pflash::testing
