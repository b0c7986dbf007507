// A software model of the AMX tiles with the interface of pflash::cpu::AmxTiles (src/cpu/simd_amx.hpp),
// as Intel's architecture manual defines the instructions the kernels use, for the configuration the
// kernels load (palette 1, every tile 16 rows x 64 bytes): tileloadd / tilestored move 16 rows of 64
// bytes at a byte stride, tilezero clears, and tdpbf16ps does, for m, n in 0..15 and k in 0..15,
//   C[m][n] += fp32(A[m][2k]) * fp32(B[k][2n]);  C[m][n] += fp32(A[m][2k+1]) * fp32(B[k][2n+1])
// in that order. A tile used before configure() (where the hardware faults) aborts.
//
// It lets the AMX kernels' tile layouts and blocking be checked on CPUs without AMX; it says nothing
// of the hardware's speed, nor of anything the model gets wrong about it.
#pragma once

#include <atomic>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>

#include "pflash/dtype.hpp"

namespace pflash::testing {

struct EmulatedAmxTiles {
  static constexpr int kRows = 16;
  static constexpr int kRowBytes = 64;

  // Tile products run, all threads together: a test can tell that tiles did the work.
  static std::atomic<std::int64_t>& products() {
    static std::atomic<std::int64_t> count{0};
    return count;
  }

  struct State {
    bool configured = false;
    std::uint8_t tiles[8][kRows][kRowBytes];
  };
  static State& state() {
    thread_local State s;
    return s;
  }
  static std::uint8_t* tile(int t) {
    if (!state().configured) {
      std::fprintf(stderr, "EmulatedAmxTiles: tile %d used without a configuration (a fault on hardware)\n", t);
      std::abort();
    }
    return &state().tiles[t][0][0];
  }

  static void configure() { state().configured = true; }
  static void release() { state().configured = false; }
  template <int T>
  static void zero() {
    std::memset(tile(T), 0, kRows * kRowBytes);
  }
  template <int T>
  static void load(const void* p, std::int64_t stride_bytes) {
    for (int r = 0; r < kRows; ++r) {
      std::memcpy(tile(T) + r * kRowBytes, static_cast<const std::uint8_t*>(p) + r * stride_bytes, kRowBytes);
    }
  }
  template <int T>
  static void store(void* p, std::int64_t stride_bytes) {
    for (int r = 0; r < kRows; ++r) {
      std::memcpy(static_cast<std::uint8_t*>(p) + r * stride_bytes, tile(T) + r * kRowBytes, kRowBytes);
    }
  }
  template <int C, int A, int B>
  static void dot() {
    static_assert(C != A && C != B && A != B, "tdpbf16ps takes three different tiles");
    float c[kRows][16];
    bfloat16 a[kRows][32], b[kRows][32];
    std::memcpy(c, tile(C), sizeof c);
    std::memcpy(a, tile(A), sizeof a);
    std::memcpy(b, tile(B), sizeof b);
    for (int m = 0; m < kRows; ++m) {
      for (int k = 0; k < 16; ++k) {
        for (int n = 0; n < 16; ++n) {
          c[m][n] += static_cast<float>(a[m][2 * k]) * static_cast<float>(b[k][2 * n]);
          c[m][n] += static_cast<float>(a[m][2 * k + 1]) * static_cast<float>(b[k][2 * n + 1]);
        }
      }
    }
    std::memcpy(tile(C), c, sizeof c);
    products().fetch_add(1, std::memory_order_relaxed);
  }
};

}  // namespace pflash::testing
