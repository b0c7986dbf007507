// The register tiles of tiles.hpp for a policy with bf16 pair products (Isa::kBf16Dot: vdpbf16ps),
// for bf16 inputs. A pair product reduces along pairs of its inner index, so the panels hold pairs:
//   K panel  [D_pairs][kPanel keys][2]:            lane j of pair row d holds k[j][2d], k[j][2d + 1]
//   V strip  [Nk_padded / 2][kPanel columns][2]:   lane c of key pair j holds v[2j][c], v[2j + 1][c]
// and the left operand (a bf16 query row, or the probabilities rounded to bf16) is read a pair at a
// time, broadcast. Padding (d = D for odd D, keys past Nk, columns past D) is zero.
//
// Everything lives in an anonymous namespace, as in tiles.hpp.
#pragma once

#include <algorithm>
#include <cstdint>
#include <utility>

#include "cpu/tiles.hpp"
#include "cpu/tiles_amx.hpp"
#include "pflash/dtype.hpp"

namespace pflash::cpu {
namespace {  // NOLINT(google-build-namespaces): one copy per instruction set.

inline int64_t dim_pairs(int64_t dim) { return (dim + 1) / 2; }

inline bfloat16 element_or_zero(const bfloat16* row, int64_t d, int64_t dim) { return d < dim ? row[d] : bfloat16(); }

template <class Isa>
void pack_k_pairs(const bfloat16* k, int64_t row_stride, int64_t seq_k, int64_t dim, int64_t panel,
                  bfloat16* k_packed) {
  constexpr int kPanel = Layout<Isa>::kPanel;
  const int64_t pairs = dim_pairs(dim);
  bfloat16* dst = k_packed + panel * pairs * kPanel * 2;
  for (int jj = 0; jj < kPanel; ++jj) {
    const int64_t key = panel * kPanel + jj;
    const bfloat16* row = key < seq_k ? k + key * row_stride : nullptr;
    for (int64_t d2 = 0; d2 < pairs; ++d2) {
      bfloat16* out = dst + (d2 * kPanel + jj) * 2;
      out[0] = row ? element_or_zero(row, 2 * d2, dim) : bfloat16();
      out[1] = row ? element_or_zero(row, 2 * d2 + 1, dim) : bfloat16();
    }
  }
}

template <class Isa>
void pack_v_pairs(const bfloat16* v, int64_t row_stride, int64_t seq_k, int64_t dim, int64_t seq_k_padded,
                  int64_t dim_padded, int64_t panel, bfloat16* v_packed) {
  constexpr int kPanel = Layout<Isa>::kPanel;
  for (int jj = 0; jj < kPanel; ++jj) {
    const int64_t key = panel * kPanel + jj;
    const bfloat16* row = key < seq_k ? v + key * row_stride : nullptr;
    for (int64_t strip = 0; strip < dim_padded / kPanel; ++strip) {
      bfloat16* dst = v_packed + (strip * seq_k_padded + (key & ~int64_t{1})) * kPanel + (key & 1);
      for (int c = 0; c < kPanel; ++c) dst[2 * c] = row ? element_or_zero(row, strip * kPanel + c, dim) : bfloat16();
    }
  }
}

// scores[Rows][kPanel] = (partial + q[Rows][pairs first..pairs) x k_panel^T) * scale in vector tiles, where
// partial is what scores holds when accumulate, else 0: the whole product (first = 0), or the pairs
// an AMX product left over and its scale.
template <class Isa, int Rows>
inline void qk_tile_pairs_from(const bfloat16* q, int64_t q_ld, const bfloat16* k_panel, int64_t first, int64_t pairs,
                               float scale, float* scores, int64_t s_ld, bool accumulate) {
  using V = typename Isa::vec;
  using P = typename Isa::pairs;
  constexpr int W = Isa::kWidth;
  V c0[Rows], c1[Rows];
#pragma GCC unroll 16
  for (int r = 0; r < Rows; ++r) {
    c0[r] = accumulate ? Isa::load(scores + r * s_ld) : Isa::zero();
    c1[r] = accumulate ? Isa::load(scores + r * s_ld + W) : Isa::zero();
  }
  for (int64_t d2 = first; d2 < pairs; ++d2) {
    const P b0 = Isa::load_pairs(k_panel + d2 * 4 * W);
    const P b1 = Isa::load_pairs(k_panel + d2 * 4 * W + 2 * W);
#pragma GCC unroll 16
    for (int r = 0; r < Rows; ++r) {
      const P a = Isa::broadcast_pair(q + r * q_ld + 2 * d2);
      c0[r] = Isa::dot_pairs(c0[r], a, b0);
      c1[r] = Isa::dot_pairs(c1[r], a, b1);
    }
  }
  const V s = Isa::set1(scale);
#pragma GCC unroll 16
  for (int r = 0; r < Rows; ++r) {
    Isa::store(scores + r * s_ld, Isa::mul(c0[r], s));
    Isa::store(scores + r * s_ld + W, Isa::mul(c1[r], s));
  }
}

// scores[Rows][kPanel] = (q[Rows][D] x k_panel^T) * scale, q a bf16 tile of even row length 2 * pairs.
// With AMX (Rows == 16) the whole chunks of pairs go through tiles; other row counts past a vector
// tile's are split into vector tiles.
template <class Isa, int Rows>
inline void qk_tile_pairs(const bfloat16* q, int64_t q_ld, const bfloat16* k_panel, int64_t pairs, float scale,
                          float* scores, int64_t s_ld) {
  if constexpr (Rows > Isa::kRegisterRows) {
    constexpr int R0 = Isa::kRegisterRows;
    static_assert(Rows <= 2 * R0, "a row sweep is at most two vector tiles");
    int64_t done = 0;
    if constexpr (Isa::kAmx && Rows == kAmxRows) {
      done = pairs / kAmxPairs * kAmxPairs;
      if (done > 0) amx_pair_product<Isa>(q, q_ld, k_panel, 2 * Layout<Isa>::kPanel, done / kAmxPairs, scores, s_ld, false);
    }
    qk_tile_pairs_from<Isa, R0>(q, q_ld, k_panel, done, pairs, scale, scores, s_ld, done > 0);
    qk_tile_pairs_from<Isa, Rows - R0>(q + R0 * q_ld, q_ld, k_panel, done, pairs, scale, scores + R0 * s_ld, s_ld,
                                       done > 0);
  } else {
    qk_tile_pairs_from<Isa, Rows>(q, q_ld, k_panel, 0, pairs, scale, scores, s_ld, false);
  }
}

// qk_rows_tile (tiles.hpp) with pair products: scores[Rows][0..3) = (q[Rows][D] x k[3 keys][D]^T) * scale
// for bf16 query rows zero-padded to a multiple of 2W (q_ld) and bf16 key rows read in place (the
// decode's cache): the dot products run along D in pairs, 2W elements an instruction; scores[r][3]
// is written 0, as there.
template <class Isa, int Rows>
inline void qk_rows_tile_pairs(const bfloat16* q, int64_t q_ld, const bfloat16* const (&k)[3], int64_t dim, float scale,
                               float* scores, int64_t s_ld) {
  using V = typename Isa::vec;
  using P = typename Isa::pairs;
  constexpr int W2 = 2 * Isa::kWidth;
  V c[Rows][3];
#pragma GCC unroll 16
  for (int r = 0; r < Rows; ++r) c[r][0] = c[r][1] = c[r][2] = Isa::zero();
  for (int64_t d = 0; d < dim; d += W2) {
#pragma GCC unroll 3
    for (int j = 0; j < 3; ++j) {
      const P kv = d + W2 <= dim ? Isa::loadu_pairs(k[j] + d) : Isa::loadu_pairs(k[j] + d, dim - d);
#pragma GCC unroll 16
      for (int r = 0; r < Rows; ++r) c[r][j] = Isa::dot_pairs(c[r][j], Isa::loadu_pairs(q + r * q_ld + d), kv);
    }
  }
  const V s = Isa::set1(scale);
#pragma GCC unroll 16
  for (int r = 0; r < Rows; ++r) {
    Isa::store_sums4(scores + r * s_ld, Isa::mul(c[r][0], s), Isa::mul(c[r][1], s), Isa::mul(c[r][2], s), Isa::zero());
  }
}

// acc[Rows][2W] = acc * alpha (skipped when null) + p x v over key_pairs pairs of a V strip (v_strip
// points at the first pair), p in bf16 with the pair (r, j) at p + r * p_rs + j * p_cs: p_cs = 2 for
// rows of p itself, p_rs = 2 for interleaved pairs of rows (interleave_rows: the backward's P^T, dS^T).
template <class Isa, int Rows>
inline void pv_tile_pairs(const bfloat16* p, int64_t p_rs, int64_t p_cs, const float* alpha, const bfloat16* v_strip,
                          int64_t key_pairs, float* acc, int64_t acc_ld) {
  if constexpr (Rows > Isa::kRegisterRows) {
    constexpr int R0 = Isa::kRegisterRows;
    static_assert(Rows <= 2 * R0, "a row sweep is at most two vector tiles");
    if constexpr (Isa::kAmx && Rows == kAmxRows) {
      // On tiles when p's rows are bf16 runs (p_cs == 2; not the backward's interleaved rows) and
      // hold a whole chunk: the accumulator scaled first, the leftover pairs in vector tiles after.
      if (p_cs == 2 && key_pairs >= kAmxPairs) {
        if (alpha != nullptr) {
          for (int r = 0; r < Rows; ++r) {
            const typename Isa::vec a = Isa::set1(alpha[r]);
            for (int c = 0; c < 2 * Isa::kWidth; c += Isa::kWidth) {
              Isa::storeu(acc + r * acc_ld + c, Isa::mul(Isa::loadu(acc + r * acc_ld + c), a));
            }
          }
        }
        const int64_t done = key_pairs / kAmxPairs * kAmxPairs;
        amx_pair_product<Isa>(p, p_rs, v_strip, 2 * Layout<Isa>::kPanel, done / kAmxPairs, acc, acc_ld, true);
        if (done < key_pairs) {
          pv_tile_pairs<Isa, Rows>(p + done * p_cs, p_rs, p_cs, nullptr, v_strip + done * 4 * Isa::kWidth,
                                   key_pairs - done, acc, acc_ld);
        }
        return;
      }
    }
    pv_tile_pairs<Isa, R0>(p, p_rs, p_cs, alpha, v_strip, key_pairs, acc, acc_ld);
    pv_tile_pairs<Isa, Rows - R0>(p + R0 * p_rs, p_rs, p_cs, alpha != nullptr ? alpha + R0 : nullptr, v_strip,
                                  key_pairs, acc + R0 * acc_ld, acc_ld);
    return;
  }
  using V = typename Isa::vec;
  using P = typename Isa::pairs;
  constexpr int W = Isa::kWidth;
  V c0[Rows], c1[Rows];
#pragma GCC unroll 16
  for (int r = 0; r < Rows; ++r) {
    c0[r] = Isa::loadu(acc + r * acc_ld);
    c1[r] = Isa::loadu(acc + r * acc_ld + W);
    if (alpha != nullptr) {
      c0[r] = Isa::mul(c0[r], Isa::set1(alpha[r]));
      c1[r] = Isa::mul(c1[r], Isa::set1(alpha[r]));
    }
  }
  for (int64_t j2 = 0; j2 < key_pairs; ++j2) {
    const P b0 = Isa::load_pairs(v_strip + j2 * 4 * W);
    const P b1 = Isa::load_pairs(v_strip + j2 * 4 * W + 2 * W);
#pragma GCC unroll 16
    for (int r = 0; r < Rows; ++r) {
      const P a = Isa::broadcast_pair(p + r * p_rs + j2 * p_cs);
      c0[r] = Isa::dot_pairs(c0[r], a, b0);
      c1[r] = Isa::dot_pairs(c1[r], a, b1);
    }
  }
#pragma GCC unroll 16
  for (int r = 0; r < Rows; ++r) {
    Isa::storeu(acc + r * acc_ld, c0[r]);
    Isa::storeu(acc + r * acc_ld + W, c1[r]);
  }
}

// acc_row[2W] += sum over keys [first, end) of p_row[j] * v[j] (fp32 p, one key at a time): the keys a
// pair product cannot take because the pair's other key is one the row does not see.
template <class Isa>
inline void pv_keys_single(const float* p_row, const bfloat16* v_strip, int64_t first, int64_t end, float* acc_row) {
  using V = typename Isa::vec;
  constexpr int W = Isa::kWidth;
  V c0 = Isa::loadu(acc_row), c1 = Isa::loadu(acc_row + W);
  for (int64_t j = first; j < end; ++j) {
    const bfloat16* pair = v_strip + (j / 2) * 4 * W;
    const V a = Isa::set1(p_row[j]);
    c0 = Isa::fmadd(a, Isa::pair_element(Isa::load_pairs(pair), static_cast<int>(j & 1)), c0);
    c1 = Isa::fmadd(a, Isa::pair_element(Isa::load_pairs(pair + 2 * W), static_cast<int>(j & 1)), c1);
  }
  Isa::storeu(acc_row, c0);
  Isa::storeu(acc_row + W, c1);
}

// pv_tile_seen (tiles.hpp) for pair products: row r sums exactly its keys [first, end) = seen(r). The
// key pairs every row sees wholly go through one Rows-row pair tile (which applies alpha); each row's
// other keys, one at a time, in fp32 (p_fp32: the probabilities before rounding to bf16).
template <class Isa, int Rows, class Seen>
inline void pv_tile_pairs_seen(const bfloat16* p, const float* p_fp32, int64_t p_ld, const float* alpha,
                               const bfloat16* v_strip, Seen seen, float* acc, int64_t acc_ld) {
  const auto [seen_first, seen_end] = shared_seen<Rows>(seen);
  const int64_t shared_first = round_up(seen_first, 2);  // whole pairs only
  const int64_t shared_end = std::max(shared_first, seen_end & ~int64_t{1});
  pv_tile_pairs<Isa, Rows>(p + shared_first, p_ld, 2, alpha, v_strip + shared_first * 2 * Isa::kWidth,
                           (shared_end - shared_first) / 2, acc, acc_ld);
  add_unshared<Rows>(seen, shared_first, shared_end, [&](int r, int64_t from, int64_t to) {
    pv_keys_single<Isa>(p_fp32 + r * p_ld, v_strip, from, to, acc + r * acc_ld);
  });
}

// out[(i / 2) * 2 * cols + 2 * j + (i % 2)] = bf16(m[i][j]) for rows i < rows (even) and columns
// j < cols (a multiple of the vector width) of a row-major fp32 m: pairs of consecutive rows
// interleaved, so that pv_tile_pairs reads m^T with its reduction over m's rows.
template <class Isa>
inline void interleave_rows(const float* m, int64_t m_ld, int64_t rows, int64_t cols, bfloat16* out) {
  for (int64_t i = 0; i < rows; i += 2) {
    bfloat16* dst = out + i * cols;
    for (int64_t j = 0; j < cols; j += Isa::kWidth) {
      Isa::store_bf16_pairs(dst + 2 * j, Isa::loadu(m + i * m_ld + j), Isa::loadu(m + (i + 1) * m_ld + j));
    }
  }
}

}  // namespace
}  // namespace pflash::cpu
