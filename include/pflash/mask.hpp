// Which keys each query sees: one description that the forward, the backward and the decode take
// (the Python package's pallas_flash.mask is the same description).
//
// Positions. Query row i of a call sits at position query_offset + i and key row j at position j;
// query_offset defaults to Nk - Nq, so that the last query sits at the last key's position (the
// bottom-right alignment of FlashAttention >= 2.1; jax.nn.dot_product_attention's top-left alignment
// is query_offset = 0). A query at position p sees the key at position s when every rule that is set
// holds:
//   causal                  s <= p
//   window_left >= 0        s >= p - window_left      (FlashAttention's window_size; -1: unbounded)
//   window_right >= 0       s <= p + window_right
//   chunk_size > 0          s / chunk_size == p / chunk_size, floored (Llama 4's chunked attention)
//   segment ids             q_segment_ids[b * Nq + i] == kv_segment_ids[b * Nk + j] (packed documents)
//   lengths                 i < q_lengths[b] and j < kv_lengths[b]
// A row that sees no key gets O = 0 and LSE = -inf (with sinks: LSE = the sink's logit).
#pragma once

#include <cstdint>
#include <optional>
#include <span>

namespace pflash {

inline constexpr std::int64_t kUnboundedWindow = -1;

struct AttentionMask {
  bool causal = false;
  std::int64_t window_left = kUnboundedWindow;
  std::int64_t window_right = kUnboundedWindow;
  std::int64_t chunk_size = 0;               // 0: no chunks
  std::optional<std::int64_t> query_offset;  // default Nk - Nq

  // Optional per-call operands, row-major: [B * Nq] and [B * Nk] (both or neither), [B] each.
  std::span<const std::int32_t> q_segment_ids;
  std::span<const std::int32_t> kv_segment_ids;
  std::span<const std::int32_t> q_lengths;
  std::span<const std::int32_t> kv_lengths;

  // The causal mask at FlashAttention's bottom-right alignment, the most common case.
  static AttentionMask causal_mask() {
    AttentionMask mask;
    mask.causal = true;
    return mask;
  }
};

}  // namespace pflash
