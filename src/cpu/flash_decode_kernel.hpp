// FlashDecoding on the CPU, written once over an instruction-set policy `Isa` and included by each
// flash_decode_<isa>.cpp under its own target pragma (hence the anonymous namespace, as in tiles.hpp).
//
// A work item is (sequence b, KV head h_kv, split s): the G query heads of the group times the T
// query tokens form one query tile of G*T rows, so every key and value of the head is read from
// memory once for all of them. Per key block (up to kBlockKeys positions of the split's range):
//   scores   = q_tile x k_block^T        K read in place, in its own dtype, page run by page run
//   mask     positions a query token may not see (j > seq_len - T + t)
//   p        = online softmax step       (running row_max, row_sum; alpha rescales acc)
//   acc      = acc * alpha + p x v_block
// The split writes O = acc / row_sum and its LSE: straight to the output when there is one split,
// else to a partial buffer that merge_row combines exactly once every split is done.
//
// With bf16 pair products (Isa::kBf16Dot), a bf16 query against a bf16 cache computes the scores by
// vdpbf16ps along D from the unscaled query (qk_rows_tile_pairs); p x v stays fp32 FMA (its pairs
// would run along positions, two cache rows interleaved per pair). One token (T = 1) is bound by
// reading the cache either way; the pairs matter for several tokens, where the products are the cost.
#pragma once

#include <omp.h>

#include <algorithm>
#include <cstdint>
#include <numbers>
#include <type_traits>

#include "core/params.hpp"
#include "core/workspace.hpp"
#include "core/merge_row.hpp"
#include "cpu/tiles.hpp"
#include "cpu/tiles_bf16.hpp"
#include "pflash/dtype.hpp"

namespace pflash::cpu {
namespace {  // NOLINT(google-build-namespaces): one copy per instruction set, see tiles.hpp.

using detail::DecodeParams;

// Row access to q and o, whose dtype is a run-time value: they are G*T rows per item, against the
// thousands of cache rows the item streams, so a switch here costs nothing.
inline void load_row_scaled(const void* base, DType dtype, int64_t offset, int64_t n, float scale, float* dst) {
  if (dtype == DType::kBFloat16) {
    const bfloat16* src = static_cast<const bfloat16*>(base) + offset;
    for (int64_t d = 0; d < n; ++d) dst[d] = static_cast<float>(src[d]) * scale;
  } else {
    const float* src = static_cast<const float*>(base) + offset;
    for (int64_t d = 0; d < n; ++d) dst[d] = src[d] * scale;
  }
}

inline void store_row_scaled(const float* src, int64_t n, float scale, void* base, DType dtype, int64_t offset) {
  if (dtype == DType::kBFloat16) {
    bfloat16* dst = static_cast<bfloat16*>(base) + offset;
    for (int64_t d = 0; d < n; ++d) dst[d] = bfloat16(src[d] * scale);
  } else {
    float* dst = static_cast<float*>(base) + offset;
    for (int64_t d = 0; d < n; ++d) dst[d] = src[d] * scale;
  }
}

template <class Isa, class TC>  // TC: the cache's element type
class FlashDecode {
 public:
  static constexpr int W = Isa::kWidth;
  // The score tile of one key block is G*T rows x kBlockKeys: 128 keys make the online-softmax
  // bookkeeping (row max, alpha, rescaling acc) a few percent of the block's FMAs, and keep the
  // block's K and V (2 x 32 KiB at D = 128, bf16) in L2 for the p x v pass after the score pass.
  static constexpr int kBlockKeys = 128;
  // Register tiles of 4 rows (the G*T query rows) x 3 keys for the scores and x 3 vectors of
  // head_dim for p x v: 12 accumulators each, so 12 independent FMA chains; the score row leaves room
  // for the last tile's overhang.
  static constexpr int kRowTile = 4;
  static constexpr int64_t kScoresLd = kBlockKeys + 8;
  static constexpr bool kPairs = Isa::kBf16Dot && std::is_same_v<TC, bfloat16>;

  explicit FlashDecode(DecodeParams p)
      : p_(p),
        rows_(p.group_size() * p.query_tokens),
        acc_ld_(round_up(p.dim, W)),
        q_pair_ld_(round_up(p.dim, 2 * W)),
        pairs_(kPairs && p.dtype == DType::kBFloat16),
        scale_log2_(p.scale * std::numbers::log2e_v<float>) {}

  void run() {
    const int64_t splits = p_.num_splits;
    const int64_t items = p_.batch * p_.heads_kv * splits;
    const int threads = static_cast<int>(std::clamp<int64_t>(p_.num_threads, 1, items));
    const int64_t per_thread = scratch_floats();
    detail::Workspace<float> scratch(static_cast<std::size_t>(per_thread * threads));
    // Partial results of every split, [B * Hq * T][splits][D] and [B * Hq * T][splits].
    const int64_t out_rows = p_.batch * p_.heads_q * p_.query_tokens;
    detail::Workspace<float> o_parts(static_cast<std::size_t>(splits > 1 ? out_rows * parts() * p_.dim : 0));
    detail::Workspace<float> lse_parts(static_cast<std::size_t>(splits > 1 ? out_rows * parts() : 0));

#pragma omp parallel num_threads(threads)
    {
      const Scratch s = carve(scratch.data() + per_thread * omp_get_thread_num());
#pragma omp for schedule(dynamic, 1)
      for (int64_t item = 0; item < items; ++item) {
        const int64_t b = item / (p_.heads_kv * splits);
        const int64_t h_kv = item / splits % p_.heads_kv;
        const int64_t split = item % splits;
        decode_item(b, h_kv, split, s, o_parts.data(), lse_parts.data());
      }
      if (splits > 1) {
#pragma omp for schedule(static)
        for (int64_t row = 0; row < out_rows; ++row) merge_splits(row, o_parts.data(), lse_parts.data());
      }
    }
  }

 private:
  struct Scratch {
    const TC** next_k;  // [kBlockKeys] rows of the next key block, to prefetch
    const TC** next_v;
    float* q_tile;   // [rows][D], scaled by scale * log2(e)
    float* scores;   // [rows][kScoresLd]
    float* acc;      // [rows][acc_ld]
    float* row_max;  // [rows], log2 units
    float* row_sum;  // [rows]
    float* alpha;    // [rows]
    bfloat16* q_pairs;  // pair products: [rows][q_pair_ld], the query rows unscaled, zero-padded
  };

  static constexpr int64_t kPointerFloats = 2 * kBlockKeys * sizeof(void*) / sizeof(float);

  int64_t scratch_floats() const {
    const int64_t rows = round_up(rows_, 16);
    return kPointerFloats + round_up(rows * p_.dim, 16) + rows * kScoresLd + rows * acc_ld_ + 3 * rows +
           (pairs_ ? rows * q_pair_ld_ / 2 : 0);
  }

  Scratch carve(float* base) const {
    const int64_t rows = round_up(rows_, 16);
    Scratch s{};
    s.next_k = reinterpret_cast<const TC**>(base);
    s.next_v = s.next_k + kBlockKeys;
    s.q_tile = base + kPointerFloats;
    s.scores = s.q_tile + round_up(rows * p_.dim, 16);
    s.acc = s.scores + rows * kScoresLd;
    s.row_max = s.acc + rows * acc_ld_;
    s.row_sum = s.row_max + rows;
    s.alpha = s.row_sum + rows;
    s.q_pairs = reinterpret_cast<bfloat16*>(s.alpha + rows);
    return s;
  }

  // Rows are (head g of the group, token t), t fastest. Token t of a sequence of length L (of which
  // `after` positions lie past this cache's rows) sits at position L + after - T + t and sees the
  // positions of [0, L) the geometry gives it: causal, and a window or chunk.
  detail::Range visible(int64_t row, int64_t b, int64_t seq_len) const {
    const int64_t after = p_.positions_after != nullptr ? p_.positions_after[b] : 0;
    return p_.geometry.keys_at(seq_len + after - p_.query_tokens + row % p_.query_tokens, seq_len);
  }

  // Positions [begin, end) of split `split` of the positions [first, last) a sequence's tokens see:
  // equal ranges from a whole 64-position block, rounded to whole blocks so that ranges start on
  // page boundaries for pages of up to 64.
  void split_range(detail::Range seen, int64_t split, int64_t& begin, int64_t& end) const {
    if (seen.empty()) {
      begin = end = 0;
      return;
    }
    const int64_t start = seen.first / 64 * 64;
    const int64_t chunk = round_up(ceil_div(seen.end - start, p_.num_splits), 64);
    begin = std::min(seen.end, std::max(seen.first, start + split * chunk));
    end = std::min(seen.end, start + (split + 1) * chunk);
  }

  void decode_item(int64_t b, int64_t h_kv, int64_t split, const Scratch& s, float* o_parts, float* lse_parts) const {
    const detail::CacheParams& cache = p_.cache;
    const int64_t seq_len = cache.seq_lens[b];
    const int64_t dim = p_.dim;
    detail::Range seen{seq_len, 0};  // the positions any row sees: only those are read
    for (int64_t r = 0; r < rows_; ++r) {
      const detail::Range range = visible(r, b, seq_len);
      if (!range.empty()) seen = {std::min(seen.first, range.first), std::max(seen.end, range.end)};
    }
    int64_t range_begin = 0, range_end = 0;
    split_range(seen, split, range_begin, range_end);

    for (int64_t r = 0; r < rows_; ++r) {
      const int64_t h_q = h_kv * p_.group_size() + r / p_.query_tokens, t = r % p_.query_tokens;
      const int64_t q_offset = b * p_.q_strides.batch + h_q * p_.q_strides.head + t * p_.q_strides.row;
      if (pairs_) {
        const bfloat16* q_row = static_cast<const bfloat16*>(p_.q) + q_offset;
        for (int64_t d = 0; d < q_pair_ld_; ++d) s.q_pairs[r * q_pair_ld_ + d] = element_or_zero(q_row, d, dim);
      } else {
        load_row_scaled(p_.q, p_.dtype, q_offset, dim, scale_log2_, s.q_tile + r * dim);
      }
      s.row_max[r] = kNegInf;
      s.row_sum[r] = 0.0f;
    }
    std::fill(s.acc, s.acc + rows_ * acc_ld_, 0.0f);

    const TC* k_base = static_cast<const TC*>(cache.k);
    const TC* v_base = static_cast<const TC*>(cache.v);
    for (int64_t key_begin = range_begin; key_begin < range_end; key_begin += kBlockKeys) {
      const int64_t key_end = std::min<int64_t>(key_begin + kBlockKeys, range_end);
      const int64_t cols = key_end - key_begin;
      const int64_t next_cols = locate_rows(b, h_kv, key_end, std::min<int64_t>(key_end + kBlockKeys, range_end), s);

      // scores = q_tile x k_block^T, one page run at a time; a run's last tile may spill up to three
      // columns past it, which the next run or the mask below overwrites.
      for (int64_t pos = key_begin; pos < key_end;) {
        const int64_t run = cache.run_length(pos, key_end);
        const TC* k_run = k_base + cache.offset(cache.k_strides, b, h_kv, pos);
        for (int64_t c = 0; c < run; c += 3) {
          const TC* const k_rows[3] = {k_run + std::min(c + 0, run - 1) * cache.k_strides.row,
                                       k_run + std::min(c + 1, run - 1) * cache.k_strides.row,
                                       k_run + std::min(c + 2, run - 1) * cache.k_strides.row};
          float* scores = s.scores + (pos - key_begin) + c;
          // The hardware prefetcher alone does not keep a core's stream from DRAM busy (it stops at
          // page boundaries, and K and V are two streams per item): request the next block's K and V
          // rows while this block's scores compute, a few rows per tile so the requests never queue
          // up behind one another. (Issuing the V rows during p x v instead measured 20% slower.)
          for (int64_t i = pos - key_begin + c; i < std::min(pos - key_begin + c + 3, next_cols); ++i) {
            prefetch_row(s.next_k[i]);
            prefetch_row(s.next_v[i]);
          }
          for (int64_t r0 = 0; r0 < rows_; r0 += kRowTile) {
            with_tile_rows<kRowTile>(static_cast<int>(std::min<int64_t>(kRowTile, rows_ - r0)), [&]<int R>() {
              if constexpr (kPairs) {
                if (pairs_) {
                  qk_rows_tile_pairs<Isa, R>(s.q_pairs + r0 * q_pair_ld_, q_pair_ld_, k_rows, dim, scale_log2_,
                                             scores + r0 * kScoresLd, kScoresLd);
                  return;
                }
              }
              qk_rows_tile<Isa, R>(s.q_tile + r0 * dim, dim, k_rows, dim, scores + r0 * kScoresLd, kScoresLd);
            });
          }
        }
        pos += run;
      }

      // Mask what a row may not see (and the padding to a whole vector), then the softmax step.
      const int64_t cols_padded = round_up(cols, W);
      const detail::Range block{key_begin, key_end};
      for (int64_t r = 0; r < rows_; ++r) {
        float* row = s.scores + r * kScoresLd;
        const detail::Range range = visible(r, b, seq_len).intersect(block);
        const int64_t first = range.first - key_begin, end = range.end - key_begin;
        if (p_.soft_cap > 0.0f) soft_cap_row<Isa>(row, first, end, p_.soft_cap);
        std::fill(row, row + first, kNegInf);
        std::fill(row + std::max(first, end), row + cols_padded, kNegInf);
        online_softmax_row<Isa>(row, cols_padded, s.row_max[r], s.row_sum[r], s.alpha[r]);
      }

      // acc = acc * alpha + p x v_block, run by run; alpha is applied with the first run only. Each
      // row sums over the positions it may see (pv_tile_seen: a later query token's position adds
      // nothing to an earlier token's row, not 0 * v).
      bool first_run = true;
      for (int64_t pos = key_begin; pos < key_end;) {
        const int64_t run = cache.run_length(pos, key_end);
        const TC* v_run = v_base + cache.offset(cache.v_strides, b, h_kv, pos);
        const float* p_run = s.scores + (pos - key_begin);
        for (int64_t r0 = 0; r0 < rows_; r0 += kRowTile) {
          auto seen = [&](int r) {
            const detail::Range range = visible(r0 + r, b, seq_len).intersect({pos, pos + run});
            return std::pair<int64_t, int64_t>{range.first - pos, range.end - pos};
          };
          with_tile_rows<kRowTile>(static_cast<int>(std::min<int64_t>(kRowTile, rows_ - r0)), [&]<int R>() {
            pv_rows<R>(p_run + r0 * kScoresLd, first_run ? s.alpha + r0 : nullptr, v_run, seen, s.acc + r0 * acc_ld_);
          });
        }
        first_run = false;
        pos += run;
      }
    }

    // O = acc / row_sum (0 for a row that saw nothing here) and its LSE. Sinks join once: here with one
    // split, else in merge_splits.
    const int64_t splits = p_.num_splits;
    for (int64_t r = 0; r < rows_; ++r) {
      const int64_t h_q = h_kv * p_.group_size() + r / p_.query_tokens, t = r % p_.query_tokens;
      float row_max = s.row_max[r], row_sum = s.row_sum[r], alpha = 1.0f;
      if (splits == 1 && p_.sinks != nullptr) alpha = fold_sink(row_max, row_sum, p_.sinks[h_q] * std::numbers::log2e_v<float>);
      const float inv_sum = inverse_row_sum(row_sum) * alpha;
      const float lse = finish_lse(row_max, row_sum);
      if (splits == 1) {
        store_row_scaled(s.acc + r * acc_ld_, dim, inv_sum, p_.o, p_.o_dtype,
                         b * p_.o_strides.batch + h_q * p_.o_strides.head + t * p_.o_strides.row);
        if (p_.lse != nullptr) {
          p_.lse[b * p_.lse_strides.batch + h_q * p_.lse_strides.head + t * p_.lse_strides.row] = lse;
        }
      } else {
        const int64_t out_row = (b * p_.heads_q + h_q) * p_.query_tokens + t;
        store_row_scaled(s.acc + r * acc_ld_, dim, inv_sum, o_parts, DType::kFloat32, (out_row * parts() + split) * dim);
        lse_parts[out_row * parts() + split] = lse;
      }
    }
  }

  // Addresses of the K and V rows of positions [begin, end) (at most kBlockKeys) into s.next_k/v.
  int64_t locate_rows(int64_t b, int64_t h_kv, int64_t begin, int64_t end, const Scratch& s) const {
    const detail::CacheParams& cache = p_.cache;
    for (int64_t pos = begin; pos < end;) {
      const int64_t run = cache.run_length(pos, end);
      const TC* k_run = static_cast<const TC*>(cache.k) + cache.offset(cache.k_strides, b, h_kv, pos);
      const TC* v_run = static_cast<const TC*>(cache.v) + cache.offset(cache.v_strides, b, h_kv, pos);
      for (int64_t i = 0; i < run; ++i) {
        s.next_k[pos - begin + i] = k_run + i * cache.k_strides.row;
        s.next_v[pos - begin + i] = v_run + i * cache.v_strides.row;
      }
      pos += run;
    }
    return std::max<int64_t>(end - begin, 0);
  }

  void prefetch_row(const TC* row) const {
    const char* bytes = reinterpret_cast<const char*>(row);
    const int64_t row_bytes = p_.dim * static_cast<int64_t>(sizeof(TC));
    for (int64_t offset = 0; offset < row_bytes; offset += 64) __builtin_prefetch(bytes + offset, 0, 3);
    if (reinterpret_cast<std::uintptr_t>(bytes) % 64 != 0) {
      __builtin_prefetch(bytes + row_bytes - 1, 0, 3);  // the row's last line, when it straddles one more
    }
  }

  // acc[R][D] (= acc * alpha when alpha is given) += p[R][seen] x v_run[seen][D], row r over the
  // positions [first, end) = seen(r) of the run: strips of three vectors, then two, then one, then
  // single columns for a head_dim that is not a multiple of the width.
  template <int R, class Seen>
  void pv_rows(const float* p, const float* alpha, const TC* v, Seen seen, float* acc) const {
    const int64_t dim = p_.dim, v_ld = p_.cache.v_strides.row;
    int64_t d = 0;
    for (; d + 3 * W <= dim; d += 3 * W) pv_tile_seen<Isa, R, 3>(p, kScoresLd, 1, alpha, v + d, v_ld, seen, acc + d, acc_ld_);
    for (; d + 2 * W <= dim; d += 2 * W) pv_tile_seen<Isa, R, 2>(p, kScoresLd, 1, alpha, v + d, v_ld, seen, acc + d, acc_ld_);
    for (; d + W <= dim; d += W) pv_tile_seen<Isa, R, 1>(p, kScoresLd, 1, alpha, v + d, v_ld, seen, acc + d, acc_ld_);
    for (; d < dim; ++d) {
      for (int r = 0; r < R; ++r) {
        const auto [first, end] = seen(r);
        float sum = alpha != nullptr ? acc[r * acc_ld_ + d] * alpha[r] : acc[r * acc_ld_ + d];
        for (int64_t j = first; j < end; ++j) sum += p[r * kScoresLd + j] * to_float(v[j * v_ld + d]);
        acc[r * acc_ld_ + d] = sum;
      }
    }
  }

  // Partials per output row: one per split, and a sink's (O = 0, LSE = the sink) when there are sinks.
  int64_t parts() const { return p_.num_splits + (p_.sinks != nullptr ? 1 : 0); }

  void merge_splits(int64_t out_row, float* o_parts, float* lse_parts) const {
    const int64_t t = out_row % p_.query_tokens, h_q = out_row / p_.query_tokens % p_.heads_q,
                  b = out_row / (p_.query_tokens * p_.heads_q);
    const int64_t splits = parts(), dim = p_.dim;
    float* parts = o_parts + out_row * splits * dim;
    if (p_.sinks != nullptr) {
      std::fill(parts + (splits - 1) * dim, parts + splits * dim, 0.0f);
      lse_parts[out_row * splits + splits - 1] = p_.sinks[h_q];
    }
    float* lse = p_.lse != nullptr
                     ? p_.lse + b * p_.lse_strides.batch + h_q * p_.lse_strides.head + t * p_.lse_strides.row
                     : nullptr;
    const int64_t o_offset = b * p_.o_strides.batch + h_q * p_.o_strides.head + t * p_.o_strides.row;
    if (p_.o_dtype == DType::kBFloat16) {
      detail::merge_row(splits, dim, parts, dim, lse_parts + out_row * splits, 1, static_cast<bfloat16*>(p_.o) + o_offset, lse);
    } else {
      detail::merge_row(splits, dim, parts, dim, lse_parts + out_row * splits, 1, static_cast<float*>(p_.o) + o_offset, lse);
    }
  }

  DecodeParams p_;
  int64_t rows_;
  int64_t acc_ld_;
  int64_t q_pair_ld_;
  bool pairs_;  // pair products for this call: a bf16 query (the cache's dtype is TC)
  float scale_log2_;
};

template <class Isa>
void flash_decode(DecodeParams p) {
  if (p.cache.dtype == DType::kBFloat16) {
    FlashDecode<Isa, bfloat16>(p).run();
  } else {
    FlashDecode<Isa, float>(p).run();
  }
}

}  // namespace
}  // namespace pflash::cpu
