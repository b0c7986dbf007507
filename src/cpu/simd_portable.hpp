// The portable path: one float per "vector". Correct on every CPU; the compiler may still
// auto-vectorise the surrounding loops for the baseline target.
#pragma once

#include <algorithm>
#include <cmath>

#include "pflash/dtype.hpp"

namespace pflash::cpu {

struct Portable {
  using vec = float;
  static constexpr int kWidth = 1;
  static constexpr int kTileRows = 4;
  static constexpr bool kBf16Dot = false;  // no bf16 pair products: bf16 is widened to fp32
  static constexpr int kRegisterRows = kTileRows;  // the rows a vector tile holds (see simd_amx.hpp)
  static constexpr bool kAmx = false;              // no AMX tiles

  static vec zero() { return 0.0f; }
  static vec set1(float x) { return x; }
  static vec load(const float* p) { return *p; }
  static vec loadu(const float* p) { return *p; }
  static vec loadu(const bfloat16* p) { return static_cast<float>(*p); }
  static void store(float* p, vec x) { *p = x; }
  static void storeu(float* p, vec x) { *p = x; }
  static vec fmadd(vec a, vec b, vec c) { return a * b + c; }
  static vec mul(vec a, vec b) { return a * b; }
  static vec add(vec a, vec b) { return a + b; }
  static vec sub(vec a, vec b) { return a - b; }
  static vec div(vec a, vec b) { return a / b; }
  static vec max(vec a, vec b) { return std::max(a, b); }
  static vec flag_nan(vec flags, vec x) { return std::isnan(x) ? 1.0f : flags; }
  static bool any_flagged(vec flags) { return flags != 0.0f; }
  static float reduce_add(vec x) { return x; }
  static void store_sums4(float* out, vec a, vec b, vec c, vec d) {
    out[0] = a;
    out[1] = b;
    out[2] = c;
    out[3] = d;
  }
  static float reduce_max(vec x) { return x; }
  static vec exp2(vec x) { return std::exp2(x); }
};

}  // namespace pflash::cpu
