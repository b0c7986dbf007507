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
#if defined(__clang__)  // Clang's form of the same: the attribute on every function defined below
#include <immintrin.h>  // the intrinsics carry their own target attributes
#pragma clang attribute push(__attribute__((target("avx2,fma"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#endif
#include "cpu/simd_avx2.hpp"
#include "cpu/flash_bwd_kernel.hpp"

namespace pflash::cpu {
void flash_backward_avx2(detail::BwdParams params) { flash_backward<Avx2>(params); }
}  // namespace pflash::cpu
#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif
#else
namespace pflash::cpu {
void flash_backward_avx2(detail::BwdParams params) { flash_backward_portable(params); }
}  // namespace pflash::cpu
#endif
