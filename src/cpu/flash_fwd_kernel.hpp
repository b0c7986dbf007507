// The FlashAttention-2 forward pass on the CPU, written once over an instruction-set policy `Isa`
// (simd_avx2.hpp, simd_portable.hpp, ...). Each flash_fwd_<isa>.cpp includes this file under its own
// `#pragma GCC target`, so everything here lives in an anonymous namespace: every translation unit
// gets its own copy, and the linker can never substitute an AVX2 body for the portable one.
//
// Per (batch, kv head): K and V are packed once into fp32 panels shared by every query block of
// every query head in the GQA group. Per query block (one task for one thread):
//   q_tile      = Q rows * scale * log2(e)             (scores come out in log2 units)
//   for each key block:
//     scores    = q_tile x k_block^T                   (register-tiled: kTileRows x kPanel)
//     row_max'  = max(row_max, max_j scores)
//     p         = exp2(scores - row_max')
//     row_sum   = row_sum * exp2(row_max - row_max') + sum_j p
//     acc       = acc * exp2(row_max - row_max') + p x v_block
//   O = acc / row_sum,  LSE = (row_max + log2(row_sum)) * ln(2)
// The score tile, the query tile and the accumulator stay in L1/L2; the Nq x Nk scores never exist.
//
// With bf16 pair products (Isa::kBf16Dot, for bf16 inputs) the panels hold bf16 pairs (tiles_bf16.hpp):
// scores = (q x k^T) * scale * log2(e) from the unscaled bf16 query, and p x v takes p rounded to
// bf16, as FlashAttention-2 does on GPUs; the softmax statistics and the accumulator stay fp32.
// With AMX (Isa::kAmx) the same products of each 16 query rows run on tiles (tiles_amx.hpp).
#pragma once

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <numbers>
#include <type_traits>
#include <vector>

#include "core/params.hpp"
#include "core/workspace.hpp"
#include "cpu/tiles.hpp"
#include "cpu/tiles_bf16.hpp"
#include "pflash/dtype.hpp"

namespace pflash::cpu {
namespace {  // NOLINT(google-build-namespaces): one copy per instruction set, see above.

using detail::FwdParams;
using std::int64_t;

// One thread's tiles, carved from one workspace allocation.
struct Scratch {
  float* q_tile;   // [block_q][D]  (pair products: unused)
  float* scores;   // [block_q][block_k]  (scores, then probabilities in place)
  float* acc;      // [block_q][D_padded]
  float* row_max;  // [block_q], log2 units
  float* row_sum;  // [block_q]
  float* alpha;    // [block_q], exp2(old row_max - new row_max)
  bfloat16* q_pairs;  // pair products: [block_q][2 * D_pairs], the query rows in bf16, unscaled
  bfloat16* p_pairs;  // pair products: [block_q][block_k], the probabilities rounded to bf16
  detail::Range* row_keys;  // [block_q]: the keys each row sees
};

template <class Isa, class T>
class FlashForward {
 public:
  static constexpr int kPanel = Layout<Isa>::kPanel;
  static constexpr int kTileRows = Isa::kTileRows;
  static constexpr bool kPairs = Isa::kBf16Dot && std::is_same_v<T, bfloat16>;
  using Packed = std::conditional_t<kPairs, bfloat16, float>;  // the element type of the K/V panels

  explicit FlashForward(FwdParams p) : p_(p), ranges_(p.mask, p.batch, p.seq_q, p.seq_k) {
    // block_k: 128 keys keeps a K block and a V block (2 x 64 KiB at D = 128) in L2 beside the
    // query tile, and makes the per-block softmax bookkeeping a few percent of the matmul work.
    block_k_ = static_cast<int>(round_up(p_.block_k > 0 ? p_.block_k : 128, kPanel));
    block_k_ = static_cast<int>(std::min<int64_t>(block_k_, round_up(p_.seq_k, kPanel)));
    // block_q: 64 rows amortise each K/V block read from L2 over 64 x 2 x D FMAs per key; fewer
    // when that would leave threads without a task.
    int64_t block_q = p_.block_q > 0 ? p_.block_q : 64;
    if (p_.block_q == 0) {
      const int64_t heads = p_.batch * p_.heads_q;
      while (block_q > 2 * kTileRows && heads * ceil_div(p_.seq_q, block_q) < 4 * p_.num_threads) block_q /= 2;
    }
    block_q_ = static_cast<int>(std::min<int64_t>(block_q, p_.seq_q));
    seq_k_padded_ = round_up(p_.seq_k, kPanel);
    dim_padded_ = round_up(p_.dim, kPanel);
    pairs_ = dim_pairs(p_.dim);
    scale_log2_ = p_.scale * std::numbers::log2e_v<float>;
  }

  void run() {
    const int64_t num_q_blocks = ceil_div(p_.seq_q, block_q_);
    const int64_t tasks_per_head = p_.group_size() * num_q_blocks;
    const int64_t kv_heads = p_.batch * p_.heads_kv;
    // Enough query blocks per KV head to keep every thread busy: the threads share one packed
    // copy of each head in turn. Otherwise (short queries, e.g. decode-like shapes) each thread
    // packs and finishes whole heads on its own. Either way the workspace is at most one packed
    // head per thread: independent of batch and head count.
    if (tasks_per_head >= p_.num_threads || kv_heads == 1) {
      run_heads_shared(num_q_blocks);
    } else {
      run_head_per_thread(num_q_blocks);
    }
  }

 private:
  struct PackedHead {
    detail::Workspace<Packed> k, v;
  };

  PackedHead allocate_packed_head() const {
    const int64_t k_row = kPairs ? 2 * pairs_ : p_.dim;
    return {detail::Workspace<Packed>(static_cast<std::size_t>(seq_k_padded_ * k_row)),
            detail::Workspace<Packed>(static_cast<std::size_t>(seq_k_padded_ * dim_padded_))};
  }

  void pack_head(int64_t b, int64_t h_kv, int64_t panel, const PackedHead& packed) const {
    const T* k_head = static_cast<const T*>(p_.k) + b * p_.k_strides.batch + h_kv * p_.k_strides.head;
    const T* v_head = static_cast<const T*>(p_.v) + b * p_.v_strides.batch + h_kv * p_.v_strides.head;
    if constexpr (kPairs) {
      pack_k_pairs<Isa>(k_head, p_.k_strides.row, p_.seq_k, p_.dim, panel, packed.k.data());
      pack_v_pairs<Isa>(v_head, p_.v_strides.row, p_.seq_k, p_.dim, seq_k_padded_, dim_padded_, panel,
                        packed.v.data());
    } else {
      pack_k_panel<Isa>(k_head, p_.k_strides.row, p_.seq_k, p_.dim, panel, packed.k.data());
      pack_v_panel<Isa>(v_head, p_.v_strides.row, p_.seq_k, p_.dim, seq_k_padded_, dim_padded_, panel,
                        packed.v.data());
    }
  }

  // Task t of a KV head: query head (t / num_q_blocks) of its group, query block (t % num_q_blocks).
  void head_task(int64_t b, int64_t h_kv, int64_t task, int64_t num_q_blocks, const PackedHead& packed,
                 const Scratch& s) const {
    const int64_t h_q = h_kv * p_.group_size() + task / num_q_blocks;
    int64_t q_block = task % num_q_blocks;
    if (p_.mask.geometry.causal()) q_block = num_q_blocks - 1 - q_block;  // causal: the bottom blocks see most keys, hand them out first
    const int64_t q_begin = q_block * block_q_;
    const int64_t q_end = std::min<int64_t>(q_begin + block_q_, p_.seq_q);
    query_block(static_cast<const T*>(p_.q), packed.k.data(), packed.v.data(), b, h_q, q_begin, q_end, s);
  }

  void run_heads_shared(int64_t num_q_blocks) const {
    const int64_t num_panels = seq_k_padded_ / kPanel;
    const int64_t tasks = p_.group_size() * num_q_blocks;
    const int threads = static_cast<int>(std::min<int64_t>(p_.num_threads, std::max(tasks, num_panels)));
    const PackedHead packed = allocate_packed_head();
    const int64_t per_thread = scratch_floats();
    detail::Workspace<float> scratch(static_cast<std::size_t>(per_thread * threads));

#pragma omp parallel num_threads(threads)
    {
      const TileScope<Isa> tiles;
      const Scratch s = carve(scratch.data() + per_thread * omp_get_thread_num());
      for (int64_t b = 0; b < p_.batch; ++b) {
        for (int64_t h_kv = 0; h_kv < p_.heads_kv; ++h_kv) {
#pragma omp for schedule(static)
          for (int64_t panel = 0; panel < num_panels; ++panel) pack_head(b, h_kv, panel, packed);
#pragma omp for schedule(dynamic, 1)
          for (int64_t task = 0; task < tasks; ++task) head_task(b, h_kv, task, num_q_blocks, packed, s);
        }
      }
    }
  }

  void run_head_per_thread(int64_t num_q_blocks) const {
    const int64_t kv_heads = p_.batch * p_.heads_kv;
    const int64_t num_panels = seq_k_padded_ / kPanel;
    const int64_t tasks = p_.group_size() * num_q_blocks;
    const int threads = static_cast<int>(std::min<int64_t>(p_.num_threads, kv_heads));
    std::vector<PackedHead> packed;
    for (int t = 0; t < threads; ++t) packed.push_back(allocate_packed_head());
    const int64_t per_thread = scratch_floats();
    detail::Workspace<float> scratch(static_cast<std::size_t>(per_thread * threads));

#pragma omp parallel num_threads(threads)
    {
      const TileScope<Isa> tiles;
      const int thread = omp_get_thread_num();
      const Scratch s = carve(scratch.data() + per_thread * thread);
#pragma omp for schedule(dynamic, 1)
      for (int64_t head = 0; head < kv_heads; ++head) {
        const int64_t b = head / p_.heads_kv, h_kv = head % p_.heads_kv;
        for (int64_t panel = 0; panel < num_panels; ++panel) pack_head(b, h_kv, panel, packed[thread]);
        for (int64_t task = 0; task < tasks; ++task) head_task(b, h_kv, task, num_q_blocks, packed[thread], s);
      }
    }
  }

  // The bf16 tiles of pair products, in floats (two bf16 each).
  int64_t pair_floats() const {
    const int64_t bq = round_up(block_q_, 16);
    return kPairs ? round_up(bq * pairs_, 16) + bq * block_k_ / 2 : 0;
  }

  int64_t scratch_floats() const {
    const int64_t bq = round_up(block_q_, 16);
    return round_up(bq * p_.dim, 16) + bq * block_k_ + bq * dim_padded_ + 3 * bq + pair_floats() + range_floats();
  }

  // The per-row key ranges, in floats: last in a thread's scratch, 8-byte aligned; a multiple of 16
  // floats, so that the next thread's tiles stay 64-byte aligned.
  int64_t range_floats() const {
    return round_up(round_up(block_q_, 16) * static_cast<int64_t>(sizeof(detail::Range) / sizeof(float)) + 2, 16);
  }

  Scratch carve(float* base) const {
    const int64_t bq = round_up(block_q_, 16);
    Scratch s{};
    s.q_tile = base;
    s.scores = s.q_tile + round_up(bq * p_.dim, 16);
    s.acc = s.scores + bq * block_k_;
    s.row_max = s.acc + bq * dim_padded_;
    s.row_sum = s.row_max + bq;
    s.alpha = s.row_sum + bq;
    s.q_pairs = reinterpret_cast<bfloat16*>(s.alpha + bq);
    s.p_pairs = s.q_pairs + 2 * round_up(bq * pairs_, 16);
    float* ranges = s.alpha + bq + pair_floats();
    ranges += (reinterpret_cast<std::uintptr_t>(ranges) / sizeof(float)) % 2;  // 8-byte alignment for int64
    s.row_keys = reinterpret_cast<detail::Range*>(ranges);
    return s;
  }

  void query_block(const T* q, const Packed* k_packed, const Packed* v_packed, int64_t b, int64_t h_q, int64_t q_begin,
                   int64_t q_end, const Scratch& s) const {
    const int64_t dim = p_.dim;
    const int rows = static_cast<int>(q_end - q_begin);
    const int64_t s_ld = block_k_;
    const int64_t acc_ld = dim_padded_;

    const T* q_head = q + b * p_.q_strides.batch + h_q * p_.q_strides.head;
    const int64_t q_pair_ld = 2 * pairs_;
    // The keys each row sees, and the span of key blocks the query block visits.
    detail::Range* row_keys = s.row_keys;
    int64_t keys_first = p_.seq_k, keys_end = 0;
    for (int i = 0; i < rows; ++i) {
      row_keys[i] = ranges_.keys_of_row(b, q_begin + i);
      if (!row_keys[i].empty()) {
        keys_first = std::min(keys_first, row_keys[i].first);
        keys_end = std::max(keys_end, row_keys[i].end);
      }
    }
    for (int i = 0; i < rows; ++i) {
      const T* src = q_head + (q_begin + i) * p_.q_strides.row;
      if constexpr (kPairs) {
        bfloat16* dst = s.q_pairs + i * q_pair_ld;
        for (int64_t d = 0; d < q_pair_ld; ++d) dst[d] = element_or_zero(src, d, dim);
      } else {
        float* dst = s.q_tile + i * dim;
        for (int64_t d = 0; d < dim; ++d) dst[d] = to_float(src[d]) * scale_log2_;
      }
      s.row_max[i] = kNegInf;
      s.row_sum[i] = 0.0f;
    }
    std::fill(s.acc, s.acc + rows * acc_ld, 0.0f);

    // Only the key blocks some row sees are visited (from a panel boundary: the packed K and V).
    for (int64_t key_begin = keys_first / kPanel * kPanel; key_begin < keys_end; key_begin += block_k_) {
      const int64_t cols = round_up(std::min<int64_t>(block_k_, keys_end - key_begin), kPanel);

      for (int r0 = 0; r0 < rows; r0 += kTileRows) {
        with_tile_rows<kTileRows>(std::min(kTileRows, rows - r0), [&]<int R>() {
          for (int64_t c = 0; c < cols; c += kPanel) {
            if constexpr (kPairs) {
              const bfloat16* k_panel = k_packed + (key_begin + c) / kPanel * q_pair_ld * kPanel;
              qk_tile_pairs<Isa, R>(s.q_pairs + r0 * q_pair_ld, q_pair_ld, k_panel, pairs_, scale_log2_,
                                    s.scores + r0 * s_ld + c, s_ld);
            } else {
              const float* k_panel = k_packed + (key_begin + c) / kPanel * dim * kPanel;
              qk_tile<Isa, R>(s.q_tile + r0 * dim, dim, k_panel, dim, s.scores + r0 * s_ld + c, s_ld);
            }
          }
        });
      }

      // Row i of the block sees its keys [first, end) = keys_seen(i) of the block's columns; only blocks
      // an edge of some row's range crosses (or the end of the keys) need a mask.
      const detail::Range block{key_begin, key_begin + cols};
      bool all_visible = !ranges_.elementwise();
      for (int i = 0; i < rows && all_visible; ++i) all_visible = row_keys[i].first <= block.first && row_keys[i].end >= block.end;
      auto keys_seen = [&](int64_t i) -> std::pair<int64_t, int64_t> {
        if (all_visible) return {0, cols};
        const detail::Range r = row_keys[i].intersect(block);
        return {r.first - key_begin, r.end - key_begin};
      };
      for (int i = 0; i < rows; ++i) {
        float* row = s.scores + i * s_ld;
        const auto [first, end] = keys_seen(i);
        if (p_.soft_cap > 0.0f) soft_cap_row<Isa>(row, first, end, p_.soft_cap);
        if (!all_visible) {
          std::fill(row, row + first, kNegInf);
          std::fill(row + std::max(first, end), row + cols, kNegInf);
          if (ranges_.elementwise()) {
            for (int64_t j = first; j < end; ++j) {
              if (!ranges_.same_segment(b, q_begin + i, key_begin + j)) row[j] = kNegInf;
            }
          }
        }
        online_softmax_row<Isa>(row, cols, s.row_max[i], s.row_sum[i], s.alpha[i]);
        if constexpr (kPairs) {
          bfloat16* p_row = s.p_pairs + i * s_ld;
          for (int64_t j = 0; j < cols; j += 2 * Isa::kWidth) {
            Isa::store_bf16(p_row + j, Isa::loadu(row + j), Isa::loadu(row + j + Isa::kWidth));
          }
        }
      }

      // acc = acc * alpha + p x v, each row over the keys it sees (pv_tile_seen: a masked key adds
      // nothing, not 0 * v).
      for (int r0 = 0; r0 < rows; r0 += kTileRows) {
        auto seen = [&](int r) { return keys_seen(r0 + r); };
        with_tile_rows<kTileRows>(std::min(kTileRows, rows - r0), [&]<int R>() {
          for (int64_t strip = 0; strip < dim_padded_ / kPanel; ++strip) {
            const Packed* v_strip = v_packed + (strip * seq_k_padded_ + key_begin) * kPanel;
            if constexpr (kPairs) {
              pv_tile_pairs_seen<Isa, R>(s.p_pairs + r0 * s_ld, s.scores + r0 * s_ld, s_ld, s.alpha + r0, v_strip,
                                         seen, s.acc + r0 * acc_ld + strip * kPanel, acc_ld);
            } else {
              pv_tile_seen<Isa, R, 2>(s.scores + r0 * s_ld, s_ld, 1, s.alpha + r0, v_strip, kPanel, seen,
                                      s.acc + r0 * acc_ld + strip * kPanel, acc_ld);
            }
          }
        });
      }
    }

    T* o_head = static_cast<T*>(p_.o) + b * p_.o_strides.batch + h_q * p_.o_strides.head;
    const float sink = p_.sinks != nullptr ? p_.sinks[h_q] * std::numbers::log2e_v<float> : 0.0f;
    for (int i = 0; i < rows; ++i) {
      // A row that saw no key has row_sum == 0: O = 0 and LSE = -inf rather than 0/0.
      float row_max = s.row_max[i], row_sum = s.row_sum[i];
      const float alpha = p_.sinks != nullptr ? fold_sink(row_max, row_sum, sink) : 1.0f;
      const float inv_sum = inverse_row_sum(row_sum) * alpha;
      T* dst = o_head + (q_begin + i) * p_.o_strides.row;
      const float* acc = s.acc + i * acc_ld;
      for (int64_t d = 0; d < dim; ++d) dst[d] = from_float<T>(acc[d] * inv_sum);
      if (p_.lse != nullptr) {
        p_.lse[b * p_.lse_strides.batch + h_q * p_.lse_strides.head + (q_begin + i) * p_.lse_strides.row] =
            finish_lse(row_max, row_sum);
      }
    }
  }

  FwdParams p_;
  detail::RowRanges ranges_;
  int block_q_ = 0;
  int block_k_ = 0;
  int64_t seq_k_padded_ = 0;
  int64_t dim_padded_ = 0;
  int64_t pairs_ = 0;
  float scale_log2_ = 1.0f;
};

template <class Isa>
void flash_forward(FwdParams p) {
  if (p.dtype == DType::kBFloat16) {
    FlashForward<Isa, bfloat16>(p).run();
  } else {
    FlashForward<Isa, float>(p).run();
  }
}

}  // namespace
}  // namespace pflash::cpu
