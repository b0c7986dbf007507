// AVX512-BF16: the AVX-512 policy plus vdpbf16ps, which multiplies bf16 pairs and adds both products
// to one fp32 lane: 32 multiply-adds per instruction where fp32 FMA does 16. The kernels use it for
// the bf16 products whose reduction runs along pairs (tiles_bf16.hpp); everything else (the softmax,
// fp32 inputs) is the AVX-512 code. Included only by translation units compiled for that target.
#pragma once

#include <immintrin.h>

#include <cstdint>
#include <cstring>

#include "cpu/simd_avx512.hpp"
#include "pflash/dtype.hpp"

namespace pflash::cpu {

struct Avx512Bf16 : Avx512 {
  static constexpr bool kBf16Dot = true;

  using pairs = __m512i;  // 16 lanes of (bf16, bf16)

  static pairs load_pairs(const bfloat16* p) { return _mm512_load_si512(p); }
  // 32 bf16 from anywhere; the first n (< 32) only, the rest zero, for the masked form.
  static pairs loadu_pairs(const bfloat16* p) { return _mm512_loadu_si512(p); }
  static pairs loadu_pairs(const bfloat16* p, std::int64_t n) {
    return _mm512_maskz_loadu_epi16(static_cast<__mmask32>((std::uint64_t{1} << n) - 1), p);
  }
  // Both elements of one pair (p[0], p[1]) in every lane.
  static pairs broadcast_pair(const bfloat16* p) {
    std::int32_t bits;
    std::memcpy(&bits, p, sizeof bits);
    return _mm512_set1_epi32(bits);
  }
  // acc + a.lo * b.lo + a.hi * b.hi, lane by lane, in fp32.
  static vec dot_pairs(vec acc, pairs a, pairs b) {
    return _mm512_dpbf16_ps(acc, reinterpret_cast<__m512bh>(a), reinterpret_cast<__m512bh>(b));
  }
  // Element `which` (0: the pair's first, 1: its second) of every lane's pair, widened to fp32.
  static vec pair_element(pairs x, int which) {
    return _mm512_castsi512_ps(which == 0 ? _mm512_slli_epi32(x, 16)
                                          : _mm512_and_si512(x, _mm512_set1_epi32(static_cast<int>(0xffff0000u))));
  }
  // 32 fp32 values (lo: the first 16) rounded to bf16 (nearest even, as bfloat16(float) rounds).
  static void store_bf16(bfloat16* p, vec lo, vec hi) {
    _mm512_storeu_si512(p, reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(hi, lo)));
  }
  // 16 pairs (first[i], second[i]) rounded to bf16: two rows interleaved into pairs.
  static void store_bf16_pairs(bfloat16* p, vec first, vec second) {
    const __m512i halves = reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(second, first));
    const __m512i interleave = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7,
                                                22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
    _mm512_storeu_si512(p, _mm512_permutexvar_epi16(interleave, halves));
  }
};

}  // namespace pflash::cpu
