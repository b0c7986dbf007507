// 16-lane fp32 vectors on AVX-512 (F, BW, VL, DQ). Included only by translation units compiled for
// that target. The same policy as simd_avx2.hpp, twice as wide: every kernel family runs on it
// unchanged (a K panel is 32 keys, a V strip 32 columns).
#pragma once

#include <immintrin.h>

#include "cpu/exp2_poly.hpp"
#include "pflash/dtype.hpp"  // included first, outside the target pragma, by every user of this file

namespace pflash::cpu {

struct Avx512 {
  using vec = __m512;
  static constexpr int kWidth = 16;
  // Register tiles: 8 rows x 2 vectors = 16 accumulators, plus 2 loaded vectors and 1 broadcast, in
  // 32 zmm registers: room left so the compiler never spills a tile (12 rows measured no faster).
  static constexpr int kTileRows = 8;
  static constexpr bool kBf16Dot = false;  // no bf16 pair products: bf16 is widened to fp32
  static constexpr int kRegisterRows = kTileRows;  // the rows a vector tile holds (see simd_amx.hpp)
  static constexpr bool kAmx = false;              // no AMX tiles

  static vec zero() { return _mm512_setzero_ps(); }
  static vec set1(float x) { return _mm512_set1_ps(x); }
  static vec load(const float* p) { return _mm512_load_ps(p); }
  static vec loadu(const float* p) { return _mm512_loadu_ps(p); }
  static vec loadu(const bfloat16* p) {
    const __m256i half = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(half), 16));
  }
  static void store(float* p, vec x) { _mm512_store_ps(p, x); }
  static void storeu(float* p, vec x) { _mm512_storeu_ps(p, x); }
  static vec fmadd(vec a, vec b, vec c) { return _mm512_fmadd_ps(a, b, c); }
  static vec mul(vec a, vec b) { return _mm512_mul_ps(a, b); }
  static vec add(vec a, vec b) { return _mm512_add_ps(a, b); }
  static vec sub(vec a, vec b) { return _mm512_sub_ps(a, b); }
  static vec div(vec a, vec b) { return _mm512_div_ps(a, b); }
  static vec max(vec a, vec b) { return _mm512_max_ps(a, b); }
  // NaN lanes of x set every bit of the flag lane (itself a NaN pattern, so any_flagged is one compare).
  static vec flag_nan(vec flags, vec x) {
    return _mm512_mask_mov_ps(flags, _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q), _mm512_castsi512_ps(_mm512_set1_epi32(-1)));
  }
  static bool any_flagged(vec flags) { return _mm512_cmp_ps_mask(flags, flags, _CMP_UNORD_Q) != 0; }

  static float reduce_add(vec x) { return _mm512_reduce_add_ps(x); }
  // out[0..3] = the lane sums of a, b, c, d: each folded to 8 lanes, then AVX2's hadd tree.
  static __m256 fold(vec x) { return _mm256_add_ps(_mm512_castps512_ps256(x), _mm512_extractf32x8_ps(x, 1)); }
  static void store_sums4(float* out, vec a, vec b, vec c, vec d) {
    const __m256 ab = _mm256_hadd_ps(fold(a), fold(b)), cd = _mm256_hadd_ps(fold(c), fold(d));
    const __m256 abcd = _mm256_hadd_ps(ab, cd);
    _mm_storeu_ps(out, _mm_add_ps(_mm256_castps256_ps128(abcd), _mm256_extractf128_ps(abcd, 1)));
  }
  static float reduce_max(vec x) { return _mm512_reduce_max_ps(x); }

  // 2^x for x <= 0, as in simd_avx2.hpp (the same polynomial, cpu/exp2_poly.hpp).
  static vec exp2(vec x) {
    x = _mm512_min_ps(_mm512_set1_ps(127.0f), _mm512_max_ps(_mm512_set1_ps(-127.0f), x));  // NaN stays NaN
    const vec n = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const vec f = _mm512_sub_ps(x, n);
    vec p = _mm512_set1_ps(kExp2Poly[0]);
#pragma GCC unroll 8
    for (int i = 1; i < 7; ++i) p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(kExp2Poly[i]));
    const __m512i bits = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23);
    return _mm512_mul_ps(p, _mm512_castsi512_ps(bits));
  }
};

}  // namespace pflash::cpu
