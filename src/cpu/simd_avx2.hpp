// 8-lane fp32 vectors on AVX2 + FMA. Included only by translation units compiled for that target.
#pragma once

#include <immintrin.h>

#include "cpu/exp2_poly.hpp"
#include "pflash/dtype.hpp"  // included first, outside the target pragma, by every user of this file

namespace pflash::cpu {

struct Avx2 {
  using vec = __m256;
  static constexpr int kWidth = 8;
  // Register tiles: 6 rows x 2 vectors = 12 accumulators, plus 2 loaded vectors and 1 broadcast,
  // fills 15 of the 16 ymm registers.
  static constexpr int kTileRows = 6;
  static constexpr bool kBf16Dot = false;  // no bf16 pair products: bf16 is widened to fp32
  static constexpr int kRegisterRows = kTileRows;  // the rows a vector tile holds (see simd_amx.hpp)
  static constexpr bool kAmx = false;              // no AMX tiles

  static vec zero() { return _mm256_setzero_ps(); }
  static vec set1(float x) { return _mm256_set1_ps(x); }
  static vec load(const float* p) { return _mm256_load_ps(p); }
  // Unaligned loads of W elements as fp32, from the caller's own tensors (fp32 or bf16).
  static vec loadu(const float* p) { return _mm256_loadu_ps(p); }
  static vec loadu(const bfloat16* p) {
    // bf16 is the top half of an fp32: widen each 16-bit lane to 32 bits and shift it up.
    const __m128i half = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(half), 16));
  }
  static void store(float* p, vec x) { _mm256_store_ps(p, x); }
  static void storeu(float* p, vec x) { _mm256_storeu_ps(p, x); }
  static vec fmadd(vec a, vec b, vec c) { return _mm256_fmadd_ps(a, b, c); }
  static vec mul(vec a, vec b) { return _mm256_mul_ps(a, b); }
  static vec add(vec a, vec b) { return _mm256_add_ps(a, b); }
  static vec sub(vec a, vec b) { return _mm256_sub_ps(a, b); }
  static vec div(vec a, vec b) { return _mm256_div_ps(a, b); }
  static vec max(vec a, vec b) { return _mm256_max_ps(a, b); }
  // Accumulates which lanes of x are NaN (max() drops a NaN: it returns its second operand).
  static vec flag_nan(vec flags, vec x) { return _mm256_or_ps(flags, _mm256_cmp_ps(x, x, _CMP_UNORD_Q)); }
  static bool any_flagged(vec flags) { return _mm256_movemask_ps(flags) != 0; }

  static float reduce_add(vec x) {
    __m128 r = _mm_add_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
    r = _mm_add_ps(r, _mm_movehl_ps(r, r));
    r = _mm_add_ss(r, _mm_movehdup_ps(r));
    return _mm_cvtss_f32(r);
  }
  // out[0..3] = the lane sums of a, b, c, d: four dot products finished with one store.
  static void store_sums4(float* out, vec a, vec b, vec c, vec d) {
    const __m256 ab = _mm256_hadd_ps(a, b), cd = _mm256_hadd_ps(c, d);
    const __m256 abcd = _mm256_hadd_ps(ab, cd);  // per 128-bit half: [a, b, c, d] partial sums
    _mm_storeu_ps(out, _mm_add_ps(_mm256_castps256_ps128(abcd), _mm256_extractf128_ps(abcd, 1)));
  }
  static float reduce_max(vec x) {
    __m128 r = _mm_max_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
    r = _mm_max_ps(r, _mm_movehl_ps(r, r));
    r = _mm_max_ss(r, _mm_movehdup_ps(r));
    return _mm_cvtss_f32(r);
  }

  // 2^x for x <= 0 (scores minus their row max, in log2 units): x = n + f with n = round(x),
  // |f| <= 1/2, 2^f by the degree-6 polynomial of cpu/exp2_poly.hpp, 2^n built in the exponent
  // bits. x below -127 (including -inf) gives exactly 0, since n = -127 makes the exponent field 0.
  static vec exp2(vec x) {
    // The clamp's constants come first: min and max return their second operand for a NaN lane, so NaN stays NaN.
    x = _mm256_min_ps(_mm256_set1_ps(127.0f), _mm256_max_ps(_mm256_set1_ps(-127.0f), x));
    const vec n = _mm256_round_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const vec f = _mm256_sub_ps(x, n);
    vec p = _mm256_set1_ps(kExp2Poly[0]);
#pragma GCC unroll 8
    for (int i = 1; i < 7; ++i) p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(kExp2Poly[i]));
    const __m256i bits = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(bits));
  }
};

}  // namespace pflash::cpu
