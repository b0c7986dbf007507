// The CPU backend's entry points, one per kernel family; each picks the instruction set at run time.
#pragma once

#include "core/params.hpp"

namespace pflash::cpu {

void flash_forward(detail::FwdParams params);

// One definition per instruction set, each in its own translation unit (flash_fwd_<isa>.cpp).
void flash_forward_portable(detail::FwdParams params);
void flash_forward_avx2(detail::FwdParams params);

}  // namespace pflash::cpu
