// What a backend receives once the public arguments have been validated: raw pointers, sizes and
// element strides, filled in one place (core/validate.cpp) and passed by value.
#pragma once

#include <algorithm>
#include <cstdint>

#include "core/mask.hpp"
#include "pflash/attention.hpp"
#include "pflash/decode.hpp"
#include "pflash/kv_cache.hpp"
#include "pflash/merge.hpp"
#include "pflash/dtype.hpp"

namespace pflash::detail {

struct HeadStrides {  // element strides of a [B, H, N, ...] tensor
  std::int64_t batch = 0;
  std::int64_t head = 0;
  std::int64_t row = 0;
};

struct FwdParams {
  const void* q = nullptr;
  const void* k = nullptr;
  const void* v = nullptr;
  void* o = nullptr;
  float* lse = nullptr;  // may be null
  DType dtype = DType::kFloat32;

  std::int64_t batch = 0;
  std::int64_t heads_q = 0;
  std::int64_t heads_kv = 0;
  std::int64_t seq_q = 0;
  std::int64_t seq_k = 0;
  std::int64_t dim = 0;
  HeadStrides q_strides, k_strides, v_strides, o_strides, lse_strides;

  float scale = 1.0f;
  MaskParams mask;        // which keys each query row sees
  float soft_cap = 0.0f;  // > 0: scores s become soft_cap * tanh(s / soft_cap) (scaled scores, natural units)
  const float* sinks = nullptr;  // [Hq] logits in each row's denominator; may be null
  int block_q = 0;  // 0: the backend chooses
  int block_k = 0;
  int num_threads = 1;

  std::int64_t group_size() const { return heads_q / heads_kv; }
};

// The backward pass: the forward's problem plus the tensors the backward reads and writes.
struct BwdParams {
  FwdParams fwd;  // q, k, v, sizes, strides, scale, mask, soft cap, sinks, threads (fwd.o, fwd.lse: unused)
  const void* o = nullptr;
  const void* dout = nullptr;
  const float* lse = nullptr;
  void* dq = nullptr;
  void* dk = nullptr;
  void* dv = nullptr;
  HeadStrides o_strides, dout_strides, lse_strides, dq_strides, dk_strides, dv_strides;
  float* dsinks = nullptr;  // [Hq], with fwd.sinks; may be null
};

// A validated KV cache: element strides of its k and v views ([B or page, Hkv, row, D]), and the
// paging, if any. Position p of sequence b, head h is
//   contiguous: base + b * strides.batch + h * strides.head + p * strides.row
//   paged:      base + block_table[b * pages_per_seq + p / page_size] * strides.batch
//                    + h * strides.head + (p % page_size) * strides.row
struct CacheParams {
  const void* k = nullptr;
  const void* v = nullptr;
  DType dtype = DType::kFloat32;
  HeadStrides k_strides, v_strides;
  const std::int32_t* seq_lens = nullptr;     // [B]
  const std::int32_t* block_table = nullptr;  // null: contiguous
  std::int64_t pages_per_seq = 0;
  std::int64_t page_size = 0;  // paged only; a power of two
  std::int64_t capacity = 0;   // positions a sequence can hold

  bool paged() const { return block_table != nullptr; }
  // Element offset of (b, h, position p) in the k (or v) view.
  std::int64_t offset(const HeadStrides& s, std::int64_t b, std::int64_t h, std::int64_t p) const {
    if (!paged()) return b * s.batch + h * s.head + p * s.row;
    const std::int64_t page = block_table[b * pages_per_seq + p / page_size];
    return page * s.batch + h * s.head + (p % page_size) * s.row;
  }
  // Positions from p on that sit in consecutive rows of one page (contiguous: all of them).
  std::int64_t run_length(std::int64_t p, std::int64_t end) const {
    return paged() ? std::min(end, (p / page_size + 1) * page_size) - p : end - p;
  }
};

struct DecodeParams {
  const void* q = nullptr;
  void* o = nullptr;
  float* lse = nullptr;  // may be null
  DType dtype = DType::kFloat32;    // of q
  DType o_dtype = DType::kFloat32;  // q's, or fp32
  HeadStrides q_strides, o_strides, lse_strides;
  CacheParams cache;
  const std::int32_t* positions_after = nullptr;  // [B] positions past the cache's window; null: none
  // Token t of sequence b sits at position seq_lens[b] + positions_after[b] - T + t (cache row j at j)
  // and sees the positions the geometry gives it (causal; a left window, a chunk).
  MaskGeometry geometry;
  float soft_cap = 0.0f;
  const float* sinks = nullptr;  // [Hq]; may be null

  std::int64_t batch = 0;
  std::int64_t heads_q = 0;
  std::int64_t heads_kv = 0;
  std::int64_t query_tokens = 0;
  std::int64_t dim = 0;
  std::int64_t max_seq_len = 0;  // the longest sequence

  float scale = 1.0f;
  int num_splits = 1;  // resolved: >= 1
  int num_threads = 1;

  std::int64_t group_size() const { return heads_q / heads_kv; }
  // The most positions one sequence's query tokens see together: a window or chunk bounds them.
  std::int64_t max_positions_read() const {
    std::int64_t n = max_seq_len;
    if (geometry.lo != -kNoBound) n = std::min(n, -geometry.lo + query_tokens);
    if (geometry.chunk > 0) n = std::min(n, 2 * geometry.chunk);
    return n;
  }
};

// append_kv: T new rows per (sequence, KV head), written at positions seq_lens[b] + t.
struct AppendParams {
  CacheParams cache;
  void* k = nullptr;  // cache.k and cache.v, writable
  void* v = nullptr;
  std::int32_t* seq_lens = nullptr;
  const void* k_new = nullptr;
  const void* v_new = nullptr;
  HeadStrides k_new_strides, v_new_strides;
  std::int64_t batch = 0, heads_kv = 0, tokens = 0, dim = 0;
};

// merge_attention_states: S parts of N x H rows of D values.
struct MergeParams {
  const void* o_parts = nullptr;  // [S, N, H, D]
  DType parts_dtype = DType::kFloat32;
  const float* lse_parts = nullptr;  // [S, N, H]
  void* o = nullptr;                 // [N, H, D]
  DType o_dtype = DType::kFloat32;
  float* lse = nullptr;  // [N, H], may be null
  std::int64_t num_parts = 0, n = 0, heads = 0, dim = 0;
  HeadStrides parts_strides;      // .batch: per part, .head: per n, .row: per h
  HeadStrides lse_parts_strides;  // the same three
  std::int64_t o_n_stride = 0, o_h_stride = 0;
  std::int64_t lse_n_stride = 0, lse_h_stride = 0;
  int num_threads = 1;
};

// Validate (throwing pflash::Error) and fill the backend parameters, one per entry point.
FwdParams make_fwd_params(const AttentionParams& params, const char* function_name);
BwdParams make_bwd_params(const AttentionBackwardParams& params, const char* function_name);
DecodeParams make_decode_params(const pflash::DecodeParams& params, const char* function_name);
MergeParams make_merge_params(const pflash::MergeParams& params, const char* function_name);
AppendParams make_append_params(const MutableKVCache& cache, TensorView k_new, TensorView v_new,
                                const char* function_name);

}  // namespace pflash::detail
