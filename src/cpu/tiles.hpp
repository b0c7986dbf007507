// The building blocks every CPU attention kernel is made of, written once over an instruction-set
// policy `Isa` (simd_avx2.hpp, simd_portable.hpp): register tiles for `scores = q x k^T` and
// `acc = acc * alpha + p x v`, the packed K/V panels they read, and the online-softmax step.
//
// Like the kernels that include it, everything here lives in an anonymous namespace: each
// <family>_<isa>.cpp includes it under its own `#pragma GCC target` and gets its own copy, so the
// linker can never substitute an AVX2 body for the portable one.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <utility>

#include "pflash/dtype.hpp"

namespace pflash::cpu {
namespace {  // NOLINT(google-build-namespaces): one copy per instruction set, see above.

using std::int64_t;

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

inline int64_t round_up(int64_t x, int64_t multiple) { return (x + multiple - 1) / multiple * multiple; }
inline int64_t ceil_div(int64_t x, int64_t y) { return (x + y - 1) / y; }

template <class T>
inline float to_float(T x) {
  return static_cast<float>(x);
}
template <class T>
inline T from_float(float x) {
  return T(x);
}

// Calls fn.template operator()<R>() with R == rows, for 1 <= rows <= MaxRows: the register tiles
// take their row count as a compile-time constant so their accumulators stay in registers.
template <int MaxRows, class Fn>
inline void with_tile_rows(int rows, Fn&& fn) {
  if constexpr (MaxRows >= 1) {
    if (rows == MaxRows) {
      fn.template operator()<MaxRows>();
    } else {
      with_tile_rows<MaxRows - 1>(rows, fn);
    }
  }
}

template <class Isa>
struct Layout {
  // A K panel holds kPanel consecutive keys; a V strip holds kPanel consecutive head_dim columns.
  // Two vectors wide, to match the register tiles.
  static constexpr int kPanel = 2 * Isa::kWidth;
};

// K of one head as panels [Nk_padded / kPanel][D][kPanel]: row d of a panel is column d of kPanel
// consecutive keys, so the score tile loads vectors of keys. Keys past Nk are zero.
template <class Isa, class T>
void pack_k_panel(const T* k, int64_t row_stride, int64_t seq_k, int64_t dim, int64_t panel, float* k_packed) {
  constexpr int kPanel = Layout<Isa>::kPanel;
  float* dst = k_packed + panel * dim * kPanel;
  for (int jj = 0; jj < kPanel; ++jj) {
    const int64_t key = panel * kPanel + jj;
    if (key < seq_k) {
      const T* row = k + key * row_stride;
      for (int64_t d = 0; d < dim; ++d) dst[d * kPanel + jj] = to_float(row[d]);
    } else {
      for (int64_t d = 0; d < dim; ++d) dst[d * kPanel + jj] = 0.0f;
    }
  }
}

// V of one head as column strips [D_padded / kPanel][Nk_padded][kPanel]: the p x v tile streams one
// strip contiguously. Padding (keys past Nk, columns past D) is zero, so it adds nothing.
template <class Isa, class T>
void pack_v_panel(const T* v, int64_t row_stride, int64_t seq_k, int64_t dim, int64_t seq_k_padded,
                  int64_t dim_padded, int64_t panel, float* v_packed) {
  constexpr int kPanel = Layout<Isa>::kPanel;
  for (int jj = 0; jj < kPanel; ++jj) {
    const int64_t key = panel * kPanel + jj;
    const T* row = v + key * row_stride;
    for (int64_t strip = 0; strip < dim_padded / kPanel; ++strip) {
      float* dst = v_packed + (strip * seq_k_padded + key) * kPanel;
      for (int c = 0; c < kPanel; ++c) {
        const int64_t d = strip * kPanel + c;
        dst[c] = (key < seq_k && d < dim) ? to_float(row[d]) : 0.0f;
      }
    }
  }
}

// scores[Rows][kPanel] = q[Rows][D] x k_panel^T, k_panel packed by pack_k_panel.
template <class Isa, int Rows>
inline void qk_tile(const float* q, int64_t q_ld, const float* k_panel, int64_t dim, float* scores, int64_t s_ld) {
  if constexpr (Rows > Isa::kRegisterRows) {  // a row sweep wider than a vector tile (AMX's 16 rows)
    constexpr int R0 = Isa::kRegisterRows;
    qk_tile<Isa, R0>(q, q_ld, k_panel, dim, scores, s_ld);
    qk_tile<Isa, Rows - R0>(q + R0 * q_ld, q_ld, k_panel, dim, scores + R0 * s_ld, s_ld);
    return;
  }
  using V = typename Isa::vec;
  constexpr int W = Isa::kWidth;
  V c0[Rows], c1[Rows];
#pragma GCC unroll 16
  for (int r = 0; r < Rows; ++r) c0[r] = c1[r] = Isa::zero();
  for (int64_t d = 0; d < dim; ++d) {
    const V b0 = Isa::load(k_panel + d * 2 * W);
    const V b1 = Isa::load(k_panel + d * 2 * W + W);
#pragma GCC unroll 16
    for (int r = 0; r < Rows; ++r) {
      const V a = Isa::set1(q[r * q_ld + d]);
      c0[r] = Isa::fmadd(a, b0, c0[r]);
      c1[r] = Isa::fmadd(a, b1, c1[r]);
    }
  }
#pragma GCC unroll 16
  for (int r = 0; r < Rows; ++r) {
    Isa::store(scores + r * s_ld, c0[r]);
    Isa::store(scores + r * s_ld + W, c1[r]);
  }
}

// scores[Rows][0..3) = q[Rows][D] x k[3 keys][D]^T with K read in place, row by row, in its own dtype
// (the decode's cache, which is read exactly once and so is not worth packing). Dot products run
// along D in vector lanes: Rows x 3 accumulators (12 independent FMA chains at 4 rows, enough to
// cover two FMA pipes' latency), finished by one horizontal reduction per row that also writes
// scores[r][3] (a zero): the caller lets the next tile or its mask overwrite it.
template <class Isa, int Rows, class T>
inline void qk_rows_tile(const float* q, int64_t q_ld, const T* const (&k)[3], int64_t dim, float* scores,
                         int64_t s_ld) {
  using V = typename Isa::vec;
  constexpr int W = Isa::kWidth;
  V c[Rows][3];
#pragma GCC unroll 16
  for (int r = 0; r < Rows; ++r) c[r][0] = c[r][1] = c[r][2] = Isa::zero();
  const int64_t dim_vec = dim / W * W;
  for (int64_t d = 0; d < dim_vec; d += W) {
#pragma GCC unroll 3
    for (int j = 0; j < 3; ++j) {
      const V kv = Isa::loadu(k[j] + d);
#pragma GCC unroll 16
      for (int r = 0; r < Rows; ++r) c[r][j] = Isa::fmadd(Isa::loadu(q + r * q_ld + d), kv, c[r][j]);
    }
  }
#pragma GCC unroll 16
  for (int r = 0; r < Rows; ++r) {
    float* out = scores + r * s_ld;
    Isa::store_sums4(out, c[r][0], c[r][1], c[r][2], Isa::zero());
    for (int64_t d = dim_vec; d < dim; ++d) {
      for (int j = 0; j < 3; ++j) out[j] += q[r * q_ld + d] * to_float(k[j][d]);
    }
  }
}

// acc[Rows][Vecs * W] = acc * alpha (per row; skipped when alpha is null) + p[Rows][cols] x v[cols][Vecs * W],
// with p(r, j) at p[r * p_rs + j * p_cs]: p_cs = 1 for p itself, p_rs = 1 for a transposed p (the
// backward's P^T dO and dS^T Q). v is any row-major run of rows in fp32 or bf16: a packed strip
// (v_ld = kPanel) or the caller's own rows (v_ld = their stride).
template <class Isa, int Rows, int Vecs, class T>
inline void pv_tile(const float* p, int64_t p_rs, int64_t p_cs, const float* alpha, const T* v, int64_t v_ld,
                    int64_t cols, float* acc, int64_t acc_ld) {
  if constexpr (Rows > Isa::kRegisterRows) {  // a row sweep wider than a vector tile (AMX's 16 rows)
    constexpr int R0 = Isa::kRegisterRows;
    pv_tile<Isa, R0, Vecs>(p, p_rs, p_cs, alpha, v, v_ld, cols, acc, acc_ld);
    pv_tile<Isa, Rows - R0, Vecs>(p + R0 * p_rs, p_rs, p_cs, alpha != nullptr ? alpha + R0 : nullptr, v, v_ld, cols,
                                  acc + R0 * acc_ld, acc_ld);
    return;
  }
  using V = typename Isa::vec;
  constexpr int W = Isa::kWidth;
  V c[Rows][Vecs];
#pragma GCC unroll 16
  for (int r = 0; r < Rows; ++r) {
#pragma GCC unroll 4
    for (int x = 0; x < Vecs; ++x) {
      c[r][x] = Isa::loadu(acc + r * acc_ld + x * W);
      if (alpha != nullptr) c[r][x] = Isa::mul(c[r][x], Isa::set1(alpha[r]));
    }
  }
  for (int64_t j = 0; j < cols; ++j) {
    V b[Vecs];
#pragma GCC unroll 4
    for (int x = 0; x < Vecs; ++x) b[x] = Isa::loadu(v + j * v_ld + x * W);
#pragma GCC unroll 16
    for (int r = 0; r < Rows; ++r) {
      const V a = Isa::set1(p[r * p_rs + j * p_cs]);
#pragma GCC unroll 4
      for (int x = 0; x < Vecs; ++x) c[r][x] = Isa::fmadd(a, b[x], c[r][x]);
    }
  }
#pragma GCC unroll 16
  for (int r = 0; r < Rows; ++r) {
#pragma GCC unroll 4
    for (int x = 0; x < Vecs; ++x) Isa::storeu(acc + r * acc_ld + x * W, c[r][x]);
  }
}

// The range of the inner index that all of rows 0..Rows-1 see ([first, end) = seen(r) each), empty
// (first == end) when they share none.
template <int Rows, class Seen>
inline std::pair<int64_t, int64_t> shared_seen(Seen seen) {
  int64_t shared_first = 0, shared_end = INT64_MAX;
  for (int r = 0; r < Rows; ++r) {
    const auto [first, end] = seen(r);
    shared_first = std::max(shared_first, first);
    shared_end = std::min(shared_end, end);
  }
  return {shared_first, std::max(shared_end, shared_first)};
}

// Calls add(r, from, to) for each row's part of seen(r) outside [shared_first, shared_end): the
// inner indices the shared tile did not take, before it and after it.
template <int Rows, class Seen, class Add>
inline void add_unshared(Seen seen, int64_t shared_first, int64_t shared_end, Add add) {
  for (int r = 0; r < Rows; ++r) {
    const auto [first, end] = seen(r);
    const int64_t before = std::min(shared_first, end), after = std::max(shared_end, first);
    if (first < before) add(r, first, before);
    if (after < end) add(r, after, end);
  }
}

// pv_tile where output row r sums only over its own range [first, end) = seen(r) of the inner index:
// a (row, column) pair outside it contributes exactly nothing, not 0 * v (NaN for a v of inf or NaN),
// which is how every kernel applies a mask to its products. The rows share the range all of them see
// (one Rows-row tile, which also applies alpha), and what each sees beyond it is added row by row, in
// the same order a single pass would take.
template <class Isa, int Rows, int Vecs, class T, class Seen>
inline void pv_tile_seen(const float* p, int64_t p_rs, int64_t p_cs, const float* alpha, const T* v, int64_t v_ld,
                         Seen seen, float* acc, int64_t acc_ld) {
  const auto [shared_first, shared_end] = shared_seen<Rows>(seen);
  pv_tile<Isa, Rows, Vecs>(p + shared_first * p_cs, p_rs, p_cs, alpha, v + shared_first * v_ld, v_ld,
                           shared_end - shared_first, acc, acc_ld);
  add_unshared<Rows>(seen, shared_first, shared_end, [&](int r, int64_t from, int64_t to) {
    pv_tile<Isa, 1, Vecs>(p + r * p_rs + from * p_cs, p_rs, p_cs, nullptr, v + from * v_ld, v_ld, to - from,
                          acc + r * acc_ld, acc_ld);
  });
}

// Turns one row of scores (log2 units, masked entries -inf; cols a multiple of the vector width)
// into probabilities relative to the updated running max, and updates the running max and sum.
// alpha = exp2(old max - new max) rescales the row's accumulator.
template <class Isa>
inline void online_softmax_row(float* row, int64_t cols, float& row_max, float& row_sum, float& alpha) {
  using V = typename Isa::vec;
  constexpr int W = Isa::kWidth;
  V block_max = Isa::set1(kNegInf), nan_lanes = Isa::zero();
  for (int64_t j = 0; j < cols; j += W) {
    const V x = Isa::loadu(row + j);
    block_max = Isa::max(block_max, x);
    nan_lanes = Isa::flag_nan(nan_lanes, x);
  }
  // A NaN score (a NaN in the query row or in a key it sees) makes the running max NaN, and with it
  // alpha, the sum, the accumulator, O and the LSE, as in FlashAttention and PyTorch; max() alone
  // would drop it and the row would read as one that sees nothing. std::max keeps a NaN row_max.
  const float new_max = Isa::any_flagged(nan_lanes) ? std::numeric_limits<float>::quiet_NaN()
                                                    : std::max(row_max, Isa::reduce_max(block_max));
  if (new_max == kNegInf) {  // nothing visible yet: probabilities 0, state unchanged
    std::fill(row, row + cols, 0.0f);
    alpha = 1.0f;
    return;
  }
  alpha = std::exp2(row_max - new_max);  // row_max == -inf gives 0: the accumulator is still empty
  const V shift = Isa::set1(new_max);
  V sum = Isa::zero();
  for (int64_t j = 0; j < cols; j += W) {
    const V prob = Isa::exp2(Isa::sub(Isa::loadu(row + j), shift));
    Isa::storeu(row + j, prob);
    sum = Isa::add(sum, prob);
  }
  row_sum = row_sum * alpha + Isa::reduce_add(sum);
  row_max = new_max;
}

// Logit soft-capping on scores in log2 units: x -> cap2 * tanh(x / cap2), cap2 = cap * log2(e), on
// row[from, to). tanh(y) = 1 - 2 / (e^(2y) + 1) with e^(2y) = 2^(x * 2 / cap): one exp2 and one
// division per score; a score past the exp2's range gives exactly +-cap2, NaN stays NaN.
template <class Isa>
inline void soft_cap_row(float* row, int64_t from, int64_t to, float cap) {
  using V = typename Isa::vec;
  constexpr int W = Isa::kWidth;
  const float cap2 = cap * 1.4426950408889634f, k = 2.0f / cap;
  const V vk = Isa::set1(k), vcap = Isa::set1(cap2), one = Isa::set1(1.0f), two = Isa::set1(2.0f);
  int64_t j = from;
  for (; j + W <= to; j += W) {
    const V e = Isa::exp2(Isa::mul(Isa::loadu(row + j), vk));
    Isa::storeu(row + j, Isa::mul(vcap, Isa::sub(one, Isa::div(two, Isa::add(e, one)))));
  }
  for (; j < to; ++j) row[j] = cap2 * std::tanh(row[j] / cap2);
}

// The slope of the soft cap at a capped score c (log2 units): 1 - tanh^2 = 1 - (c / cap2)^2.
inline float soft_cap_slope(float capped, float cap) {
  const float t = capped / (cap * 1.4426950408889634f);
  return 1.0f - t * t;
}

// Folds a sink (a logit in log2 units in the row's denominator, and nothing in its numerator) into a
// finished row's running max and sum; returns the factor its accumulator takes. A row that saw no
// key gets max = sink, sum = 1 (O = 0, LSE = the sink); a NaN row stays NaN.
inline float fold_sink(float& row_max, float& row_sum, float sink) {
  const float new_max = std::max(row_max, sink);  // NaN row_max stays NaN
  if (new_max == kNegInf) return 1.0f;
  const float alpha = std::exp2(row_max - new_max);
  row_sum = row_sum * alpha + std::exp2(sink - new_max);
  row_max = new_max;
  return alpha;
}

// The natural-log LSE of a finished row (row_max in log2 units); -inf for a row that saw no key,
// NaN for a row that saw a NaN.
inline float finish_lse(float row_max, float row_sum) {
  return row_sum == 0.0f ? kNegInf : (row_max + std::log2(row_sum)) * 0.6931471805599453f;
}

// 1 / row_sum of a finished row: 0 for a row that saw no key (O = 0, not 0/0); NaN stays NaN.
inline float inverse_row_sum(float row_sum) { return row_sum == 0.0f ? 0.0f : 1.0f / row_sum; }

}  // namespace
}  // namespace pflash::cpu
