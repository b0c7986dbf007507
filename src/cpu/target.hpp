// Compiling a region of a translation unit for an instruction set, with GCC and Clang alike:
//   PFLASH_TARGET_BEGIN("avx2,fma")  #include "cpu/simd_avx2.hpp" ... the kernel ...  PFLASH_TARGET_END
// GCC takes a target pragma; Clang pushes a target attribute onto every function defined in the
// region. The standard headers and <immintrin.h> (whose intrinsics carry their own target attributes)
// are included before the region, so none of their inline functions is compiled for the wider set
// and shared, through the linker, with code that runs on CPUs without it.
#pragma once

#include <immintrin.h>

#define PFLASH_PRAGMA(...) _Pragma(#__VA_ARGS__)

#if defined(__clang__)
#define PFLASH_TARGET_BEGIN(features) \
  PFLASH_PRAGMA(clang attribute push(__attribute__((target(features))), apply_to = function))
#define PFLASH_TARGET_END PFLASH_PRAGMA(clang attribute pop)
#else
// GCC 12 reads the AVX-512 intrinsics' own _mm512_undefined_ps() as uninitialised (a false positive).
#define PFLASH_TARGET_BEGIN(features)                                                          \
  PFLASH_PRAGMA(GCC push_options) PFLASH_PRAGMA(GCC target(features)) PFLASH_PRAGMA(GCC diagnostic push) \
      PFLASH_PRAGMA(GCC diagnostic ignored "-Wmaybe-uninitialized")
#define PFLASH_TARGET_END PFLASH_PRAGMA(GCC diagnostic pop) PFLASH_PRAGMA(GCC pop_options)
#endif
