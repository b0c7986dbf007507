// The bf16 products of tiles_bf16.hpp on AMX tiles (Isa::kAmx), for 16 rows at a time: a 16 x 32
// block of scores or of the accumulator, reduced over whole chunks of 16 pairs (32 bf16). The panels
// need no new layout: tiles_bf16.hpp's pairs are AMX's own right-operand layout (a row of pairs along
// the reduction), so a right operand is a 64-byte column half of a K panel's pair rows or a V strip's
// key pairs, 128 bytes apart; the left operand is 16 rows of 32 bf16 read in place (a query row, a
// row of probabilities rounded to bf16). What a chunk does not cover, the vector tiles finish.
//
// Tiles: 0 and 1 hold the two 16 x 16 fp32 halves of the output; 2 the left operand; 3 and 4 the two
// halves of the right one. Everything lives in an anonymous namespace, as in tiles.hpp.
#pragma once

#include <cstdint>

#include "cpu/tiles.hpp"
#include "pflash/dtype.hpp"

namespace pflash::cpu {
namespace {  // NOLINT(google-build-namespaces): one copy per instruction set.

constexpr int kAmxRows = 16;   // rows of every tile
constexpr int kAmxPairs = 16;  // pairs one product reduces over (the left operand's 32 bf16 a row)

// The tile state of the calling thread for a scope: configured on entry, released on exit (a no-op
// for policies without tiles). Every thread that runs tile products holds one.
template <class Isa>
class TileScope {
 public:
  TileScope() {
    if constexpr (Isa::kAmx) Isa::tiles::configure();
  }
  ~TileScope() {
    if constexpr (Isa::kAmx) Isa::tiles::release();
  }
  TileScope(const TileScope&) = delete;
  TileScope& operator=(const TileScope&) = delete;
};

// out[16][32] (+)= a[16][2 * kAmxPairs * chunks] x b over `chunks` chunks of pairs: a's rows are bf16
// at a_ld elements apart; b points at the first of its pair rows, b_ld bf16 apart, each holding the
// 32 output columns' pairs (a K panel's or a V strip's layout: b_ld = 64; the backward's interleaved
// rows of P or dS: twice their columns); out is fp32 with rows out_ld apart, read first when accumulate.
template <class Isa>
inline void amx_pair_product(const bfloat16* a, int64_t a_ld, const bfloat16* b, int64_t b_ld, int64_t chunks,
                             float* out, int64_t out_ld, bool accumulate) {
  using Tiles = typename Isa::tiles;
  constexpr int64_t kHalf = 16 * 2;  // the second half's 16 columns start 16 pairs into a row
  const int64_t b_stride = b_ld * static_cast<int64_t>(sizeof(bfloat16));
  const int64_t out_stride = out_ld * static_cast<int64_t>(sizeof(float));
  if (accumulate) {
    Tiles::template load<0>(out, out_stride);
    Tiles::template load<1>(out + 16, out_stride);
  } else {
    Tiles::template zero<0>();
    Tiles::template zero<1>();
  }
  for (int64_t chunk = 0; chunk < chunks; ++chunk) {
    const bfloat16* b_chunk = b + chunk * kAmxPairs * b_ld;
    Tiles::template load<2>(a + chunk * 2 * kAmxPairs, a_ld * static_cast<int64_t>(sizeof(bfloat16)));
    Tiles::template load<3>(b_chunk, b_stride);
    Tiles::template load<4>(b_chunk + kHalf, b_stride);
    Tiles::template dot<0, 2, 3>();
    Tiles::template dot<1, 2, 4>();
  }
  Tiles::template store<0>(out, out_stride);
  Tiles::template store<1>(out + 16, out_stride);
}

}  // namespace
}  // namespace pflash::cpu
