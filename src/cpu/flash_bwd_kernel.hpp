// The FlashAttention-2 backward pass on the CPU, written once over an instruction-set policy `Isa`
// and included by each flash_bwd_<isa>.cpp under its own target pragma (hence the anonymous
// namespace, as in tiles.hpp).
//
// A task is one (batch, KV head): it owns that head's dK and dV, summed over the G query heads of
// its group in a fixed order, and each query head's dQ, so no two threads ever add into the same
// gradient and the result is the same bits for any thread count. Per task, K and V are packed once
// (K as panels for S = Q K^T and as rows for dQ = dS K, V as panels for dP = dO V^T); per query head,
// Q and dO are widened to fp32 rows and D_i = rowsum(dO_i * O_i) computed once. Then, key block by
// key block (FA2's loop order: the block's dK, dV accumulate in L2 while query blocks stream past):
//   s      = q_i x k_j^T                      (register tiles, as in the forward)
//   p      = exp2(s * scale * log2(e) - lse_i * log2(e)), 0 where masked
//   dv_j  += p^T x do_i
//   dp     = do_i x v_j^T
//   ds     = p * (dp - D_i)
//   dk_j  += ds^T x q_i
//   dq_i  += ds x k_j
// and dQ, dK are scaled by `scale` once at the end. Nothing of size Nq x Nk is ever held: the extra
// memory is O((Nq + Nk) * D) per thread.
//
// With bf16 pair products (Isa::kBf16Dot, bf16 inputs) the products take vdpbf16ps pairs
// (tiles_bf16.hpp): s = q x k^T and dp = do x v^T from the inputs' bf16 rows, dq += ds x k with ds
// rounded to bf16 (as FlashAttention-2 rounds P and dS on GPUs), and on tile pairs where every query
// row sees every key, dv += p^T x do and dk += ds^T x q, reducing over pairs of query rows. On the
// other tiles (the causal diagonal, ragged ends, rows that see nothing) dv and dk stay fp32 FMA: their
// mask varies along the query rows and across the keys, and a pair product could not keep a masked
// pair's 0 * inf (a dO or Q row holding inf) out of the keys that row does not see.
// With AMX (Isa::kAmx), s, dp and dq of each 16 query rows run on tiles (tiles_amx.hpp), and on the
// pair tiles whose query rows come in whole chunks of 32, so do dv and dk, transposed: a tile's left
// operand must be bf16 runs along the reduction (here the query rows), which P^T is not but dO^T
// (and Q^T) is, so dV^T += dO^T x P and dK^T += Q^T x dS take P and dS in the interleaved rows above
// (AMX's right-operand layout) and sum into transposed accumulators added in at the end.
#pragma once

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <numbers>
#include <type_traits>

#include "core/params.hpp"
#include "core/workspace.hpp"
#include "cpu/tiles.hpp"
#include "cpu/tiles_bf16.hpp"
#include "pflash/dtype.hpp"

namespace pflash::cpu {
namespace {  // NOLINT(google-build-namespaces): one copy per instruction set, see tiles.hpp.

using detail::BwdParams;
using detail::FwdParams;

template <class Isa, class T>
class FlashBackward {
 public:
  static constexpr int W = Isa::kWidth;
  static constexpr int kPanel = Layout<Isa>::kPanel;
  static constexpr int kTileRows = Isa::kTileRows;
  static constexpr bool kPairs = Isa::kBf16Dot && std::is_same_v<T, bfloat16>;
  // 64 x 64 tiles: the key block's dK, dV accumulators and packed K, V (4 x 32 KiB at D = 128) plus
  // the query block's Q, dO rows and the two score tiles stay in L2 (512 KiB) through the five
  // products of a tile pair.
  static constexpr int64_t kBlockQ = 64;
  static constexpr int64_t kBlockK = 64;

  explicit FlashBackward(BwdParams p)
      : p_(p),
        f_(p.fwd),
        ranges_(f_.mask, f_.batch, f_.seq_q, f_.seq_k),
        dim_padded_(round_up(f_.dim, kPanel)),
        seq_k_padded_(round_up(f_.seq_k, kPanel)),
        pair_ld_(2 * dim_pairs(f_.dim)),
        scale_log2_(f_.scale * std::numbers::log2e_v<float>) {}

  void run() const {
    const int64_t tasks = f_.batch * f_.heads_kv;
    const int threads = static_cast<int>(std::clamp<int64_t>(f_.num_threads, 1, tasks));
    const int64_t per_thread = workspace_floats(), pairs_per_thread = pair_workspace();
    detail::Workspace<float> workspace(static_cast<std::size_t>(per_thread * threads));
    detail::Workspace<bfloat16> pair_workspace(static_cast<std::size_t>(pairs_per_thread * threads));
    // d sink of each (batch, query head), summed over the batch in a fixed order below.
    detail::Workspace<float> sink_parts(static_cast<std::size_t>(p_.dsinks != nullptr ? f_.batch * f_.heads_q : 0));
#pragma omp parallel num_threads(threads)
    {
      const TileScope<Isa> tiles;
      Buffers buf = carve(workspace.data() + per_thread * omp_get_thread_num());
      if constexpr (kPairs) carve_pairs(pair_workspace.data() + pairs_per_thread * omp_get_thread_num(), buf);
#pragma omp for schedule(dynamic, 1)
      for (int64_t task = 0; task < tasks; ++task) kv_head(task / f_.heads_kv, task % f_.heads_kv, buf, sink_parts.data());
    }
    if (p_.dsinks != nullptr) {
      for (int64_t h = 0; h < f_.heads_q; ++h) {
        float sum = 0.0f;
        for (int64_t b = 0; b < f_.batch; ++b) sum += sink_parts.data()[b * f_.heads_q + h];
        p_.dsinks[h] = -sum;
      }
    }
  }

 private:
  struct Buffers {
    float* k_panels;  // [Nk_padded / kPanel][D][kPanel]
    float* v_panels;  // [Nk_padded / kPanel][D][kPanel]
    float* k_rows;    // [Nk_padded][D_padded]
    float* dk_acc;    // [Nk_padded][D_padded]
    float* dv_acc;    // [Nk_padded][D_padded]
    float* q_rows;    // [Nq][D_padded], one query head
    float* do_rows;   // [Nq][D_padded]
    float* dq_acc;    // [Nq][D_padded]
    float* lse_log2;  // [Nq]
    float* delta;     // [Nq], D_i = rowsum(dO_i * O_i)
    float* p;         // [kBlockQ][kBlockK] probabilities of one tile pair
    float* dp;        // [kBlockQ][kBlockK] dP, then dS in place
    // Pair products only (fp32 k_panels, v_panels and k_rows are then unused):
    bfloat16* k_pairs;   // [Nk_padded / kPanel][D_pairs][kPanel][2], for s
    bfloat16* v_pairs;   // the same of V, for dp
    bfloat16* k_strips;  // [D_padded / kPanel][Nk_padded / 2][kPanel][2], for dq
    bfloat16* q_pairs;   // [Nq][2 * D_pairs], one query head in bf16
    bfloat16* do_pairs;  // [Nq][2 * D_pairs]
    bfloat16* ds_pairs;  // [kBlockQ][kBlockK] dS rounded to bf16
    bfloat16* q_strips;   // [D_padded / kPanel][Nq_padded / 2][kPanel][2]: Q by pairs of rows, for dk
    bfloat16* do_strips;  // the same of dO, for dv
    bfloat16* p_by_rows;  // [kBlockQ / 2][kBlockK][2]: P's rows interleaved in pairs (interleave_rows)
    bfloat16* ds_by_rows; // the same of dS
    // AMX only: Q^T and dO^T of one query head, [D_padded][Nq rounded to 32] bf16, and dK^T, dV^T
    // [D_padded][Nk_padded] fp32.
    bfloat16* q_t;
    bfloat16* do_t;
    float* dk_t;
    float* dv_t;
  };

  // The transposed copies AMX's dV and dK take (none without AMX).
  int64_t q_t_ld() const { return round_up(f_.seq_q, 2 * kAmxPairs); }
  int64_t transposed_pairs() const { return Isa::kAmx && kPairs ? 2 * dim_padded_ * q_t_ld() : 0; }
  int64_t transposed_floats() const { return Isa::kAmx && kPairs ? 2 * dim_padded_ * seq_k_padded_ : 0; }

  int64_t seq_q_padded() const { return round_up(f_.seq_q, kPanel); }

  int64_t pair_workspace() const {
    if constexpr (!kPairs) return 0;
    const int64_t nq = round_up(f_.seq_q, 16);
    return 2 * seq_k_padded_ * pair_ld_ + seq_k_padded_ * dim_padded_ + 2 * round_up(nq * pair_ld_, 32) +
           3 * kBlockQ * kBlockK + 2 * seq_q_padded() * dim_padded_ + transposed_pairs();
  }

  void carve_pairs(bfloat16* base, Buffers& b) const {
    const int64_t nq = round_up(f_.seq_q, 16);
    b.k_pairs = base;
    b.v_pairs = b.k_pairs + seq_k_padded_ * pair_ld_;
    b.k_strips = b.v_pairs + seq_k_padded_ * pair_ld_;
    b.q_pairs = b.k_strips + seq_k_padded_ * dim_padded_;
    b.do_pairs = b.q_pairs + round_up(nq * pair_ld_, 32);
    b.ds_pairs = b.do_pairs + round_up(nq * pair_ld_, 32);
    b.q_strips = b.ds_pairs + kBlockQ * kBlockK;
    b.do_strips = b.q_strips + seq_q_padded() * dim_padded_;
    b.p_by_rows = b.do_strips + seq_q_padded() * dim_padded_;
    b.ds_by_rows = b.p_by_rows + kBlockQ * kBlockK;
    b.q_t = b.ds_by_rows + kBlockQ * kBlockK;
    b.do_t = b.q_t + transposed_pairs() / 2;
  }

  // The fp32 copies of K and V (none with pair products, which use the bf16 ones instead).
  int64_t kv_panel_floats() const { return kPairs ? 0 : seq_k_padded_ * f_.dim; }
  int64_t k_row_floats() const { return kPairs ? 0 : seq_k_padded_ * dim_padded_; }

  int64_t workspace_floats() const {
    const int64_t nq = round_up(f_.seq_q, 16);
    return 2 * kv_panel_floats() + k_row_floats() + 2 * seq_k_padded_ * dim_padded_ + 3 * nq * dim_padded_ + 2 * nq +
           2 * kBlockQ * kBlockK + transposed_floats();
  }

  Buffers carve(float* base) const {
    const int64_t nq = round_up(f_.seq_q, 16);
    Buffers b{};
    b.k_panels = base;
    b.v_panels = b.k_panels + kv_panel_floats();
    b.k_rows = b.v_panels + kv_panel_floats();
    b.dk_acc = b.k_rows + k_row_floats();
    b.dv_acc = b.dk_acc + seq_k_padded_ * dim_padded_;
    b.q_rows = b.dv_acc + seq_k_padded_ * dim_padded_;
    b.do_rows = b.q_rows + nq * dim_padded_;
    b.dq_acc = b.do_rows + nq * dim_padded_;
    b.lse_log2 = b.dq_acc + nq * dim_padded_;
    b.delta = b.lse_log2 + nq;
    b.p = b.delta + nq;
    b.dp = b.p + kBlockQ * kBlockK;
    b.dk_t = b.dp + kBlockQ * kBlockK;
    b.dv_t = b.dk_t + transposed_floats() / 2;
    return b;
  }

  // Row `row` of head (b, h) of a [B, H, N, D] tensor widened to fp32, zero-padded to D_padded.
  void widen_row(const void* base, const detail::HeadStrides& st, int64_t b, int64_t h, int64_t row, float* dst) const {
    const T* src = static_cast<const T*>(base) + b * st.batch + h * st.head + row * st.row;
    for (int64_t d = 0; d < f_.dim; ++d) dst[d] = to_float(src[d]);
    std::fill(dst + f_.dim, dst + dim_padded_, 0.0f);
  }

  void kv_head(int64_t b, int64_t h_kv, const Buffers& buf, float* sink_parts) const {
    const T* k_head = static_cast<const T*>(f_.k) + b * f_.k_strides.batch + h_kv * f_.k_strides.head;
    const T* v_head = static_cast<const T*>(f_.v) + b * f_.v_strides.batch + h_kv * f_.v_strides.head;
    if constexpr (kPairs) {
      for (int64_t panel = 0; panel < seq_k_padded_ / kPanel; ++panel) {
        pack_k_pairs<Isa>(k_head, f_.k_strides.row, f_.seq_k, f_.dim, panel, buf.k_pairs);
        pack_k_pairs<Isa>(v_head, f_.v_strides.row, f_.seq_k, f_.dim, panel, buf.v_pairs);
        pack_v_pairs<Isa>(k_head, f_.k_strides.row, f_.seq_k, f_.dim, seq_k_padded_, dim_padded_, panel,
                          buf.k_strips);
      }
    } else {
      for (int64_t panel = 0; panel < seq_k_padded_ / kPanel; ++panel) {
        pack_k_panel<Isa>(k_head, f_.k_strides.row, f_.seq_k, f_.dim, panel, buf.k_panels);
        pack_k_panel<Isa>(v_head, f_.v_strides.row, f_.seq_k, f_.dim, panel, buf.v_panels);
      }
      for (int64_t j = 0; j < seq_k_padded_; ++j) {
        if (j < f_.seq_k) {
          widen_row(f_.k, f_.k_strides, b, h_kv, j, buf.k_rows + j * dim_padded_);
        } else {
          std::fill(buf.k_rows + j * dim_padded_, buf.k_rows + (j + 1) * dim_padded_, 0.0f);
        }
      }
    }
    std::fill(buf.dk_acc, buf.dk_acc + seq_k_padded_ * dim_padded_, 0.0f);
    std::fill(buf.dv_acc, buf.dv_acc + seq_k_padded_ * dim_padded_, 0.0f);
    std::fill(buf.dk_t, buf.dk_t + transposed_floats(), 0.0f);  // and dv_t, after it

    for (int64_t g = 0; g < f_.group_size(); ++g) query_head(b, h_kv * f_.group_size() + g, buf, sink_parts);

    for (int64_t j = 0; j < f_.seq_k; ++j) {
      T* dk = static_cast<T*>(p_.dk) + b * p_.dk_strides.batch + h_kv * p_.dk_strides.head + j * p_.dk_strides.row;
      T* dv = static_cast<T*>(p_.dv) + b * p_.dv_strides.batch + h_kv * p_.dv_strides.head + j * p_.dv_strides.row;
      const float* dk_acc = buf.dk_acc + j * dim_padded_;
      const float* dv_acc = buf.dv_acc + j * dim_padded_;
      if (transposed_floats() > 0) {
        for (int64_t d = 0; d < f_.dim; ++d) {
          dk[d] = from_float<T>((dk_acc[d] + buf.dk_t[d * seq_k_padded_ + j]) * f_.scale);
          dv[d] = from_float<T>(dv_acc[d] + buf.dv_t[d * seq_k_padded_ + j]);
        }
        continue;
      }
      for (int64_t d = 0; d < f_.dim; ++d) {
        dk[d] = from_float<T>(dk_acc[d] * f_.scale);
        dv[d] = from_float<T>(dv_acc[d]);
      }
    }
  }

  void query_head(int64_t b, int64_t h_q, const Buffers& buf, float* sink_parts) const {
    for (int64_t i = 0; i < f_.seq_q; ++i) {
      float* q_row = buf.q_rows + i * dim_padded_;
      float* do_row = buf.do_rows + i * dim_padded_;
      widen_row(f_.q, f_.q_strides, b, h_q, i, q_row);
      widen_row(p_.dout, p_.dout_strides, b, h_q, i, do_row);
      if constexpr (kPairs) {
        // Row i of the bf16 copies (for s and dp); the strips by pairs of rows are packed below.
        const T* q = static_cast<const T*>(f_.q) + b * f_.q_strides.batch + h_q * f_.q_strides.head + i * f_.q_strides.row;
        const T* dout = static_cast<const T*>(p_.dout) + b * p_.dout_strides.batch + h_q * p_.dout_strides.head +
                        i * p_.dout_strides.row;
        for (int64_t d = 0; d < pair_ld_; ++d) {
          buf.q_pairs[i * pair_ld_ + d] = element_or_zero(q, d, f_.dim);
          buf.do_pairs[i * pair_ld_ + d] = element_or_zero(dout, d, f_.dim);
        }
      }
      const T* o = static_cast<const T*>(p_.o) + b * p_.o_strides.batch + h_q * p_.o_strides.head + i * p_.o_strides.row;
      float delta = 0.0f;
      for (int64_t d = 0; d < f_.dim; ++d) delta += do_row[d] * to_float(o[d]);
      buf.delta[i] = delta;
      buf.lse_log2[i] =
          p_.lse[b * p_.lse_strides.batch + h_q * p_.lse_strides.head + i * p_.lse_strides.row] * std::numbers::log2e_v<float>;
    }
    if (p_.dsinks != nullptr) {
      // d sink = -sum_i exp(sink - LSE_i) * D_i: the sink's share of each row's denominator times D_i.
      const float sink = f_.sinks[h_q] * std::numbers::log2e_v<float>;
      float sum = 0.0f;
      for (int64_t i = 0; i < f_.seq_q; ++i) sum += std::exp2(sink - buf.lse_log2[i]) * buf.delta[i];
      sink_parts[b * f_.heads_q + h_q] = sum;
    }
    std::fill(buf.dq_acc, buf.dq_acc + f_.seq_q * dim_padded_, 0.0f);
    if constexpr (kPairs) {
      const T* q_head = static_cast<const T*>(f_.q) + b * f_.q_strides.batch + h_q * f_.q_strides.head;
      const T* do_head = static_cast<const T*>(p_.dout) + b * p_.dout_strides.batch + h_q * p_.dout_strides.head;
      for (int64_t panel = 0; panel < seq_q_padded() / kPanel; ++panel) {
        pack_v_pairs<Isa>(q_head, f_.q_strides.row, f_.seq_q, f_.dim, seq_q_padded(), dim_padded_, panel, buf.q_strips);
        pack_v_pairs<Isa>(do_head, p_.dout_strides.row, f_.seq_q, f_.dim, seq_q_padded(), dim_padded_, panel,
                          buf.do_strips);
      }
      if (transposed_pairs() > 0) {
        const int64_t ld = q_t_ld();
        for (int64_t d = 0; d < dim_padded_; ++d) {
          for (int64_t i = 0; i < ld; ++i) {
            const bool inside = d < f_.dim && i < f_.seq_q;
            buf.q_t[d * ld + i] = inside ? q_head[i * f_.q_strides.row + d] : bfloat16();
            buf.do_t[d * ld + i] = inside ? do_head[i * p_.dout_strides.row + d] : bfloat16();
          }
        }
      }
    }

    for (int64_t key_begin = 0; key_begin < f_.seq_k; key_begin += kBlockK) {
      const int64_t key_end = std::min(key_begin + kBlockK, f_.seq_k);
      // Only the query blocks holding a row that sees a key of this block.
      int64_t rows_first = f_.seq_q, rows_end = 0;
      for (int64_t j = key_begin; j < key_end; ++j) {
        const detail::Range rows = ranges_.rows_of_key(b, j);
        if (!rows.empty()) {
          rows_first = std::min(rows_first, rows.first);
          rows_end = std::max(rows_end, rows.end);
        }
      }
      for (int64_t q_begin = rows_first / kBlockQ * kBlockQ; q_begin < rows_end; q_begin += kBlockQ) {
        tile_pair(b, q_begin, std::min(q_begin + kBlockQ, f_.seq_q), key_begin, key_end, buf);
      }
    }

    for (int64_t i = 0; i < f_.seq_q; ++i) {
      T* dq = static_cast<T*>(p_.dq) + b * p_.dq_strides.batch + h_q * p_.dq_strides.head + i * p_.dq_strides.row;
      const float* acc = buf.dq_acc + i * dim_padded_;
      for (int64_t d = 0; d < f_.dim; ++d) dq[d] = from_float<T>(acc[d] * f_.scale);
    }
  }

  // The five products of one (query block, key block) pair.
  void tile_pair(int64_t b, int64_t q_begin, int64_t q_end, int64_t key_begin, int64_t key_end, const Buffers& buf) const {
    const int rows = static_cast<int>(q_end - q_begin);
    const int64_t keys = key_end - key_begin;
    const int64_t cols = round_up(keys, kPanel);
    const int64_t dim = f_.dim, ld = dim_padded_;
    constexpr int64_t s_ld = kBlockK;
    const float* q_rows = buf.q_rows + q_begin * ld;
    const float* do_rows = buf.do_rows + q_begin * ld;

    // s = q x k^T and dp = do x v^T, both against 16-key panels.
    for (int r0 = 0; r0 < rows; r0 += kTileRows) {
      with_tile_rows<kTileRows>(std::min(kTileRows, rows - r0), [&]<int R>() {
        for (int64_t c = 0; c < cols; c += kPanel) {
          if constexpr (kPairs) {
            const int64_t panel_offset = (key_begin + c) / kPanel * pair_ld_ * kPanel;
            const bfloat16* q_pairs = buf.q_pairs + (q_begin + r0) * pair_ld_;
            const bfloat16* do_pairs = buf.do_pairs + (q_begin + r0) * pair_ld_;
            qk_tile_pairs<Isa, R>(q_pairs, pair_ld_, buf.k_pairs + panel_offset, pair_ld_ / 2, 1.0f,
                                  buf.p + r0 * s_ld + c, s_ld);
            qk_tile_pairs<Isa, R>(do_pairs, pair_ld_, buf.v_pairs + panel_offset, pair_ld_ / 2, 1.0f,
                                  buf.dp + r0 * s_ld + c, s_ld);
          } else {
            const int64_t panel_offset = (key_begin + c) / kPanel * dim * kPanel;
            qk_tile<Isa, R>(q_rows + r0 * ld, ld, buf.k_panels + panel_offset, dim, buf.p + r0 * s_ld + c, s_ld);
            qk_tile<Isa, R>(do_rows + r0 * ld, ld, buf.v_panels + panel_offset, dim, buf.dp + r0 * s_ld + c, s_ld);
          }
        }
      });
    }

    // Row r of the block sees its keys keys_seen(r) = [first, end) of the block; key j is seen by its
    // rows seen_by_rows(j). A row that saw no key in the forward (LSE = -inf) has no gradient.
    const detail::Range block_keys{key_begin, key_end}, block_rows{q_begin, q_end};
    auto keys_seen = [&](int64_t r) -> std::pair<int64_t, int64_t> {
      if (buf.lse_log2[q_begin + r] == kNegInf) return {0, 0};
      const detail::Range range = ranges_.keys_of_row(b, q_begin + r).intersect(block_keys);
      return {range.first - key_begin, range.end - key_begin};
    };
    auto seen_by_rows = [&](int64_t j) -> std::pair<int64_t, int64_t> {
      const detail::Range range = ranges_.rows_of_key(b, key_begin + j).intersect(block_rows);
      return {range.first - q_begin, range.end - q_begin};
    };

    // p = exp2(s * scale * log2(e) - lse * log2(e)) where visible, else 0; ds = p * (dp - D_i).
    using V = typename Isa::vec;
    const V scale = Isa::set1(scale_log2_);
    for (int r = 0; r < rows; ++r) {
      const int64_t i = q_begin + r;
      float* p_row = buf.p + r * s_ld;
      float* ds_row = buf.dp + r * s_ld;
      const float lse = buf.lse_log2[i];
      const auto [first, end] = keys_seen(r);
      const V shift = Isa::set1(lse), delta = Isa::set1(buf.delta[i]);
      std::fill(p_row, p_row + first, 0.0f);
      std::fill(ds_row, ds_row + first, 0.0f);
      int64_t j = first;
      if (f_.soft_cap > 0.0f) {
        // p = exp2(cap(s) - lse) and dS = p * (dP - D) * cap'(s), the scores capped in log2 units.
        for (int64_t c = first; c < end; ++c) p_row[c] *= scale_log2_;
        soft_cap_row<Isa>(p_row, first, end, f_.soft_cap);
        const V inv_cap2 = Isa::set1(1.0f / (f_.soft_cap * std::numbers::log2e_v<float>)), one = Isa::set1(1.0f);
        for (; j + W <= end; j += W) {
          const V capped = Isa::loadu(p_row + j), t = Isa::mul(capped, inv_cap2);
          const V prob = Isa::exp2(Isa::sub(capped, shift));
          Isa::storeu(p_row + j, prob);
          Isa::storeu(ds_row + j, Isa::mul(Isa::mul(prob, Isa::sub(Isa::loadu(ds_row + j), delta)),
                                           Isa::sub(one, Isa::mul(t, t))));
        }
        for (; j < end; ++j) {
          const float slope = soft_cap_slope(p_row[j], f_.soft_cap);
          p_row[j] = std::exp2(p_row[j] - lse);
          ds_row[j] = p_row[j] * (ds_row[j] - buf.delta[i]) * slope;
        }
      } else {
        for (; j + W <= end; j += W) {
          const V prob = Isa::exp2(Isa::sub(Isa::mul(Isa::loadu(p_row + j), scale), shift));
          Isa::storeu(p_row + j, prob);
          Isa::storeu(ds_row + j, Isa::mul(prob, Isa::sub(Isa::loadu(ds_row + j), delta)));
        }
        for (; j < end; ++j) {
          p_row[j] = std::exp2(p_row[j] * scale_log2_ - lse);
          ds_row[j] = p_row[j] * (ds_row[j] - buf.delta[i]);
        }
      }
      if (ranges_.elementwise()) {  // ids that recur apart: the other segments' keys inside the range
        for (int64_t c = first; c < end; ++c) {
          if (!ranges_.same_segment(b, i, key_begin + c)) p_row[c] = ds_row[c] = 0.0f;
        }
      }
      j = std::max(first, end);
      std::fill(p_row + j, p_row + cols, 0.0f);
      std::fill(ds_row + j, ds_row + cols, 0.0f);
      if constexpr (kPairs) {
        for (int64_t c = 0; c < cols; c += 2 * W) {
          Isa::store_bf16(buf.ds_pairs + r * s_ld + c, Isa::loadu(ds_row + c), Isa::loadu(ds_row + c + W));
        }
      }
    }

    // The three products sum only over the (query, key) pairs that see each other (pv_tile_seen): a
    // masked pair adds nothing, not 0 * x, where x (a key, a value, a query or dO row) may be inf or NaN.
    // dv += p^T x do and dk += ds^T x q: output rows are keys, the inner sum runs over query rows.
    float* dv_acc = buf.dv_acc + key_begin * ld;
    float* dk_acc = buf.dk_acc + key_begin * ld;
    // Pair products over pairs of query rows where every row of the block sees every key of it.
    bool pairs_tile = kPairs && rows % 2 == 0 && !ranges_.elementwise();
    for (int r = 0; r < rows && pairs_tile; ++r) pairs_tile = keys_seen(r) == std::pair<int64_t, int64_t>{0, keys};
    bool pairs_tile_done = false;  // by AMX tiles
    if constexpr (kPairs) {
      if (pairs_tile) {
        interleave_rows<Isa>(buf.p, s_ld, rows, cols, buf.p_by_rows);
        interleave_rows<Isa>(buf.dp, s_ld, rows, cols, buf.ds_by_rows);
        if constexpr (Isa::kAmx) {
          if (rows % (2 * kAmxPairs) == 0) {
            // dV^T[d][j] += dO^T[d][i] x P[i][j] and dK^T += Q^T x dS, 16 head_dim rows x 32 keys a tile
            // product, over the block's query rows in chunks of 32.
            const int64_t ld = q_t_ld();
            for (int64_t d0 = 0; d0 < dim_padded_; d0 += kAmxRows) {
              for (int64_t j0 = 0; j0 < cols; j0 += kPanel) {
                const int64_t out = d0 * seq_k_padded_ + key_begin + j0;
                amx_pair_product<Isa>(buf.do_t + d0 * ld + q_begin, ld, buf.p_by_rows + 2 * j0, 2 * cols,
                                      rows / (2 * kAmxPairs), buf.dv_t + out, seq_k_padded_, true);
                amx_pair_product<Isa>(buf.q_t + d0 * ld + q_begin, ld, buf.ds_by_rows + 2 * j0, 2 * cols,
                                      rows / (2 * kAmxPairs), buf.dk_t + out, seq_k_padded_, true);
              }
            }
            pairs_tile_done = true;
          }
        }
        for (int64_t k0 = 0; k0 < keys && !pairs_tile_done; k0 += kTileRows) {
          with_tile_rows<kTileRows>(static_cast<int>(std::min<int64_t>(kTileRows, keys - k0)), [&]<int R>() {
            for (int64_t d = 0; d < ld; d += kPanel) {
              const int64_t strip = ((d / kPanel) * seq_q_padded() + q_begin) * kPanel;
              pv_tile_pairs<Isa, R>(buf.p_by_rows + 2 * k0, 2, 2 * cols, nullptr, buf.do_strips + strip, rows / 2,
                                    dv_acc + k0 * ld + d, ld);
              pv_tile_pairs<Isa, R>(buf.ds_by_rows + 2 * k0, 2, 2 * cols, nullptr, buf.q_strips + strip, rows / 2,
                                    dk_acc + k0 * ld + d, ld);
            }
          });
        }
      }
    }
    for (int64_t k0 = 0; k0 < keys && !pairs_tile; k0 += kTileRows) {
      auto seen_by = [&](int r) { return seen_by_rows(k0 + r); };
      with_tile_rows<kTileRows>(static_cast<int>(std::min<int64_t>(kTileRows, keys - k0)), [&]<int R>() {
        for (int64_t d = 0; d < ld; d += kPanel) {
          pv_tile_seen<Isa, R, 2>(buf.p + k0, 1, s_ld, nullptr, do_rows + d, ld, seen_by, dv_acc + k0 * ld + d, ld);
          pv_tile_seen<Isa, R, 2>(buf.dp + k0, 1, s_ld, nullptr, q_rows + d, ld, seen_by, dk_acc + k0 * ld + d, ld);
        }
      });
    }

    // dq += ds x k.
    float* dq_acc = buf.dq_acc + q_begin * ld;
    const float* k_rows = buf.k_rows + key_begin * ld;
    for (int r0 = 0; r0 < rows; r0 += kTileRows) {
      auto seen = [&](int r) { return keys_seen(r0 + r); };
      with_tile_rows<kTileRows>(std::min(kTileRows, rows - r0), [&]<int R>() {
        for (int64_t d = 0; d < ld; d += kPanel) {
          if constexpr (kPairs) {
            const bfloat16* k_strip = buf.k_strips + ((d / kPanel) * seq_k_padded_ + key_begin) * kPanel;
            pv_tile_pairs_seen<Isa, R>(buf.ds_pairs + r0 * s_ld, buf.dp + r0 * s_ld, s_ld, nullptr, k_strip, seen,
                                       dq_acc + r0 * ld + d, ld);
          } else {
            pv_tile_seen<Isa, R, 2>(buf.dp + r0 * s_ld, s_ld, 1, nullptr, k_rows + d, ld, seen, dq_acc + r0 * ld + d,
                                    ld);
          }
        }
      });
    }
  }

  BwdParams p_;
  FwdParams f_;
  detail::RowRanges ranges_;
  int64_t dim_padded_;
  int64_t seq_k_padded_;
  int64_t pair_ld_;  // pair products: the length of a bf16 row of Q, dO (D rounded up to even)
  float scale_log2_;
};

template <class Isa>
void flash_backward(BwdParams p) {
  if (p.fwd.dtype == DType::kBFloat16) {
    FlashBackward<Isa, bfloat16>(p).run();
  } else {
    FlashBackward<Isa, float>(p).run();
  }
}

}  // namespace
}  // namespace pflash::cpu
