// AMX-BF16: the AVX512-BF16 policy plus Intel AMX tiles, whose tdpbf16ps multiplies a 16 x 32 bf16
// tile by a 32 x 16 one into 16 x 16 fp32 sums: 8192 multiply-adds an instruction, where vdpbf16ps
// does 32. The kernels put their bf16 products on tiles (tiles_amx.hpp) wherever 16 query rows share
// the work, and keep everything else (the softmax, the masks' edges, fp32 inputs) on AVX-512.
// Included only by translation units compiled for that target.
//
// The tile operations are a policy of their own (`Tiles`), so that the same kernels also run on a
// software model of the tiles (tests/cpu/amx_tile_emulator.hpp), which checks their layouts and
// blocking on CPUs without AMX.
#pragma once

#include <immintrin.h>

#include <cstdint>

#include "cpu/simd_avx512_bf16.hpp"

namespace pflash::cpu {

// Palette 1 with all eight tiles 16 rows x 64 bytes: every operand the kernels use has that shape
// (16 x 16 fp32 sums, 16 x 32 bf16 rows, 16 pairs x 16 columns), so one configuration serves a
// whole kernel call and no tile is ever reconfigured between products.
struct alignas(64) AmxTileConfig {
  std::uint8_t palette = 1;
  std::uint8_t start_row = 0;
  std::uint8_t reserved[14] = {};
  std::uint16_t bytes_per_row[16] = {64, 64, 64, 64, 64, 64, 64, 64};
  std::uint8_t rows[16] = {16, 16, 16, 16, 16, 16, 16, 16};
};

// GCC's tile intrinsics are macros that paste their tile numbers into the instruction's text, so a
// number must be a literal where the macro expands: each operation below picks its instruction among
// the tiles the kernels use (tiles_amx.hpp: 0 to 4) by `if constexpr`.
#define PFLASH_FOR_TILE(T, OP) \
  if constexpr ((T) == 0) {    \
    OP(0);                     \
  } else if constexpr ((T) == 1) { \
    OP(1);                     \
  } else if constexpr ((T) == 2) { \
    OP(2);                     \
  } else if constexpr ((T) == 3) { \
    OP(3);                     \
  } else {                     \
    static_assert((T) == 4, "tiles 0 to 4 only");                                             \
    OP(4);                     \
  }

// The hardware's tiles. Tile numbers are template arguments: the instructions encode them.
struct AmxTiles {
  static void configure() {
    static const AmxTileConfig config;
    _tile_loadconfig(&config);
  }
  static void release() { _tile_release(); }
  template <int T>
  static void zero() {
#define PFLASH_TILE_ZERO(n) _tile_zero(n)
    PFLASH_FOR_TILE(T, PFLASH_TILE_ZERO)
#undef PFLASH_TILE_ZERO
  }
  template <int T>
  static void load(const void* p, std::int64_t stride_bytes) {
#define PFLASH_TILE_LOAD(n) _tile_loadd(n, p, stride_bytes)
    PFLASH_FOR_TILE(T, PFLASH_TILE_LOAD)
#undef PFLASH_TILE_LOAD
  }
  template <int T>
  static void store(void* p, std::int64_t stride_bytes) {
#define PFLASH_TILE_STORE(n) _tile_stored(n, p, stride_bytes)
    PFLASH_FOR_TILE(T, PFLASH_TILE_STORE)
#undef PFLASH_TILE_STORE
  }
  // C += A x B, with B's rows holding pairs along the reduction (the layout of tiles_bf16.hpp). The
  // kernels multiply tile 2 by tile 3 into tile 0 and by tile 4 into tile 1.
  template <int C, int A, int B>
  static void dot() {
    static_assert(A == 2 && ((C == 0 && B == 3) || (C == 1 && B == 4)), "products (0, 2, 3) and (1, 2, 4) only");
    if constexpr (C == 0) {
      _tile_dpbf16ps(0, 2, 3);
    } else {
      _tile_dpbf16ps(1, 2, 4);
    }
  }
};

#undef PFLASH_FOR_TILE

template <class Tiles>
struct AmxBf16Policy : Avx512Bf16 {
  static constexpr bool kAmx = true;
  using tiles = Tiles;
  // The kernels sweep 16 query rows at a time (a tile's rows); their vector tiles still hold 8.
  static constexpr int kTileRows = 16;
  static constexpr int kRegisterRows = Avx512Bf16::kTileRows;
};

using AmxBf16 = AmxBf16Policy<AmxTiles>;

}  // namespace pflash::cpu
