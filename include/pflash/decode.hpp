// FlashDecoding: a few new query tokens per sequence attending to a long KV cache.
//   O = softmax(Q K^T * scale + causal mask) V over each sequence's cache positions,
// where the T query tokens of sequence b are its last T positions (append their K/V first with
// append_kv): query t sees positions j <= seq_lens[b] - T + t. A query that sees no position gets
// O = 0 and LSE = -inf.
//
// The work is reading the cache once. All query heads of a GQA group are computed against one read of
// their KV head; when batch x KV heads is too few to keep every thread busy, each sequence's positions
// are cut into num_splits ranges decoded in parallel, each giving a partial (O, LSE), merged exactly
// by the same function merge_attention_states exposes.
#pragma once

#include <cstdint>
#include <optional>
#include <span>

#include "pflash/kv_cache.hpp"
#include "pflash/mask.hpp"
#include "pflash/tensor.hpp"

namespace pflash {

inline constexpr std::int64_t kMaxDecodeQueryTokens = 16;
inline constexpr int kMaxDecodeSplits = 256;

struct DecodeParams {
  TensorView q;           // [B, Hq, T, D], T from 1 to 16, fp32 or bf16
  KVCacheView cache;      // fp32 or bf16 (independent of q's dtype), Hkv dividing Hq, same D
  MutableTensorView o;    // [B, Hq, T, D], q's dtype, or fp32 to keep a partial result exact for a later merge
  MutableTensorView lse;  // optional [B, Hq, T] fp32, natural log

  std::optional<float> softmax_scale;  // default 1/sqrt(D)
  // For a cache that holds only a window of each sequence (one shard of a sharded cache, see
  // pflash/shard_layout.hpp): positions_after[b] of sequence b's positions follow the window and are
  // held elsewhere. The query tokens are still the sequence's last T positions, so token t sees window
  // position j when j <= seq_lens[b] + positions_after[b] - T + t. Empty: nothing follows ([B] otherwise).
  std::span<const std::int32_t> positions_after;

  // A sliding window: token t sees only the window_left positions before its own (and its own);
  // the cache is read only there. kUnboundedWindow: the whole sequence.
  std::int64_t window_left = kUnboundedWindow;
  // Chunked attention: token t sees only the positions of its own chunk of chunk_size (0: none).
  // Positions are the cache's rows, so not with positions_after > 0 (a shard's rows are not positions).
  std::int64_t chunk_size = 0;
  float logits_soft_cap = 0.0f;  // > 0: as in AttentionParams
  TensorView sinks;              // optional [Hq] fp32, as in AttentionParams (applied once, after the splits' merge)

  int num_splits = 0;   // ranges per sequence: 0 chooses from the thread count and the lengths
  int num_threads = 0;  // 0: all threads; more than the machine runs: clamped (resolve_num_threads)
};

// Throws pflash::Error (ErrorCode::kInvalidArgument) naming the offending argument; reads nothing
// outside the cache's views, its used block-table entries, or a sequence's first seq_lens[b] positions.
void flash_decode(const DecodeParams& params);

// The split count flash_decode uses for these arguments (num_splits, or the automatic choice).
int decode_num_splits(const DecodeParams& params);

}  // namespace pflash
